"""Object storage wherever a path goes, against a real local GCS server (the `gcs` fixture, tests/gcs.py).

Unit checks of each remote-capable writer and reader (metrics, TensorBoard, token shards, exports), then
one end-to-end run: pretokenize to gs://, train with --workdir gs://, kill -9 mid-run and mid-save, resume
bitwise against an uninterrupted run, eval, export and generate from gs://.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from etils import epath

from chameleon_jax import checkpoint as ckpt
from chameleon_jax import storage
from chameleon_jax import vocab as V
from chameleon_jax.data import records, shards
from chameleon_jax.train import metrics as metrics_lib


def test_paths_stay_urls():
    assert storage.is_remote("gs://b/run") and not storage.is_remote("/tmp/run")
    assert os.fspath(storage.resolve("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
    assert os.fspath(storage.resolve("rel")) == os.path.abspath("rel")


def test_metrics_and_tensorboard_on_gcs_rewrite_whole_objects_and_resume(gcs):
    workdir = gcs.new_bucket() + "/run"
    writer = metrics_lib.MetricsWriter(workdir)
    for step in (2, 4, 6):
        writer.write(step, {"train/loss": 1.0 / step})
        # Each write is durable at once (a run killed after it keeps it): the object holds every line so far.
        assert [r["step"] for r in metrics_lib.read_metrics(workdir)] == list(range(2, step + 1, 2))
    writer.close()
    events = gcs.object_sizes(workdir + "/tensorboard")
    assert events and all("tfevents" in name and size > 0 for name, size in events.items()), events

    # A resume from step 4 drops step 6 (written past the last checkpoint), then continues; no line is lost
    # (an append on GCS would silently overwrite the object with the new lines only).
    writer = metrics_lib.MetricsWriter(workdir, resume_step=4)
    writer.write(6, {"train/loss": 0.5})
    writer.write(8, {"train/loss": 0.25})
    writer.close()
    got = [(r["step"], r["train/loss"]) for r in metrics_lib.read_metrics(workdir)]
    assert got == [(2, 0.5), (4, 0.25), (6, 0.5), (8, 0.25)]
    assert not epath.Path("gs:").exists() and not os.path.exists("gs:")  # nothing leaked to ./gs:/


def _docs(voc, n, seed=0):
    rng = np.random.default_rng(seed)
    return [records.interleaved_tokens([rng.integers(voc.text_start, voc.size, rng.integers(5, 30)),
                                        records.Image(rng.integers(0, 16, (2, 2)))], voc) for _ in range(n)]


def test_token_shards_written_to_and_read_from_gcs(gcs, tmp_path, monkeypatch):
    voc = V.custom(text_pieces=100, image_codes=16)
    source = gcs.new_bucket() + "/tok"
    docs = _docs(voc, 12)
    for i in range(2):
        part = docs[i * 6:(i + 1) * 6]
        shards.write_shard(f"{source}/s{i:05d}", [records.serialize(d) for d in part], {
            "documents": len(part), "tokens": {"all": int(sum(map(len, part)))}, "skipped": [],
            "max_image_block": 6, "vocab": dataclasses.asdict(voc)})
        assert shards.is_finished(f"{source}/s{i:05d}")
    manifest = shards.write_manifest(source)
    assert manifest["documents"] == 12
    assert json.loads(epath.Path(source, "manifest.json").read_text()) == manifest

    info = shards.read_source(source)
    assert info.documents == 12 and all(p.startswith(source + "/") for p in info.shards)
    assert shards.match_sources(source.rsplit("/", 1)[0] + "/to*") == [source]
    monkeypatch.setenv("CHAMELEON_JAX_CACHE", str(tmp_path / "cache"))
    local = shards.readable_paths(info)
    assert all(p.startswith(str(tmp_path / "cache")) for p in local)
    assert shards.readable_paths(info) == local  # cached: the same files, not fetched again

    from array_record.python.array_record_module import ArrayRecordReader

    got = []
    for p in local:
        reader = ArrayRecordReader(p)
        got += [records.deserialize(r) for r in reader.read_all()]
        reader.close()
    assert len(got) == len(docs)
    for a, b in zip(got, docs):
        np.testing.assert_array_equal(a["tokens"], b)

    # A rewritten shard (another object generation) is fetched again, not served stale from the cache.
    shards.write_shard(f"{source}/s00000", [records.serialize(d) for d in docs[:3]], {
        "documents": 3, "tokens": {"all": 1}, "skipped": [], "max_image_block": 6,
        "vocab": dataclasses.asdict(voc)})
    again = shards.readable_paths(shards.read_source(source))
    assert again[0] != local[0] and again[1] == local[1]


def test_params_export_and_restore_on_gcs(gcs):
    params = {"w": jax.numpy.arange(12.0).reshape(3, 4), "b": {"x": jax.numpy.ones((5,), jax.numpy.int32)}}
    out = gcs.new_bucket() + "/export"
    written = ckpt.export_params(params, out, config={"model": {"d": 1}})
    assert os.fspath(written) == out
    assert ckpt.resolve_step_dir(out) == epath.Path(out)
    assert ckpt.read_config(out).model.d == 1
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                          sharding=jax.sharding.SingleDeviceSharding(
                                                              jax.devices()[0])), params)
    restored = ckpt.restore_params(out, abstract)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(name.startswith("export/state/") for name in gcs.object_sizes(out))
