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
    # convolution: each output element takes (kernel elements / kernel output features) MACs.
    kernel = arrays(types.get(inst.operands[1], ""))
    labels = inst.attr("dim_labels") or ""
    m = re.match(r"[^_]*_([^-]*)->", labels)
    if not kernel or not m or "o" not in m[1]:
        return 0.0
    dims = kernel[0][1]
    return 2.0 * out * math.prod(dims) / dims[m[1].index("o")]


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
                hbm += runs * (type_bytes(inst.type, hbm_only=True)
                               + sum(type_bytes(types.get(o, ""), hbm_only=True) for o in inst.operands))
    return StepCost(dict(coll_bytes), dict(coll_count), wire, flops, hbm, unknown, opaque)
