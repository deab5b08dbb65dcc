"""The fit table as Markdown (docs/results/fit.md): plans, HBM, FLOPs, collectives, roofline estimates."""

from __future__ import annotations

import dataclasses

from chameleon_jax.aot import hlo
from chameleon_jax.aot import roofline
from chameleon_jax.aot.sweep import CaseResult, Probe, slice_name

_KIND_SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
               "collective-permute": "CP"}


def _gib(n: float) -> str:
    return f"{n / 1024 ** 3:.1f}"


def _collectives(p: Probe) -> str:
    by_kind = (p.hlo or {}).get("collective_bytes", {})
    return " / ".join(f"{_KIND_SHORT[k]} {by_kind.get(k, 0) / 1024 ** 3:.1f}" for k in hlo.COLLECTIVES)


def chip_table() -> list[str]:
    out = ["| chip | peak bf16 FLOP/s | HBM bandwidth | ICI bandwidth (bidirectional, per chip) | source |",
           "|---|---|---|---|---|"]
    for c in roofline.CHIPS.values():
        out.append(f"| {c.name} | {c.peak_flops / 1e12:.0f} T | {c.hbm_bandwidth / 1e9:.0f} GB/s | "
                   f"{c.ici_bidirectional / 1e9:.0f} GB/s | {c.source} |")
    return out


def probe_row(label: str, p: Probe, note: str = "") -> str:
    plan = p.plan_obj
    d, f, t = plan.mesh
    if p.fits and not p.hlo:
        return (f"| {label} | {d}/{f}/{t} | {plan.remat} | {plan.attention} | {plan.batch_per_shard} x "
                f"{plan.microbatches} | {p.tokens_per_chip:,.0f} | {_gib(p.total_bytes)} of {_gib(p.hbm_limit)} "
                f"({100 * (1 - p.total_bytes / p.hbm_limit):.0f}% spare) | — | {p.model_flops / 1e12:.1f} | — | — "
                f"| — | — | {p.compile_seconds:.0f} | {note}; {p.error} |")
    if not p.hlo:
        return (f"| {label} | {d}/{f}/{t} | {plan.remat} | {plan.attention} | {plan.batch_per_shard} x "
                f"{plan.microbatches} | — | {_gib(p.total_bytes or p.temp_bytes)} (does not fit) | — | — | — | — | — "
                f"| — | {p.compile_seconds:.0f} | {note} |")
    e = p.estimate or {}
    h = p.hlo
    if h.get("opaque_calls"):
        note += f"; {h['opaque_calls']} kernel calls of unknown FLOPs"
    spare = 1 - p.total_bytes / p.hbm_limit
    return (f"| {label} | {d}/{f}/{t} | {plan.remat} | {plan.attention} | {plan.batch_per_shard} x "
            f"{plan.microbatches} | {p.tokens_per_chip:,.0f} | {_gib(p.total_bytes)} of {_gib(p.hbm_limit)} "
            f"({100 * spare:.0f}% spare) | {h['flops'] / 1e12:.1f} / {p.xla_flops / 1e12:.1f} | "
            f"{p.model_flops / 1e12:.1f} | {h['flops'] / p.model_flops:.2f} | {_collectives(p)} | "
            f"{1e3 * e['step_s']:.0f} ({e['bound']}) | {100 * e['mfu']:.0f}% ({100 * e['serial_mfu']:.0f}%) | "
            f"{p.compile_seconds:.0f} | {note} |")


HEADER = ["| case | data/fsdp/tensor | remat | attention | batch/shard x microbatches | tokens/chip/step | "
          "HBM/chip GiB (compiled) | TFLOP/chip/step: HLO / XLA cost_analysis | model TFLOP/chip/step | "
          "HLO FLOPs / model FLOPs | collectives GiB/chip/step | ESTIMATE step ms (bound) | "
          "ESTIMATE MFU (no overlap) | compile s | note |",
          "|" + "---|" * 15]


def results_table(results: list[CaseResult]) -> list[str]:
    rows = list(HEADER)
    for r in results:
        label = f"{r.case.model} {slice_name(r.case.topology)} `{r.case.topology}`"
        if r.best is None and not r.probes:
            if r.at_config is not None:
                rows.append(probe_row(f"{label}, config's global batch", r.at_config,
                                      "as the experiment config states; batch search not run"))
            continue
        if r.best is None:
            rows.append(f"| {label} | — | {', '.join(r.remat_tried)} | — | nothing fits "
                        f"| | | | | | | | | | {len(r.probes)} compiles |")
            continue
        b = r.best.plan["batch_per_shard"]
        confirmed = any(not q.fits and q.plan_obj == dataclasses.replace(r.best.plan_obj, batch_per_shard=b + 1)
                        for q in r.probes)
        note = (f"largest fit; {b + 1}/shard compiled and does not fit" if confirmed
                else f"largest seen to fit; {b + 1}/shard not compiled")
        others = [q for q in r.probes if tuple(q.plan["mesh"]) != tuple(r.best.plan["mesh"])]
        if others:  # the config's split fit no batch: say what was compiled there
            d, f, t = others[0].plan["mesh"]
            needs = min(q.total_bytes or q.temp_bytes for q in others)
            note += (f"; at data={d} fsdp={f} tensor={t} one sequence fit at no remat "
                     f"({', '.join(sorted({q.plan['remat'] for q in others}))}; >= {needs / 2 ** 30:.2f} GiB)")
        rows.append(probe_row(label, r.best, note))
        if r.at_config is not None:
            rows.append(probe_row(f"{label}, config's global batch", r.at_config, "as the experiment config states"))
    return rows


def global_batch_lines(results: list[CaseResult]) -> list[str]:
    out = ["| case | config global batch | plan: batch/shard x microbatches | ESTIMATE step s | "
           "ESTIMATE tokens/s/chip |", "|---|---|---|---|---|"]
    for r in results:
        if r.best is None or r.global_plan is None or not r.best.estimate:
            continue
        g = r.global_plan
        # Each microbatch costs what the probed one-shot step costs per sequence (an estimate:
        # the optimizer update runs once per step, not per microbatch, so this is an upper bound).
        per_seq = r.best.estimate["step_s"] / r.best.plan["batch_per_shard"]
        step = per_seq * g.batch_per_shard * g.microbatches
        tokens = g.global_batch * r.best.tokens_per_chip / (r.best.plan["batch_per_shard"] * r.best.plan_obj.shards)
        out.append(f"| {r.case.model} {slice_name(r.case.topology)} | {g.global_batch:,} | {g.batch_per_shard} x "
                   f"{g.microbatches} | {step:.1f} | {tokens / step:,.0f} |")
    return out
