"""The batch format: what the sources yield matches data.batch, and device_batch shards it as documented."""
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from chameleon_jax.data import batch as batch_lib
from chameleon_jax.data import synthetic
from chameleon_jax.model import sharding as shd


def _synthetic_batch(rows=8, length=32):
    it = synthetic.make_iterator(synthetic.default_config(), batch_size=rows, seq_len=length, image_ids=(4, 68),
                                 vocab_size=128)
    return next(it)


def test_the_synthetic_source_yields_the_documented_batch():
    b = batch_lib.check(_synthetic_batch(), rows=8, length=32)
    assert set(b) == set(batch_lib.FIELDS)
    real = b["segment_ids"] > 0
    # positions restart at 0 at every document start
    starts = real & (np.diff(b["segment_ids"], axis=1, prepend=0) != 0)
    assert np.all(b["positions"][starts] == 0)
    assert np.all(b["loss_mask"][~real] == 0)  # padding never carries loss


@pytest.mark.parametrize("mesh_sizes", [(4, 2, 1), (2, 2, 2)])
def test_device_batch_shards_rows_over_data_and_fsdp(mesh_sizes):
    mesh = shd.make_mesh(ml_collections.ConfigDict(dict(zip(shd.MESH_AXES, mesh_sizes))))
    host = _synthetic_batch()
    for on_device in (batch_lib.device_batch(host, mesh), batch_lib.to_global_batch(host, mesh)):
        for name in batch_lib.FIELDS:
            assert on_device[name].sharding.spec == P(("data", "fsdp"), None), name
            np.testing.assert_array_equal(jax.device_get(on_device[name]), host[name])


def test_check_names_what_is_wrong():
    b = _synthetic_batch()
    with pytest.raises(ValueError, match="missing \\['loss_mask'\\]"):
        batch_lib.check({k: v for k, v in b.items() if k != "loss_mask"})
    with pytest.raises(ValueError, match="positions.*float32"):
        batch_lib.check({**b, "positions": b["positions"].astype(np.float32)})
    with pytest.raises(ValueError, match="expected \\[8, 64\\]"):
        batch_lib.check(b, rows=8, length=64)
