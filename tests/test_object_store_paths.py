"""Object-store URLs that Orbax cannot write to are refused before anything is written."""
from __future__ import annotations

import numpy as np
import pytest

from chameleon_jax import checkpoint


@pytest.mark.parametrize("call", [
    lambda url: checkpoint.make_manager(url + "/checkpoints"),
    lambda url: checkpoint.export_params({"w": np.zeros(2, np.float32)}, url + "/export"),
])
def test_s3_checkpoints_are_refused_with_the_fix_and_nothing_is_written_locally(call, tmp_path, monkeypatch):
    # Orbax 0.12 turns s3://b/run into the local folder ./s3:/b/run and writes part of a step there before
    # failing; the error must come first and name what works.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"local folder or gs:// only.*mount"):
        call("s3://bucket/run")
    assert list(tmp_path.iterdir()) == []
