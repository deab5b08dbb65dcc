"""Writing a params export one block at a time, so an import never holds the whole model in host memory.

A `LazyTensor` stands in for a params leaf: its shape and dtype, and a function that yields the leaf
in blocks along its leading axis (one layer of a stacked `[L, ...]` leaf, or the whole leaf). The
Orbax type handler registered here writes those blocks one after another into the same tensorstore
array that `ocp.type_handlers.NumpyHandler` would write for the materialised leaf (same format, same
`np.ndarray` type string), with one write chunk per block, so `chameleon_jax.checkpoint.restore_params`
reads it like any export. Leaves are written sequentially: at most one block exists at a time.

    params = {"w": LazyTensor((L, D, F), np.float32, lambda: ((i, make_layer(i)) for i in range(L)))}
    chameleon_jax.checkpoint.export_params(params, out_dir, config)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

# Private Orbax helpers: the write spec that NumpyHandler builds (orbax-checkpoint is pinned <0.13).
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handler_registry

Block = tuple[int | tuple[()], np.ndarray]  # (index along the leading axis, or () for the whole leaf; data)


@dataclasses.dataclass(frozen=True, eq=False)
class LazyTensor:
    """A params leaf produced block by block; `blocks()` yields (leading index, block) pairs.

    `stacked`: the blocks are the slices [i] along the leading axis (shape[1:] each); otherwise one block
    is the whole leaf, yielded with index ().
    """
    shape: tuple[int, ...]
    dtype: Any
    blocks: Callable[[], Iterable[Block]]
    stacked: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (1,) + tuple(self.shape[1:]) if self.stacked else tuple(self.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole leaf in memory (tests and small leaves only)."""
        out = np.empty(self.shape, self.dtype)
        for index, block in self.blocks():
            out[index] = block
        return out if dtype is None else out.astype(dtype)

    @classmethod
    def layers(cls, n_layers: int, layer: Callable[[int], np.ndarray], layer_shape: Sequence[int], dtype):
        """A stacked leaf [n_layers, *layer_shape] whose slice i is `layer(i)` cast to `dtype`."""
        dtype = np.dtype(dtype)

        def blocks():
            for i in range(n_layers):
                yield i, _checked(layer(i), tuple(layer_shape), dtype, f"layer {i}")
        return cls((n_layers, *layer_shape), dtype, blocks, stacked=True)

    @classmethod
    def whole(cls, make: Callable[[], np.ndarray], shape: Sequence[int], dtype):
        """An unstacked leaf computed in one go by `make()` when it is written."""
        dtype = np.dtype(dtype)
        return cls(tuple(shape), dtype, lambda: iter([((), _checked(make(), tuple(shape), dtype, "leaf"))]))


def _checked(block: np.ndarray, shape: tuple[int, ...], dtype, what: str) -> np.ndarray:
    block = np.ascontiguousarray(np.asarray(block).astype(dtype, copy=False))
    if block.shape != shape:
        raise ValueError(f"{what}: produced shape {block.shape}, the leaf promises {shape}")
    return block


class _LazyTensorHandler(ocp.type_handlers.NumpyHandler):
    """NumpyHandler's on-disk format, written block by block and leaf by leaf."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def _background_serialize(self, values, infos, args=None):
        from orbax.checkpoint._src.multihost import multihost

        for value, info, arg in zip(values, infos, args or [ocp.SaveArgs()] * len(values)):
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info=info, arg=arg, global_shape=value.shape, local_shape=value.block_shape, dtype=value.dtype,
                use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
                metadata_key=self._metadata_key).json
            if multihost.process_index() != 0:
                continue
            store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
            for index, block in value.blocks():
                # The block is neither changed nor freed before the write completes: let tensorstore encode
                # from it instead of taking its own copy.
                await store[index].write(block, can_reference_source_data_indefinitely=True)
                del block  # the next block is made only after this one is written and dropped


# Shares NumpyHandler's type string on purpose (the files are a numpy leaf's): no collision warning.
type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(LazyTensor, _LazyTensorHandler(), override=True,
                                                       ignore_warnings=True)
