"""Multi-slice (DCN) meshes: placement, config errors, what crosses slices in the compiled TPU step, and a
2-process CPU run in which each process stands in for one slice.

The TPU programs are compiled ahead of time for two slices of a topology (libtpu, compile-only devices).
XLA:TPU lowers every collective that crosses slices to megascale send/recv pairs; aot.dcn_transfers reads
which devices each pair connects, and the tests map those devices back to mesh coordinates.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from chameleon_jax import aot
from chameleon_jax.config import validate
from chameleon_jax.model import sharding as shd
from chameleon_jax.train import metrics as metrics_lib
from launch import local
from test_config import load

REPO = Path(__file__).resolve().parents[1]


def test_hybrid_mesh_splits_only_the_dcn_axis_across_slices():
    devices = aot.topology_devices("v5e:2x2", slices=2)
    for axis in ("data", "fsdp"):
        mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2, slices=2, dcn_axis=axis), devices)
        slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
        assert sorted(slice_of.ravel()) == [0] * 4 + [1] * 4
        # The slice changes along the DCN axis and along no other: it is a function of that coordinate.
        for j, other in enumerate(shd.MESH_AXES):
            spread = np.ptp(slice_of, axis=j)
            assert (spread.max() > 0) == (other == axis), (axis, other, slice_of)


def test_slice_settings_are_checked_with_errors_that_name_the_fix():
    config = load("chameleon_7b")  # data=1, fsdp=-1
    config.mesh.slices = 2
    with pytest.raises(ValueError, match=r"--config.mesh.data=2"):
        shd.slice_layout(config.mesh, 16)
    config.mesh.data = 2
    assert shd.slice_layout(config.mesh, 16) == ((1, 8, 1), (2, 1, 1))
    with pytest.raises(ValueError, match="choose one of"):
        shd.slice_layout(dict(data=2, fsdp=1, tensor=1, slices=2, dcn_axis="model"), 2)
    # One CPU process is one "slice": asking for two must say what was found.
    import jax
    with pytest.raises(ValueError, match=r"set --config.mesh.slices=1"):
        shd.make_mesh(dict(data=2, fsdp=4, tensor=1, slices=2), jax.devices())
    # Devices of two TPU slices behind a one-slice config: jax.make_mesh would refuse them.
    with pytest.raises(ValueError, match=r"set --config.mesh.slices=2"):
        shd.make_mesh(dict(data=-1, fsdp=1, tensor=1), aot.topology_devices("v5e:2x2", slices=2))


def crossing(report) -> set[str]:
    """The mesh axes that cross-slice transfers connect, e.g. {'data'}."""
    return {axes for key in report.dcn for axes in key.split(" over ")[1].split("+")}


def megascale_sends(compiled) -> int:
    return sum(" send(" in line and "megascale" in line for line in compiled.as_text().splitlines())


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_tiny_two_slices_only_data_crosses(topology):
    config = load("tiny")
    config.mesh.update(data=2, fsdp=2, tensor=2, slices=2)
    report, compiled = aot.compile_train_step(config, topology)
    assert compiled is not None and report.chips == 8 and report.slices == 2 and report.fits
    # Every megascale send of the program is accounted for, and each connects devices that differ only
    # in their data coordinate; the fsdp and tensor collectives stay inside a slice (they exist).
    assert sum(v["count"] for v in report.dcn.values()) == megascale_sends(compiled) > 0
    assert crossing(report) == {"data"}, report.dcn
    assert "ALL_REDUCE over data" in report.dcn  # the gradient reduction
    assert "replica_groups=" in compiled.as_text()
    assert "cross-slice (DCN)" in "\n".join(report.lines())


def seven_b_widths_one_layer():
    """The 7B as configured (d_model 4096, 32 heads, FFN 11008, vocab 65,536, bf16, dropout, remat, scanned
    layers, splash attention on TPU) with one layer and a batch of 8 x 128, so that its TPU compile fits in CI.

    Which collectives cross slices depends on the mesh and on the shardings of the parameters and of the
    batch, the same at any depth, length and batch size. The compile time does not: process CPU seconds for
    2 x v5p:2x2x1, measured on this 2-vCPU machine under `nice` (the whole step, imports included):
      32 layers, 2048 x 4096, 32 microbatches (the 7B run)      out of HBM after 143 s (155 GiB temporaries)
      2 layers, 16 x 256                                        174 s
      1 layer,  16 x 256                                        105 s
      1 layer,  16 x 256, dropout 0, remat none, XLA attention   84 s
      1 layer,   8 x 128                                         41 s
      1 layer,   8 x 128, dropout 0, remat none                  43 s  (splash), 41 s (XLA attention)
    and for 2 x v5e:2x2 at 1 layer, 8 x 128: 63 s (49 s with dropout 0 and remat none, 57 s unscanned);
    the tiny step takes 8 s. Figures under load vary by about 10-20%.
    Length and batch dominate: at 128 positions the loss is one 128-position chunk (two at 256) and the
    per-device activations are a quarter, while dropout, remat and the attention kernel no longer matter, so
    the test keeps them as the 7B has them. 128 is the shortest length splash takes, and 8 rows are one per
    data x fsdp shard.
    """
    config = load("chameleon_7b")
    config.model.n_layers = 1
    config.train.update(batch_size=8, seq_len=128, microbatches=1)
    config.mesh.update(data=2, slices=2)  # fsdp=-1: the 4 chips of each slice
    return config


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_7b_widths_two_slices_only_data_crosses(topology):
    config = seven_b_widths_one_layer()
    widths = validate(config)
    assert (widths.d_model, widths.n_heads, widths.ffn_dim, widths.vocab_size) == (4096, 32, 11008, 65_536)
    report, compiled = aot.compile_train_step(config, topology)
    memory = "\n".join(report.lines())  # per-chip memory and the DCN table, shown by any failure below
    assert compiled is not None and report.chips == 8 and report.slices == 2 and report.fits, memory
    assert report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}, memory
    # Every megascale send is accounted for and connects devices that differ only in their data
    # coordinate: the fsdp weight all-gathers and gradient reduce-scatters of the 7B stay inside a slice.
    assert sum(v["count"] for v in report.dcn.values()) == megascale_sends(compiled) > 0, memory
    assert crossing(report) == {"data"}, memory
    assert "ALL_REDUCE over data" in report.dcn, memory  # the gradient reduction
    print(memory)


def test_the_analysis_sees_another_axis_across_slices():
    # The control: with fsdp across slices, its collectives (weight all-gathers, gradient
    # reduce-scatters) go over DCN and the data axis no longer does.
    config = load("tiny")
    config.mesh.update(data=2, fsdp=2, tensor=2, slices=2, dcn_axis="fsdp")
    report, _ = aot.compile_train_step(config, "v5e:2x2")
    collectives = {k: v for k, v in report.dcn.items() if not k.startswith("ONE_TO_ONE")}
    assert {"ALL_GATHER over fsdp", "REDUCE_SCATTER over fsdp"} <= set(collectives), report.dcn
    assert crossing(report) - {"tensor"} == {"fsdp"}, report.dcn
    # A resharding copy may move a few ids diagonally (fsdp and tensor both change), never a collective.
    assert all(k.endswith("over fsdp") for k in collectives), report.dcn


def train_command(workdir, slices):
    return [sys.executable, "-m", "chameleon_jax.train", "--config", str(REPO / "experiments/tiny.py"),
            "--workdir", str(workdir), "--config.train.steps=8", "--config.train.log_every=2",
            "--config.checkpoint.every=8", "--config.train.eval_every=0", "--config.mesh.data=2",
            "--config.mesh.fsdp=2", "--config.mesh.tensor=1", f"--config.mesh.slices={slices}",
            "--config.train.peak_flops=1e11"]


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(workdir) if "train/loss" in r}


def test_two_processes_as_two_slices_train_like_one_slice(tmp_path, capfd):
    # Two processes x 2 devices, data across the processes (process_is_granule), fsdp inside each.
    rc = local.run(train_command(tmp_path / "two", slices=2), processes=2, devices=2, timeout_s=240)
    if rc in (124, 137):
        # Once in several runs on a loaded 2-vCPU machine both processes stopped making progress after a
        # few steps until the launcher's timeout; it did not come back in 10 runs under load nor with one
        # process stopped for 45 s mid-run. That stall is an open bug, reported as a warning with the
        # Python stacks the launcher asked the processes for before the timeout; a second run from the
        # checkpoint-free start must then finish, and a stall on both attempts fails the test.
        out, err = capfd.readouterr()
        print(out, file=sys.stdout)
        print(err, file=sys.stderr)
        stacks = out[out.find("Thread 0x"):][-12_000:] if "Thread 0x" in out else "(no stacks printed)"
        warnings.warn(f"the 2-slice run stalled (launcher status {rc}); running it once more. Where the "
                      f"processes waited:\n{stacks}")
        rc = local.run(train_command(tmp_path / "two_again", slices=2), processes=2, devices=2, timeout_s=240)
        two_dir = tmp_path / "two_again"
    else:
        two_dir = tmp_path / "two"
    assert rc == 0
    # The same global batch and mesh sizes on one process with 4 devices.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", PYTHONPATH=str(REPO))
    done = subprocess.run(train_command(tmp_path / "one", slices=1), env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = losses(two_dir), losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == [2, 4, 6, 8]
    # Same math, other reduction order (the 2-process batch holds the rows in another order, and the
    # gradient sums over data run across processes): fp32 sums of ~1e3 terms differ by ~1e-7 relative per
    # step, and 8 Adam steps at warm-up learning rates keep the loss within 1e-5 relative.
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
