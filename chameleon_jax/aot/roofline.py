"""A roofline ESTIMATE of a train step's time and MFU from a chip's datasheet figures.

Nothing here is measured on a TPU. Three lower bounds on the step time, per chip:

    compute  = FLOPs the compiled program executes / peak bf16 FLOP/s
    memory   = HBM bytes the program reads and writes / HBM bandwidth
    network  = bytes the chip sends in collectives / ICI egress bandwidth

The estimate is their maximum (perfect overlap of compute, memory traffic and collectives); their
sum is the no-overlap bound. MFU = model FLOPs (analytic, chameleon_jax.model.flops: no remat
recomputation) / (step time · peak). ICI egress is half the datasheet's bidirectional per-chip
figure, i.e. every link of the chip busy in both directions: a best case for collectives.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float         # bf16 FLOP/s per chip
    hbm_bandwidth: float      # bytes/s per chip
    ici_bidirectional: float  # bytes/s per chip, both directions, all links
    source: str

    @property
    def ici_egress(self) -> float:
        return self.ici_bidirectional / 2


# Google Cloud TPU documentation, system architecture tables (read 2026-12-02).
CHIPS = {
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v6e": Chip("TPU v6e", 918e12, 1638e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"),
}


def chip(topology: str) -> Chip:
    generation = topology.split(":", 1)[0].lower()
    if generation not in CHIPS:
        raise ValueError(f"No datasheet figures for {generation!r} (topology {topology!r}); "
                         f"known: {sorted(CHIPS)}. Add a Chip to chameleon_jax.aot.roofline.CHIPS.")
    return CHIPS[generation]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Seconds per step per chip, and MFU, as estimated from datasheet peaks."""
    compute_s: float
    memory_s: float
    network_s: float
    step_s: float         # max of the three (full overlap)
    serial_step_s: float  # sum of the three (no overlap)
    mfu: float            # model FLOPs / (step_s · peak)
    serial_mfu: float
    bound: str            # which term sets step_s

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def estimate(c: Chip, *, flops: float, hbm_bytes: float, wire_bytes: float, model_flops: float) -> Estimate:
    """All arguments per chip per step: executed FLOPs, HBM bytes, bytes sent over ICI, model FLOPs."""
    terms = {"compute": flops / c.peak_flops, "memory": hbm_bytes / c.hbm_bandwidth,
             "network": wire_bytes / c.ici_egress}
    step = max(terms.values())
    serial = sum(terms.values())
    return Estimate(terms["compute"], terms["memory"], terms["network"], step, serial,
                    model_flops / (step * c.peak_flops) if step else 0.0,
                    model_flops / (serial * c.peak_flops) if serial else 0.0,
                    max(terms, key=terms.get))
