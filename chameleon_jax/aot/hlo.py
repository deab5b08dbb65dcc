"""What a compiled TPU program does per step, read from its HLO text (`compiled.as_text()`).

XLA's own `cost_analysis()` counts the body of a `while` loop once, so for a model whose layers run
in a `lax.scan` (and a step whose microbatches run in another) it misses most of the work. Here every
computation gets an execution count: the entry runs once, a `while` body runs its trip count times
per execution of its caller, and everything else a computation calls (fusions, async wrappers,
conditional branches, reducers) runs once per call. Then, per step and per chip:

- collectives by kind, with the bytes of the buffer each moves: all-gather = its gathered result,
  all-reduce / reduce-scatter / all-to-all / collective-permute = their operand; and the bytes a
  chip puts on the wire in a ring (bandwidth-optimal) implementation over a group of n chips:
  all-gather (n-1)/n of the result, reduce-scatter and all-to-all (n-1)/n of the operand, all-reduce
  2(n-1)/n of the operand (a reduce-scatter then an all-gather), collective-permute the operand;
- matmul FLOPs: 2·(output elements)·(contracted elements) for every `dot` and `convolution`;
  custom calls are opaque, except the Pallas splash attention kernels, which carry no cost in the
  HLO: each is counted from its query operand [.., T, D] (E elements) as matmuls of a causal
  (half-masked) T×T attention, E·T FLOPs per matmul: forward 2 (QKᵀ, PV), dq 3 (QKᵀ recomputed,
  dP, dQ), dkv 4 (QKᵀ recomputed, dV, dP, dK);
- HBM bytes: operands plus results of every instruction outside fused computations (a fusion
  reads its inputs from and writes its outputs to memory; what happens inside stays on chip),
  skipping buffers placed in on-chip memory (layout `S(1)`) and pure bookkeeping ops.

Conditional branches are all counted, as if each ran once per call (the train step's only
conditional is the finite-gradient check, whose skip branch does no work).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

# Bytes per element of HLO's primitive types (xla_data.proto; 4-bit types packed two per byte).
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# Ops that only name or regroup buffers, or hand control to other computations (counted there).
_NO_MEMORY_TRAFFIC = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast", "while",
                      "conditional", "call", "after-all", "partition-id", "replica-id", "iota",
                      "opt-barrier", "copy-start", "copy-done", "send", "recv", "send-done",
                      "recv-done", "async-start", "async-done", "async-update"}

_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([\d,]*)\](\{[^}]*\})?")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")


def dtype_bytes(dtype: str) -> float:
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    if dtype.startswith("f8"):
        return 1
    raise ValueError(f"unknown HLO element type {dtype!r}; add it to hlo._DTYPE_BYTES")


def arrays(type_text: str, *, hbm_only: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in an HLO type (a tuple type lists several). With `hbm_only`,
    arrays whose layout places them in on-chip memory (`S(1)`) are left out."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(type_text):
        if dtype not in _DTYPE_BYTES and not dtype.startswith("f8"):
            continue  # token[], etc.
        if hbm_only and layout and "S(1)" in layout:
            continue
        out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def type_bytes(type_text: str, *, hbm_only: bool = False) -> float:
    return sum(dtype_bytes(t) * math.prod(d) for t, d in arrays(type_text, hbm_only=hbm_only))


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group that opens at text[start]."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO: {text[start:start + 80]!r}")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    type: str          # result type, e.g. "bf16[8,128]{1,0}" or a tuple "(f32[], s32[])"
    opcode: str
    operands: tuple[str, ...]  # operand names
    attrs: str         # everything after the operand list
    args: str = ""     # the text inside the operand list (a constant's literal)

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=", self.attrs)
        if not m:
            return None
        start = m.end()
        if self.attrs[start] in "{[(":
            return self.attrs[start:_balanced(self.attrs, start)]
        return re.match(r"[^,\s]*", self.attrs[start:])[0]


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    name, rest = m.groups()
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:  # an array type: up to the first space outside brackets
        end, depth = 0, 0
        while end < len(rest) and not (rest[end] == " " and depth == 0):
            depth += rest[end] in "([{"
            depth -= rest[end] in ")]}"
            end += 1
    type_text, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _balanced(rest, op.end() - 1)
    operands = tuple(re.findall(r"%([\w.\-]+)", rest[op.end():close - 1]))
    return Instruction(name, type_text, op[1], operands, rest[close:].lstrip(", "),
                       rest[op.end():close - 1].strip())


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instruction]]  # in text order: callees before callers
    entry: str

    @classmethod
    def parse(cls, text: str) -> "Module":
        computations, entry, current = {}, None, None
        for line in text.splitlines():
            header = _COMPUTATION.match(line)
            if header:
                current = header[1]
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            elif line.strip() == "}":
                current = None
            elif current is not None:
                inst = _parse_instruction(line)
                if inst is not None:
                    computations[current].append(inst)
        if entry is None:
            raise ValueError("no ENTRY computation in the HLO text: pass compiled.as_text()")
        return cls(computations, entry)

    def types(self, computation: str) -> dict[str, str]:
        return {i.name: i.type for i in self.computations[computation]}

    def trip_count(self, loop: Instruction) -> int | None:
        """Iterations of a `while`: XLA's known_trip_count if it recorded one, else N from a
        condition `i < N` on a counter that starts at 0 (how lax.scan / fori_loop lower)."""
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
        if known:
            return int(known[1])
        condition = self.computations.get((loop.attr("condition") or "").lstrip("%"), [])
        limits = {i.name: int(i.args) for i in condition
                  if i.opcode == "constant" and re.fullmatch(r"-?\d+", i.args)}
        for inst in condition:
            if inst.opcode == "compare" and "direction=LT" in inst.attrs and inst.operands[1:]:
                if inst.operands[1] in limits:
                    return limits[inst.operands[1]]
        return None

    def execution_counts(self) -> tuple[dict[str, int], dict[str, str], int]:
        """({computation: executions per step}, {computation: how it is called}, loops whose trip
        count could not be read, counted once)."""
        counts = collections.Counter({self.entry: 1})
        role: dict[str, str] = {self.entry: "entry"}
        unknown = 0
        for name in reversed(list(self.computations)):  # callers come after their callees
            runs = counts.get(name, 0)
            for inst in self.computations[name]:
                if inst.opcode.endswith("-done") or inst.opcode == "async-update":
                    continue
                trips = 1
                if inst.opcode == "while":
                    trips = self.trip_count(inst)
                    if trips is None:
                        unknown, trips = unknown + 1, 1
                for key in ("body", "condition", "calls", "to_apply", "true_computation",
                            "false_computation", "branch_computations", "called_computations"):
                    value = inst.attr(key)
                    if not value:
                        continue
                    for callee in re.findall(r"%?([\w.\-]+)", value.strip("{}")):
                        if callee not in self.computations:
                            continue
                        counts[callee] += runs * (trips if key in ("body", "condition") else 1)
                        role.setdefault(callee, "fused" if inst.opcode == "fusion" and key == "calls"
                                        else "reducer" if key == "to_apply" else "control")
        return dict(counts), role, unknown


def group_size(inst: Instruction, num_devices: int) -> int:
    """How many chips take part in one group of a collective: `replica_groups={{0,1},{2,3}}`, the
    iota form `replica_groups=[G,S]<=[N]` (G groups of S), or none / `{}` (every chip)."""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", inst.attrs)
    if iota:
        return int(iota[2])
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", inst.attrs)
    return len(listed[1].split(",")) if listed else num_devices


@dataclasses.dataclass
class StepCost:
    """Per chip, per execution of the program (one train step)."""
    collective_bytes: dict[str, float]   # buffer bytes by kind (module doc)
    collective_count: dict[str, int]     # executions by kind
    wire_bytes: float                    # bytes a chip sends in ring implementations, all kinds
    flops: float                         # dot + convolution FLOPs
    hbm_bytes: float                     # operands + results of unfused instructions
    unknown_trip_counts: int             # while loops counted once because no trip count was found
    opaque_calls: int = 0                # custom-call executions whose FLOPs are unknown (not counted)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _dot_flops(inst: Instruction, types: dict[str, str]) -> float:
    out = math.prod(math.prod(d) for _, d in arrays(inst.type)[:1])
    if inst.opcode == "dot":
        lhs = arrays(types.get(inst.operands[0], ""))
        dims = inst.attr("lhs_contracting_dims") or "{}"
        contracted = math.prod(lhs[0][1][int(i)] for i in re.findall(r"\d+", dims)) if lhs else 0
        return 2.0 * out * contracted
    # convolution: 2 · (output elements / output window positions) · (input features) · Σ over output
    # window positions of the kernel taps that land on an input element. XLA:TPU writes dots with
    # batch dimensions (heads) as convolutions over a padded "spatial" head axis where only one tap
    # per output lands on data, so taps are counted exactly from the window, per spatial dimension.
    lhs, kernel = arrays(types.get(inst.operands[0], "")), arrays(types.get(inst.operands[1], ""))
    m = re.match(r"([^_]*)_([^-]*)->(.*)", inst.attr("dim_labels") or "")
    if not lhs or not kernel or not m or "i" not in m[2]:
        return 0.0
    lhs_labels, kernel_labels, out_labels = m[1], m[2], m[3]
    ldims, kdims, odims = lhs[0][1], kernel[0][1], arrays(inst.type)[0][1]
    window = _window(inst.attr("window") or "{}")
    per_position, positions = 1.0, 1
    for j, c in enumerate(sorted(ch for ch in kernel_labels if ch.isdigit())):
        size_in, size_k, size_out = ldims[lhs_labels.index(c)], kdims[kernel_labels.index(c)], odims[out_labels.index(c)]
        get = lambda key, default: window.get(key, [default] * (j + 1))[j]
        o = np.arange(size_out)[:, None]
        k = np.arange(size_k)[None, :]
        lhs_dilate = int(get("lhs_dilate", 1))
        pos = o * int(get("stride", 1)) + k * int(get("rhs_dilate", 1)) - int(get("pad", "0_0").split("_")[0])
        valid = (pos >= 0) & (pos <= (size_in - 1) * lhs_dilate) & (pos % lhs_dilate == 0)
        per_position *= float(valid.sum())
        positions *= size_out
    return 2.0 * (out / positions) * kdims[kernel_labels.index("i")] * per_position


def _window(text: str) -> dict[str, list[str]]:
    """`{size=1x4 pad=0_0x3_3 stride=1x3}` -> {"size": ["1", "4"], "pad": ["0_0", "3_3"], ...}."""
    return {k: v.split("x") for k, v in re.findall(r"(\w+)=([\w_]+)", text.strip("{}"))}


_SLICING = ("dynamic-slice", "slice", "gather")


def _memory_traffic(module: Module, inst: Instruction, types: dict[str, str]) -> float:
    """Bytes an unfused instruction moves to and from HBM: its operands and results, except that
    a slice reads only its result's worth, and an in-place dynamic-update-slice (a scan writing one
    layer's slot of a stacked buffer) writes only the update. Inside a fusion the same holds for a
    parameter that is only sliced and for a root that updates a parameter in place."""
    if inst.opcode in _SLICING:
        return 2 * type_bytes(inst.type, hbm_only=True)
    if inst.opcode == "dynamic-update-slice":
        return 2 * type_bytes(types.get(inst.operands[1], ""), hbm_only=True)
    operand_bytes = [type_bytes(types.get(o, ""), hbm_only=True) for o in inst.operands]
    result_bytes = type_bytes(inst.type, hbm_only=True)
    fused = module.computations.get((inst.attr("calls") or "").lstrip("%")) if inst.opcode == "fusion" else None
    if fused:
        ftypes = {i.name: i.type for i in fused}
        params = {int(i.args): i.name for i in fused if i.opcode == "parameter" and i.args.isdigit()}
        users: dict[str, list[Instruction]] = {}
        for i in fused:
            for o in i.operands:
                users.setdefault(o, []).append(i)
        def sliced(comp: list[Instruction], name: str, depth: int = 0) -> float | None:
            """Bytes read from `name` in `comp` if every use (through bitcasts and nested fusions)
            only slices it; None when some use reads all of it."""
            use = [i for i in comp if name in i.operands]
            if not use or depth > 6:
                return None
            total = 0.0
            for u in use:
                inner = None
                if u.opcode in _SLICING:
                    inner = type_bytes(u.type, hbm_only=True)
                elif u.opcode == "bitcast":
                    inner = sliced(comp, u.name, depth + 1)
                elif u.opcode == "fusion":
                    body = module.computations.get((u.attr("calls") or "").lstrip("%"), [])
                    inner_params = {int(i.args): i.name for i in body if i.opcode == "parameter" and i.args.isdigit()}
                    parts = [sliced(body, inner_params[k], depth + 1)
                             for k, o in enumerate(u.operands) if o == name and k in inner_params]
                    inner = None if not parts or None in parts else sum(parts)
                if inner is None:
                    return None
                total += inner
            return total

        root = fused[-1]
        outputs = [next((i for i in fused if i.name == o), None) for o in root.operands] \
            if root.opcode == "tuple" else [root]
        in_place = {o.operands[0]: o for o in outputs if o is not None and o.opcode == "dynamic-update-slice"}
        if in_place:  # a multi-output fusion writes only the updated slot of each buffer it updates
            result_bytes = sum(type_bytes(ftypes.get(o.operands[1], ""), hbm_only=True)
                               if o.opcode == "dynamic-update-slice" else type_bytes(o.type, hbm_only=True)
                               for o in outputs if o is not None)
        for index, name in params.items():
            if index >= len(operand_bytes):
                continue
            if name in in_place and all(u is in_place[name] for u in users.get(name, [])):
                operand_bytes[index] = 0.0  # updated in place
            elif (read := sliced(fused, name)) is not None:
                operand_bytes[index] = read
    return result_bytes + sum(operand_bytes)


# Matmuls of the splash attention kernels by the name the kernel gives its custom call.
_SPLASH_MATMULS = {"splash_mha_fwd": 2, "splash_mha_dq": 3, "splash_mha_dkv": 4}


def _splash_flops(inst: Instruction, types: dict[str, str]) -> float | None:
    """FLOPs of one splash kernel call, or None when `inst` is another custom call."""
    kernel = next((k for k in _SPLASH_MATMULS if inst.name.startswith(k)), None)
    if kernel is None:
        return None
    for operand in inst.operands:
        found = arrays(types.get(operand, ""))
        if found and found[0][0].startswith(("f", "bf")) and len(found[0][1]) >= 3:
            dims = found[0][1]
            return _SPLASH_MATMULS[kernel] * math.prod(dims) * dims[-2]
    return None


def step_cost(text: str, num_devices: int) -> StepCost:
    """Collectives, matmul FLOPs and HBM traffic of one execution of a compiled program, per chip."""
    module = Module.parse(text)
    counts, role, unknown = module.execution_counts()
    coll_bytes: dict[str, float] = collections.defaultdict(float)
    coll_count: dict[str, int] = collections.defaultdict(int)
    wire = flops = hbm = 0.0
    opaque = 0
    for name, instructions in module.computations.items():
        runs = counts.get(name, 0)
        if not runs:
            continue
        types = module.types(name)
        for inst in instructions:
            kind = inst.opcode.removesuffix("-start")
            if kind in COLLECTIVES and not inst.opcode.endswith("-done"):
                operand = sum(type_bytes(types.get(o, "")) for o in inst.operands)
                n = group_size(inst, num_devices)
                if kind == "all-gather":
                    moved, sent = operand * n, operand * (n - 1)
                elif kind == "all-reduce":
                    moved, sent = operand, 2 * operand * (n - 1) / n
                elif kind == "collective-permute":
                    moved, sent = operand, operand
                else:  # reduce-scatter, all-to-all
                    moved, sent = operand, operand * (n - 1) / n
                coll_bytes[kind] += moved * runs
                coll_count[kind] += runs
                wire += sent * runs
            if inst.opcode in ("dot", "convolution"):
                flops += _dot_flops(inst, types) * runs
            elif inst.opcode == "custom-call":
                kernel_flops = _splash_flops(inst, types)
                if kernel_flops is None:
                    opaque += runs * ('custom_call_target="tpu_custom_call"' in inst.attrs)
                else:
                    flops += kernel_flops * runs
            if role.get(name) in ("entry", "control") and inst.opcode not in _NO_MEMORY_TRAFFIC \
                    and not inst.opcode.endswith("-done"):
                hbm += runs * _memory_traffic(module, inst, types)
    return StepCost(dict(coll_bytes), dict(coll_count), wire, flops, hbm, unknown, opaque)
