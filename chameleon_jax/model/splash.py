"""Causal self-attention over packed rows with the Pallas TPU splash kernel, sharded under the mesh.

Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) is a flash-attention kernel for
TPU: it streams key/value blocks through VMEM with an online softmax, skips the blocks that the causal
mask empties, and keeps only the output and the per-row logsumexp for the backward pass, where the XLA
path (attention.causal_self_attention) materialises every score block in f32.

Dimension letters as in attention.py: B batch, T length, N query heads, K kv heads, H head_dim.

Semantics against the XLA path: key s is visible to query t iff s <= t and both carry the same segment
id. Rows of segment 0 (padding) attend among themselves here, where the XLA path gives them a uniform
softmax; no other row sees them and the loss masks them, so outputs of real rows and all gradients agree.

Where it runs: `model.attention` ("auto" | "xla" | "splash"); `kernel_for` resolves "auto" to splash
when the step is traced for TPU devices (the active mesh's devices, which are compile-only TPU devices
in an AOT compile from a CPU host) and to the XLA path elsewhere. On CPU the kernel only runs in
Pallas interpret mode, which tests switch on with `options(interpret=True)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from chameleon_jax.model import sharding as shd
from chameleon_jax.model.config import ATTENTION_KERNELS

# The kernel's tiles are multiples of the TPU lane width, so every block size (and thus the length) is.
LANES = 128
# Largest query/key block tried first. 512 is MaxText's default block for splash on v5e/v5p; a length
# that 512 does not divide gets the largest multiple of 128 below it that does.
MAX_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class _Options:
    interpret: bool = False   # run the kernel in Pallas interpret mode (the only mode on CPU)
    max_block: int = MAX_BLOCK


_OPTIONS = [_Options()]


@contextlib.contextmanager
def options(*, interpret: bool = False, max_block: int = MAX_BLOCK):
    """Kernel options while tracing: interpret mode for CPU tests, a smaller block for tiny shapes."""
    if max_block <= 0 or max_block % LANES:
        raise ValueError(f"max_block={max_block} must be a positive multiple of {LANES}.")
    _OPTIONS.append(_Options(interpret=interpret, max_block=max_block))
    try:
        yield
    finally:
        _OPTIONS.pop()


def compile_platform() -> str:
    """The platform of the devices the current trace is for: the active mesh's, else the default backend.

    An AOT compile for a TPU topology runs on a CPU host under `jax.set_mesh(tpu_mesh)`, so the
    mesh, not `jax.default_backend()`, says which kernel the compiled program can hold.
    """
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is not None:
        return device.platform
    return jax.default_backend()


def block_size(seq_len: int, max_block: int = MAX_BLOCK) -> int | None:
    """The largest multiple of 128 up to `max_block` that divides `seq_len`; None when there is none."""
    for block in range(max_block - max_block % LANES, 0, -LANES):
        if seq_len % block == 0:
            return block
    return None


def kernel_for(attention: str, seq_len: int, *, prefill: bool = False) -> str:
    """"xla" or "splash" for self-attention over `seq_len` rows, traced for the current devices.

    An explicit "splash" with a length the kernel cannot tile is an error in training (the length is
    a config value); "auto", and prefill (whose length is the prompt's), fall back to the XLA path.
    """
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"model.attention={attention!r}; choose one of {ATTENTION_KERNELS} "
                         f"('auto' = splash on TPU, the XLA path elsewhere).")
    if attention == "xla":
        return "xla"
    platform = compile_platform()
    on_tpu = platform == "tpu" or _OPTIONS[-1].interpret
    if attention == "auto" and not on_tpu:
        return "xla"
    if not on_tpu:
        raise ValueError(f"model.attention='splash' needs TPU devices, but this step is traced for "
                         f"{platform}; use model.attention='auto' (splash on TPU, XLA elsewhere) or 'xla'.")
    if block_size(seq_len, _OPTIONS[-1].max_block) is None:
        reason = (f"splash attention tiles the sequence in blocks of a multiple of {LANES} rows, and "
                  f"{seq_len} is not a multiple of {LANES}")
        if attention == "splash" and not prefill:
            raise ValueError(f"{reason}; set train.seq_len to a multiple of {LANES} or model.attention='xla'.")
        logging.warning("%s: using the XLA attention for this length.", reason)
        return "xla"
    return "splash"


def _kernel(heads: int, seq_len: int, block: int, interpret: bool):
    """A splash kernel for one example: q [N, T, H], k/v [K, T, H] (K divides N), causal.

    The same block for the forward and both backward kernels; separate dq and dkv kernels (the fused
    backward kernel is newer and was not what the AOT compiles here measured). Built per trace, not
    cached: it holds its block tables as arrays of the trace (the mask analysis itself is cached by jax).
    """
    mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len)) for _ in range(heads)])
    blocks = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                           block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                           block_q_dq=block, block_kv_dq=block)
    # head_shards/q_seq_shards = 1: the kernel is built for the local shard inside shard_map.
    return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _local_attention(q, k, v, q_segment_ids, kv_segment_ids):
    """One shard: q [B, T, N, H], k/v [B, T, K, H], segment ids [B, T] -> [B, T, N, H]."""
    b, t, n, h = q.shape
    opts = _OPTIONS[-1]
    kernel = _kernel(n, t, block_size(t, opts.max_block), opts.interpret)
    # The kernel takes heads first and does not scale the scores.
    q = (q * jnp.asarray(h ** -0.5, q.dtype)).transpose(0, 2, 1, 3)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    segments = sa.SegmentIds(q=q_segment_ids, kv=kv_segment_ids)
    out = jax.vmap(kernel)(q, k, v, segment_ids=segments)
    return out.transpose(0, 2, 1, 3)


def causal_attention(q, k, v, q_segment_ids, kv_segment_ids=None) -> jax.Array:
    """Causal, same-segment self-attention: q [B,T,N,H], k/v [B,T,K,H], segment ids [B,T] -> [B,T,N,H].

    Under a mesh the kernel runs per shard in `jax.shard_map`, with the batch and head axes split as
    the active sharding rules split "batch" and "heads"/"kv_heads" (batch over data×fsdp, heads over
    tensor by default); the sequence and head_dim stay whole on every shard, as the kernel needs.
    """
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    q_segment_ids = q_segment_ids.astype(jnp.int32)
    kv_segment_ids = kv_segment_ids.astype(jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return _local_attention(q, k, v, q_segment_ids, kv_segment_ids)
    rules = dict(shd._ACTIVE_RULES[-1])
    batch, heads, kv_heads = rules.get("batch"), rules.get("heads"), rules.get("kv_heads")
    _check_divides(q.shape[0], batch, mesh, "batch rows")
    _check_divides(q.shape[2], heads, mesh, "query heads")
    _check_divides(k.shape[2], kv_heads, mesh, "kv heads")
    q_spec, kv_spec, seg_spec = P(batch, None, heads, None), P(batch, None, kv_heads, None), P(batch, None)
    sharded = jax.shard_map(_local_attention, mesh=mesh,
                            in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                            out_specs=q_spec, check_vma=False)
    return sharded(q, k, v, q_segment_ids, kv_segment_ids)


def _check_divides(size: int, axes, mesh, what: str) -> None:
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(mesh.shape[a] for a in names)
    if size % shards:
        raise ValueError(f"splash attention splits the {size} {what} over mesh axes {names} "
                         f"({shards} shards), which does not divide them; use a multiple of {shards} "
                         f"or model.attention='xla'.")
