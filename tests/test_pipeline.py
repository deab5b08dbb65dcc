"""Grain pipeline: packing invariants, mixture weights, stages, host slices, exact resume, bad input."""
import dataclasses
import logging
import os

import grain
import numpy as np
import pytest

from chameleon_jax import vocab as V
from chameleon_jax.data import packing, pipeline, records, shards

VOC = V.custom(text_pieces=100, image_codes=16)


def _doc(rng, lo, hi, n_images, text_len=(1, 12), side=2):
    segs = []
    for _ in range(n_images):
        segs.append(rng.integers(VOC.text_start + lo, VOC.text_start + hi, rng.integers(*text_len)))
        segs.append(records.Image(rng.integers(0, 16, (side, side))))
    segs.append(rng.integers(VOC.text_start + lo, VOC.text_start + hi, rng.integers(*text_len)))
    return records.interleaved_tokens(segs, VOC)


def _write_source(path, docs, shard_size=40):
    os.makedirs(path, exist_ok=True)
    for s in range(0, len(docs), shard_size):
        part = docs[s:s + shard_size]
        shards.write_shard(os.path.join(path, f"s{s:05d}"), [records.serialize(d) for d in part], {
            "documents": len(part), "tokens": {"all": int(sum(map(len, part)))}, "skipped": [],
            "max_image_block": 6, "vocab": dataclasses.asdict(VOC)})
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("src")
    a = [_doc(rng, 0, 40, rng.integers(0, 3)) for _ in range(120)]  # text ids 0..39, with images
    b = [_doc(rng, 40, 100, 0, text_len=(30, 60)) for _ in range(80)]  # text ids 40..99, long text
    return {"a": _write_source(str(root / "a"), a), "b": _write_source(str(root / "b"), b)}, {"a": a, "b": b}


def _config(paths, **kw):
    c = pipeline.default_config()
    c.sources = dict(paths)
    c.seq_len, c.global_batch_size = 48, 4
    c.update(kw)
    return c


def test_packing_loses_nothing_duplicates_nothing_and_keeps_images_whole():
    rng = np.random.default_rng(1)
    docs = [_doc(rng, 0, 100, rng.integers(0, 4), side=3) for _ in range(60)]  # some longer than seq_len
    L = 24
    # Random loss masks (as SFT writes: 0 on prompts, 1 on answers) must travel with their tokens.
    masks = [rng.integers(0, 2, len(d)).astype(np.int32) for d in docs]
    ds = grain.MapDataset.source([{"tokens": d, "loss_mask": m} for d, m in zip(docs, masks)]).to_iter_dataset()
    ds = grain.experimental.FlatMapIterDataset(ds, packing.SplitLongDocuments(L, VOC))
    rows = list(packing.pack(ds, L, num_packing_bins=4, seed=0, pad_id=VOC.pad))
    pieces = []
    for r in rows:
        assert r["tokens"].shape == (L,) and all(v.dtype == np.int32 for v in r.values())
        pad = r["segment_ids"] == 0
        assert np.all(r["tokens"][pad] == VOC.pad) and np.all(r["loss_mask"][pad] == 0)
        for s in np.unique(r["segment_ids"][~pad]):
            idx = np.flatnonzero(r["segment_ids"] == s)
            assert np.all(np.diff(idx) == 1)  # a segment is one contiguous run
            np.testing.assert_array_equal(r["positions"][idx], np.arange(len(idx)))
            pieces.append(tuple(zip(r["tokens"][idx].tolist(), r["loss_mask"][idx].tolist())))
    # Every piece keeps each image whole: begin, exactly 9 codes, end.
    for p in pieces:
        p = np.array(p)[:, 0]
        for b in np.flatnonzero(p == VOC.begin_image):
            assert b + 10 < len(p) and p[b + 10] == VOC.end_image and VOC.is_image(p[b + 1:b + 10]).all()
        assert (p == VOC.begin_image).sum() == (p == VOC.end_image).sum()
    # Reassembling the pieces gives back exactly the documents: nothing lost, nothing duplicated.
    assert sum(map(len, pieces)) == sum(map(len, docs))
    starts = sorted(p for p in pieces if p[0][0] == VOC.bos)
    assert len(starts) == len(docs)
    # ...with each token's own loss mask.
    expected = sorted(tuple(zip(d[b:e].tolist(), m[b:e].tolist()))
                      for d, m in zip(docs, masks) for b, e in packing.split_document(d, L, VOC))
    assert sorted(pieces) == expected


def test_split_prefers_image_boundaries_and_skips_images_longer_than_seq_len():
    d = records.interleaved_tokens([np.full(10, VOC.text_start), records.Image(np.zeros((3, 3), int)),
                                    np.full(3, VOC.text_start)], VOC)  # 1+10+11+3+1 = 26
    assert packing.split_document(d, 24, VOC) == [(0, 22), (22, 26)]  # cut right after the image
    assert packing.split_document(d, 10, VOC) is None  # an 11-token image cannot fit 10


def test_batches_follow_the_conventions(sources):
    it = pipeline.make_train_iterator(_config(sources[0]), process_index=0, process_count=1)
    b = next(it)
    assert set(b) == {"tokens", "segment_ids", "positions", "loss_mask"}
    assert all(v.shape == (4, 48) and v.dtype == np.int32 for v in b.values())
    assert np.all(b["loss_mask"][b["segment_ids"] == 0] == 0) and b["loss_mask"].sum() > 0
    assert (b["segment_ids"] > 0).mean() > 0.7  # packing fills rows


def _token_share_of_a(batches):
    toks = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
    text = toks[toks >= VOC.text_start] - VOC.text_start
    return np.mean(text < 40), toks


@pytest.mark.parametrize("unit", ["tokens", "documents"])
def test_mixture_weights_hold_over_many_batches(sources, unit):
    paths, docs = sources
    c = _config(paths, weights_unit=unit, global_batch_size=8)
    c.stages = [{"weights": {"a": 0.3, "b": 0.7}, "until": None}]
    it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
    batches = [next(it) for _ in range(60)]
    if unit == "tokens":  # text tokens are the identifying part; compare to the expected text share
        text_len = {n: np.mean([(d >= VOC.text_start).sum() for d in docs[n]]) for n in docs}
        tok_len = {n: np.mean([len(d) for d in docs[n]]) for n in docs}
        want = 0.3 * text_len["a"] / tok_len["a"] / (0.3 * text_len["a"] / tok_len["a"] + 0.7 * text_len["b"] / tok_len["b"])
    else:
        bos = np.concatenate([b["tokens"][(b["positions"] == 0) & (b["segment_ids"] > 0)] for b in batches])
        starts = np.concatenate([b["tokens"][np.roll((b["positions"] == 0) & (b["segment_ids"] > 0), 1, axis=1)]
                                 for b in batches])
        share_docs = np.mean((starts[bos == VOC.bos] - VOC.text_start) < 40)
        want, got = 0.3, share_docs
        assert abs(got - want) < 0.06, (got, want)
        return
    got, _ = _token_share_of_a(batches)
    assert abs(got - want) < 0.05, (got, want)


def test_stage_two_mixture_starts_at_its_boundary(sources):
    c = _config(sources[0])
    c.stages = [{"weights": {"a": 1.0}, "until": 0.5}, {"weights": {"b": 1.0}, "until": None}]
    it = pipeline.make_train_iterator(c, total_steps=6, process_index=0, process_count=1)
    shares = [_token_share_of_a([next(it)])[0] for _ in range(6)]
    assert shares == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_host_slices_are_disjoint_and_cover_the_source(sources):
    paths, docs = sources
    info = shards.read_source(paths["a"])
    seen = []
    for host in range(3):
        ds = pipeline._source_dataset(info, "a", 0, 0, host, 3)
        it = iter(ds)
        seen.append({tuple(next(it)["tokens"]) for _ in range(40)})  # 120 docs / 3 hosts: one epoch
    assert all(len(s) == 40 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set().union(*seen) == {tuple(d) for d in docs["a"]}


def _resume_matches(c, tmp_path, total_steps, before=3, after=3):
    import orbax.checkpoint as ocp

    make = lambda: pipeline.make_train_iterator(c, total_steps=total_steps, process_index=0, process_count=1)
    it = make()
    for _ in range(before):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(before, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = [next(it) for _ in range(after)]
    it.close()
    resumed = make()
    mngr.restore(before, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    got = [next(resumed) for _ in range(after)]
    resumed.close()
    for w, g in zip(want, got):
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])


def test_exact_resume_through_orbax_with_worker_processes(sources, tmp_path):
    c = _config(sources[0], num_workers=2)
    c.stages = [{"weights": {"a": 1.0, "b": 1.0}, "until": None}]
    _resume_matches(c, tmp_path, None)


def test_exact_resume_across_a_stage_boundary(sources, tmp_path):
    c = _config(sources[0])
    c.stages = [{"weights": {"a": 1.0, "b": 1.0}, "until": 0.5}, {"weights": {"b": 1.0}, "until": None}]
    _resume_matches(c, tmp_path, total_steps=8)  # saved at step 3, the boundary is at step 4


def test_documents_with_an_image_longer_than_seq_len_are_skipped_counted_and_logged(tmp_path, caplog):
    rng = np.random.default_rng(2)
    docs = [_doc(rng, 0, 100, 1, side=4) for _ in range(5)] + [_doc(rng, 0, 100, 0) for _ in range(5)]
    path = _write_source(str(tmp_path / "big"), docs)
    c = _config({"big": path}, seq_len=16, global_batch_size=2)
    before = packing.SKIPPED.get("image longer than seq_len", 0)
    with caplog.at_level(logging.WARNING):
        it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
        batches = [next(it) for _ in range(6)]
    assert packing.SKIPPED["image longer than seq_len"] > before
    assert "cannot fit seq_len=16" in caplog.text
    assert not any((b["tokens"] == VOC.begin_image).any() for b in batches)


def test_missing_or_empty_sources_fail_before_training_with_the_fix(tmp_path, sources):
    with pytest.raises(FileNotFoundError, match="python -m chameleon_jax.pretokenize"):
        pipeline.make_train_iterator(_config({"x": str(tmp_path / "nope")}), process_index=0, process_count=1)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no documents"):
        pipeline.make_train_iterator(_config({"x": str(tmp_path / "empty")}), process_index=0, process_count=1)
    c = _config(sources[0])
    c.stages = [{"weights": {"a": 1.0, "zzz": 1.0}, "until": None}]
    with pytest.raises(ValueError, match="unknown sources"):
        pipeline.make_train_iterator(c, process_index=0, process_count=1)


def test_global_batches_carry_the_train_steps_input_sharding(sources):
    import jax
    from jax.sharding import AxisType

    from chameleon_jax.model import sharding as shd

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    it = pipeline.make_train_iterator(_config(sources[0]), seq_len=40, batch_size=8, process_index=0, process_count=1)
    local = next(it)
    g = pipeline.to_global_batch(local, mesh)
    assert g["tokens"].shape == (8, 40) and g["tokens"].sharding.spec == shd.BATCH_SPEC
    np.testing.assert_array_equal(np.asarray(g["positions"]), local["positions"])
