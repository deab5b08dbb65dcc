"""The fit table: for each (model, TPU slice) case, a plan and the largest per-chip batch that fits.

A plan is the mesh split (data, fsdp, tensor), the remat policy, the attention kernel, the batch per
data shard (sequences per data×fsdp shard per microbatch) and the microbatches that reach the
config's global batch. Each probe compiles the real train step for the slice (aot.compile_train_step:
compile-only TPU devices, nothing runs) and reads per-chip HBM from `memory_analysis()`, then the
per-step matmul FLOPs, HBM traffic and collectives from the HLO (aot.hlo), and a roofline estimate
(aot.roofline).

The batch search keeps compiles few, because a 7B compile takes minutes on a small machine:
probe batch 1 and 2 (or 1 and a slope measured on another slice of the same model and split),
then jump to where the straight line through the measured HBM crosses the limit, and probe that
batch and the next. Per-chip memory is affine in the batch (state and weights fixed, activations per
sequence), so this lands on the boundary in about four compiles; it falls back to doubling and
bisection when a jump misses. Probes are cached in a JSON-lines file so an interrupted sweep resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import json
import math
import tempfile
import time
from typing import Callable, Iterable

from chameleon_jax import aot
from chameleon_jax.aot import hlo
from chameleon_jax.aot import roofline
from chameleon_jax.model import flops as flops_lib
from chameleon_jax.model.sharding import mesh_shape


def slice_name(topology: str) -> str:
    """'v5p:4x4x4' -> 'v5p-128 (64 chips)': v5p-N counts TensorCores (2 per chip), v5e/v6e count chips."""
    generation, shape = topology.split(":", 1)
    chips = math.prod(int(d) for d in shape.split("x"))
    cores = 2 * chips if generation == "v5p" else chips
    return f"{generation}-{cores} ({chips} chips)"


@dataclasses.dataclass(frozen=True)
class Case:
    model: str      # "7B"
    config: str     # experiments/*.py
    topology: str   # "v5p:4x4x4"

    @property
    def key(self) -> str:
        return f"{self.model}@{self.topology}"


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh: tuple[int, int, int]  # data, fsdp, tensor
    remat: str
    attention: str              # "xla" | "splash"
    batch_per_shard: int        # sequences per data×fsdp shard per microbatch
    microbatches: int = 1

    @property
    def shards(self) -> int:
        return self.mesh[0] * self.mesh[1]

    @property
    def global_batch(self) -> int:
        return self.batch_per_shard * self.shards * self.microbatches

    def label(self) -> str:
        d, f, t = self.mesh
        return (f"data={d} fsdp={f} tensor={t}, remat={self.remat}, attention={self.attention}, "
                f"{self.batch_per_shard}/shard x {self.microbatches} microbatches")


def load_config(path: str):
    """`get_config()` of an experiments/*.py file (the file config_flags would load, without flags)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    if spec is None:
        raise FileNotFoundError(f"no experiment config at {path!r}; pass a path like experiments/chameleon_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def plan_config(config, plan: Plan, seq_len: int | None = None):
    """A copy of `config` set to run `plan`."""
    c = copy.deepcopy(config)
    c.mesh.update(data=plan.mesh[0], fsdp=plan.mesh[1], tensor=plan.mesh[2])
    c.model.remat = plan.remat
    if "attention" in c.model:
        c.model.attention = plan.attention
    elif plan.attention != "xla":
        raise ValueError(f"attention={plan.attention!r} needs the model.attention setting, which this tree "
                         f"does not have yet; use attention='xla'.")
    c.train.batch_size = plan.global_batch
    c.train.microbatches = plan.microbatches
    if seq_len:
        c.train.seq_len = seq_len
    return c


def config_plan(config, chips: int, attention: str | None = None, exact: bool = True) -> Plan:
    """The plan a config states for `chips` chips (its mesh, remat, global batch and microbatches).
    With `exact=False` a global batch that does not split over the shards gives 1 sequence per shard
    and 1 microbatch (the batch search only takes the mesh, remat and kernel from it)."""
    data, fsdp, tensor = mesh_shape(config.mesh, chips)
    micro = int(config.train.get("microbatches", 1))
    per_shard, rest = divmod(int(config.train.batch_size), micro * data * fsdp)
    if rest or per_shard < 1:
        if exact:
            raise ValueError(f"train.batch_size={config.train.batch_size} does not split over {micro} microbatches "
                             f"x {data * fsdp} shards on {chips} chips; change train.microbatches.")
        per_shard, micro = 1, 1
    kernel = attention or str(config.model.get("attention", "xla"))
    if kernel == "auto":
        kernel = "splash" if "attention" in config.model else "xla"
    return Plan((data, fsdp, tensor), str(config.model.remat), kernel, per_shard, micro)


@dataclasses.dataclass
class Probe:
    """One compile of one plan, per chip."""
    case: str
    topology: str
    plan: dict
    fits: bool
    hbm_limit: int
    total_bytes: int = 0
    temp_bytes: int = 0
    argument_bytes: int = 0
    compile_seconds: float = 0.0
    xla_flops: float = 0.0        # compiled.cost_analysis()["flops"] (loop bodies counted once)
    hlo: dict | None = None       # hlo.StepCost of the compiled program
    model_flops: float = 0.0      # analytic, per chip per step
    tokens_per_chip: float = 0.0  # per step
    estimate: dict | None = None  # roofline.Estimate (an estimate, not a measurement)
    error: str = ""

    @property
    def plan_obj(self) -> Plan:
        p = dict(self.plan)
        p["mesh"] = tuple(p["mesh"])
        return Plan(**p)


def compile_probe(case: Case, config, plan: Plan, *, hbm_limit: int | None = None,
                  hlo_dir: str | None = None) -> Probe:
    """Compiles `plan` of `config` for the case's slice and measures it. `hlo_dir`: also keep the
    optimized HLO there (gzip), to read it again without recompiling."""
    topology = case.topology
    limit = int(hbm_limit or aot.chip_hbm_bytes(topology))
    c = plan_config(config, plan)
    with tempfile.TemporaryDirectory(prefix="fit_hlo_") as dump:
        report, compiled = aot.compile_train_step(c, topology, hlo_dump=dump)
        probe = Probe(case.key, topology, dataclasses.asdict(plan), False, limit, report.total_bytes,
                      report.temp_bytes, report.argument_bytes, report.compile_seconds, error=report.error)
        if compiled is None:
            return probe
        probe.fits = report.total_bytes <= limit
        model_cfg = aot.validate(c, num_devices=report.chips)
        seq = int(c.train.seq_len)
        tokens = plan.global_batch * seq
        probe.tokens_per_chip = tokens / report.chips
        probe.model_flops = flops_lib.train_flops_per_token(model_cfg, seq) * tokens / report.chips
        try:  # keep the memory figures of a compile that took minutes, whatever fails below
            analysis = compiled.cost_analysis()
            analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
            probe.xla_flops = float(analysis.get("flops", 0.0))
            text = aot.optimized_hlo_text(dump)
            if hlo_dir:
                from etils import epath
                epath.Path(hlo_dir).mkdir(parents=True, exist_ok=True)
                _hlo_file(hlo_dir, probe).write_bytes(gzip.compress(text.encode()))
            cost = hlo.step_cost(text, report.chips)
        except Exception as e:  # noqa: BLE001 (reported in the table's note column)
            probe.error = f"HLO not read: {e}"[:500]
            return probe
    _set_cost(probe, cost)
    return probe


def _set_cost(probe: Probe, cost: hlo.StepCost) -> None:
    probe.hlo = cost.as_dict()
    probe.estimate = roofline.estimate(roofline.chip(probe.topology), flops=cost.flops, hbm_bytes=cost.hbm_bytes,
                                       wire_bytes=cost.wire_bytes, model_flops=probe.model_flops).as_dict()


def _hlo_file(hlo_dir: str, probe: Probe):
    from etils import epath
    digest = hashlib.sha1(json.dumps(probe.plan).encode()).hexdigest()[:10]
    return epath.Path(hlo_dir) / f"{probe.case}-{digest}.hlo.gz".replace(":", "_").replace("@", "_")


def reread(probe: Probe, hlo_dir: str, chips: int) -> bool:
    """Reads a probe's kept HLO again (after a fix to aot.hlo); False when none was kept."""
    f = _hlo_file(hlo_dir, probe)
    if not probe.fits or not f.exists():
        return False
    _set_cost(probe, hlo.step_cost(gzip.decompress(f.read_bytes()).decode(), chips))
    probe.error = ""
    return True


class ProbeCache:
    """Probes by (case, plan, limit) in a JSON-lines file, so a sweep resumes where it stopped."""

    def __init__(self, path: str | None):
        self.path = path
        self.probes: dict[str, Probe] = {}
        if path:
            from etils import epath
            p = epath.Path(path)
            if p.exists():
                for line in p.read_text().splitlines():
                    if line.strip():
                        probe = Probe(**json.loads(line))
                        self.probes[self._key(probe.case, probe.plan_obj, probe.hbm_limit)] = probe

    @staticmethod
    def _key(case: str, plan: Plan, limit: int) -> str:
        return json.dumps([case, dataclasses.asdict(plan), limit])

    def get(self, case: str, plan: Plan, limit: int) -> Probe | None:
        return self.probes.get(self._key(case, plan, limit))

    def put(self, probe: Probe) -> None:
        self.probes[self._key(probe.case, probe.plan_obj, probe.hbm_limit)] = probe
        if self.path:
            from etils import epath
            # Whole-object write (object stores have no append).
            epath.Path(self.path).write_text("".join(json.dumps(dataclasses.asdict(p)) + "\n"
                                                     for p in self.probes.values()))


def largest_fitting_batch(probe_at: Callable[[int], Probe], *, limit: int, slope: float | None = None,
                          start: int = 1, max_batch: int = 4096,
                          max_probes: int = 6) -> tuple[Probe | None, list[Probe]]:
    """The largest batch b (>= 1) whose probe fits, and every probe made.

    Between two fitting probes per-chip HBM is taken as affine in b; the next batch tried is where
    that line (or batch 1 plus `slope` bytes per unit of b, from another slice) reaches `limit`,
    kept strictly between the largest fit and the smallest failure; otherwise double or bisect. It
    stops when those two are adjacent or after `max_probes` compiles (the answer is then the
    largest batch seen to fit). `start` is the first batch tried.
    """
    probes: list[Probe] = []
    fit: dict[int, Probe] = {}
    lo, hi = 0, max_batch + 1
    b = max(1, min(start, max_batch))
    while len(probes) < max_probes:
        try:
            p = probe_at(b)
        except NotCompiled:  # rendering from a probe log that stops here: report what it holds
            break
        probes.append(p)
        if p.fits:
            fit[b] = p
            lo = max(lo, b)
        else:
            hi = min(hi, b)
        if hi - lo <= 1:
            break
        known = sorted(fit)
        guess = None
        if len(known) >= 2:
            (b1, p1), (b2, p2) = (known[-2], fit[known[-2]]), (known[-1], fit[known[-1]])
            per_b = (p2.total_bytes - p1.total_bytes) / (b2 - b1)
            if per_b > 0:
                guess = b2 + math.floor((limit - p2.total_bytes) / per_b)
        elif len(known) == 1 and slope:
            guess = known[0] + math.floor((limit - fit[known[0]].total_bytes) / slope)
        if guess is not None:
            b = min(max(guess, lo + 1), hi - 1)  # strictly between what fits and what does not
        elif hi > max_batch:
            b = min(2 * lo, hi - 1)
        else:
            b = (lo + hi) // 2
    return (fit[lo] if lo else None), probes


def per_batch_slope(probes: Iterable[Probe]) -> float | None:
    """HBM bytes per unit of batch_per_shard, from the two largest fitting probes."""
    fits = sorted((p.plan["batch_per_shard"], p.total_bytes) for p in probes if p.fits)
    if len(fits) < 2:
        return None
    (b1, m1), (b2, m2) = fits[-2], fits[-1]
    return (m2 - m1) / (b2 - b1) if b2 > b1 else None


def global_batch_plan(best: Plan, global_batch: int) -> Plan:
    """Microbatches that reach `global_batch` with at most best.batch_per_shard sequences per shard."""
    per_step = global_batch // best.shards
    if per_step * best.shards != global_batch or per_step < 1:
        return dataclasses.replace(best, microbatches=1)
    b = max(d for d in range(1, best.batch_per_shard + 1) if per_step % d == 0)
    return dataclasses.replace(best, batch_per_shard=b, microbatches=per_step // b)


class NotCompiled(Exception):
    """A probe the log does not hold, in a sweep told not to compile."""


@dataclasses.dataclass
class CaseResult:
    case: Case
    best: Probe | None                 # the largest fitting batch, microbatches = 1
    probes: list[Probe]
    remat_tried: list[str]
    at_config: Probe | None = None     # the config's own global batch and microbatches, if compiled
    global_plan: Plan | None = None    # microbatches reaching the config's global batch at best's size


def sweep_case(case: Case, *, attention: str, remats: list[str] | None = None, cache: ProbeCache | None = None,
               hbm_limit: int | None = None, slopes: dict | None = None, at_config: bool = False,
               max_probes: int = 6, log: Callable[[str], None] = print, config=None,
               compile: bool = True, hlo_dir: str | None = None) -> CaseResult:
    """Searches the largest fitting batch for one case: the config's remat first, then each of
    `remats` in turn while batch 1 does not fit. `config`: the case's experiment config, if already
    loaded (else read from case.config). With `compile=False` only logged probes are used and a
    missing one raises NotCompiled."""
    config = load_config(case.config) if config is None else config
    chips = len(aot.topology_devices(case.topology))
    limit = int(hbm_limit or aot.chip_hbm_bytes(case.topology))
    base = config_plan(config, chips, attention, exact=False)
    order = [base.remat] + [r for r in (remats or []) if r != base.remat]
    slopes = {} if slopes is None else slopes
    cache = cache or ProbeCache(None)

    def measured(plan: Plan) -> Probe:
        hit = cache.get(case.key, plan, limit)
        if hit is not None:
            return hit
        if not compile:
            raise NotCompiled(f"{case.key}: {plan.label()}")
        start = time.perf_counter()
        log(f"  compiling {case.model} for {slice_name(case.topology)}: {plan.label()} ...")
        p = compile_probe(case, config, plan, hbm_limit=limit, hlo_dir=hlo_dir)
        log(f"    {'fits' if p.fits else 'does not fit'}: {aot.format_bytes(p.total_bytes or p.temp_bytes)} of "
            f"{aot.format_bytes(limit)} ({time.perf_counter() - start:.0f} s)")
        cache.put(p)
        return p

    result = CaseResult(case, None, [], [])
    if at_config:
        try:
            result.at_config = measured(config_plan(config, chips, attention))
        except NotCompiled:
            pass
    for split in mesh_splits(base.mesh, int(config.model.n_kv_heads)):
        plan0 = dataclasses.replace(base, mesh=split)
        if split != base.mesh:
            log(f"  nothing fits at tensor={split[2] // 2}; splitting the heads further: "
                f"data={split[0]} fsdp={split[1]} tensor={split[2]}")
            result.remat_tried.append(f"tensor={split[2]}:")
        if _search_remats(case, plan0, order, result, measured, slopes, limit, max_probes, attention, config):
            break
    if result.best is not None:
        # A probe of one more sequence that the log holds (compiled by hand or by an earlier, longer
        # search) settles the boundary even when this search stopped before asking for it.
        above = dataclasses.replace(result.best.plan_obj, batch_per_shard=result.best.plan["batch_per_shard"] + 1)
        hit = cache.get(case.key, above, limit)
        if hit is not None and hit not in result.probes:
            result.probes.append(hit)
    if not compile and not result.probes and result.at_config is None:
        raise NotCompiled(f"{case.key}: no probe in the log")
    return result


def mesh_splits(mesh: tuple[int, int, int], kv_heads: int) -> list[tuple[int, int, int]]:
    """The config's split, then tensor doubled (fsdp halved) while it still divides the kv heads: when
    no batch fits at any remat, fewer fsdp shards of more head-split weights may."""
    data, fsdp, tensor = mesh
    splits = [mesh]
    while fsdp % 2 == 0 and kv_heads % (tensor * 2) == 0 and fsdp > 1:
        fsdp, tensor = fsdp // 2, tensor * 2
        splits.append((data, fsdp, tensor))
    return splits


def _search_remats(case, base: Plan, order, result, measured, slopes, limit, max_probes, attention, config) -> bool:
    """The largest fitting batch at `base`'s mesh for each remat in `order` in turn, until one fits.
    True when the search is over: one fitted, or the probe log ended (no conclusion to draw)."""
    for remat in order:
        family = (case.model, base.mesh[2], remat, attention)
        start, probes_left = 1, max_probes
        if family in slopes:
            # Another slice of this model and split measured HBM per sequence (`slope`) and the
            # HBM at one sequence (`one`); with at least as many chips the state shard is no larger,
            # so that line predicts a batch that fits here. Compile there, then check the next.
            slope, one = slopes[family]
            start = 1 + math.floor((limit - one) / slope)
            if start < 1:
                result.remat_tried.append(f"{remat} (one sequence predicted to need "
                                          f"{aot.format_bytes(one)}, from another slice)")
                continue
            probes_left = min(2, max_probes)
        result.remat_tried.append(remat)
        best, probes = largest_fitting_batch(
            lambda b: measured(dataclasses.replace(base, remat=remat, batch_per_shard=b, microbatches=1)),
            limit=limit, slope=slopes[family][0] if family in slopes else None, start=start,
            max_probes=probes_left)
        result.probes += probes
        slope = per_batch_slope(probes)
        ones = [p.total_bytes for p in probes if p.fits and p.plan["batch_per_shard"] == 1]
        if slope and ones and family not in slopes:
            slopes[family] = (slope, ones[0])
        if best is not None:
            result.best = best
            result.global_plan = global_batch_plan(best.plan_obj, int(config.train.batch_size))
            return True
        if not probes:  # not compiled (a probe log that ends here): no conclusion about this remat
            return True
    return False


# In the order the sweep runs them: the two 7B targets first, then v5p by size, then v5e / v6e.
DEFAULT_CASES = tuple(
    Case(model, f"experiments/chameleon_{model.lower()}.py", topology)
    for topology, models in (("v5p:4x4x4", ("7B", "34B")), ("v5p:4x4x8", ("7B", "34B")),
                             ("v5p:4x8x8", ("7B", "34B")), ("v5e:16x16", ("7B", "34B")),
                             ("v6e:16x16", ("7B", "34B")))
    for model in models)


def parse_cases(spec: str) -> list[Case]:
    """'7B@v5p:4x4x4,34B@v6e:16x16' (models 7B and 34B, from experiments/) or 'all'."""
    if spec.strip() == "all":
        return list(DEFAULT_CASES)
    configs = {"7B": "experiments/chameleon_7b.py", "34B": "experiments/chameleon_34b.py"}
    out = []
    for item in spec.split(","):
        model, _, topology = item.strip().partition("@")
        if model not in configs or ":" not in topology:
            raise ValueError(f"case {item!r}: write MODEL@TOPOLOGY with MODEL in {sorted(configs)} and a topology "
                             f"like v5p:4x4x4 (64 chips = v5p-128), e.g. 7B@v5p:4x4x4.")
        out.append(Case(model, configs[model], topology))
    return out
