"""Object storage wherever a path goes, against a real local GCS server (the `gcs` fixture, tests/gcs.py).

Unit checks of each remote-capable writer and reader (metrics, TensorBoard, token shards, exports), then
one end-to-end run: pretokenize to gs://, train with --workdir gs://, kill -9 mid-run and mid-save, resume
bitwise against an uninterrupted run, eval, export and generate from gs://.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from chameleon_jax import checkpoint as ckpt
from chameleon_jax import storage
from chameleon_jax import vocab as V
from chameleon_jax.data import records, shards
from chameleon_jax.train import metrics as metrics_lib
from test_runner import assert_bitwise_equal


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


def test_convert_writes_to_gcs_what_it_writes_locally(gcs, tmp_path):
    """`python -m chameleon_jax.convert --out gs://...`: the same params and config as a local --out."""
    import torch
    import transformers

    from chameleon_jax.convert import load_converted
    from test_convert_hf import CONFIGS, _hf_config, _randomise, convert_main

    torch.manual_seed(0)
    hf = transformers.ChameleonForConditionalGeneration(_hf_config(**CONFIGS["7b"])).float().eval()
    _randomise(hf, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    remote = gcs.new_bucket() + "/converted"
    for out in (str(tmp_path / "local"), remote):
        convert_main(["--from", "hf", "--src", str(tmp_path / "hf"), "--out", out])
    local_config, local_params = load_converted(str(tmp_path / "local"))
    remote_config, remote_params = load_converted(remote)
    assert remote_config.to_dict() == local_config.to_dict()
    assert_bitwise_equal(remote_params, local_params)
    assert any(name.startswith("converted/state/") for name in gcs.object_sizes(remote))


# ------------------------------------------------------------------------------------------------
# End to end: pretokenize -> train (killed twice) -> resume bitwise -> eval, export, generate; all gs://.
# ------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
STEPS = 8
SIDE = 8  # test images; the VQ-GAN below maps 8x8 pixels to 4x4 codes
VQ = dict(resolution=SIDE, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, embed_dim=4, n_embed=16)
OVERRIDES = {"train.steps": STEPS, "train.log_every": 2, "train.eval_every": STEPS, "eval.steps": 1,
             "checkpoint.every": 2, "checkpoint.keep": 2, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
             "data.kind": "tokens", "train.peak_flops": 1e11}

# The training program with Orbax's commit of one step held back: every item of that step is written
# to the bucket, the commit marker (commit_success.txt, GCS has no rename) never comes; the test polls
# for the local marker file and kills the process there.
STALL = textwrap.dedent("""
    import runpy, sys, time
    from pathlib import Path
    from orbax.checkpoint._src.path import atomicity
    stall_step, marker = sys.argv.pop(1), Path(sys.argv.pop(1))
    finalize = atomicity.CommitFileTemporaryPath.finalize
    async def stalled(self):
        if self.get_final().name == stall_step:
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(str(self.get_final()))
            tmp.rename(marker)
            time.sleep(600)
        return await finalize(self)
    atomicity.CommitFileTemporaryPath.finalize = stalled
    sys.argv[0] = "chameleon_jax.train"
    runpy.run_module("chameleon_jax.train", run_name="__main__")
""")


@dataclasses.dataclass
class Corpus:
    bucket: str
    tokens: str        # gs:// pretokenized source
    vqgan: str         # gs:// VQ-GAN export
    tokenizer: str     # local sentencepiece model
    overrides: dict    # the tiny config's command-line overrides for this corpus


@pytest.fixture(scope="module")
def corpus(gcs_server, tmp_path_factory):
    """Raw documents (text, image-caption pairs) pretokenized into gs://, with a VQ-GAN read from gs://."""
    from PIL import Image

    from chameleon_jax import pretokenize, text
    from chameleon_jax.vqgan import checkpoint as vq_checkpoint, model as vq_model

    with pytest.MonkeyPatch.context() as mp:
        for k, v in gcs_server.env.items():
            mp.setenv(k, v)
        bucket = gcs_server.new_bucket("e2e")
        raw = tmp_path_factory.mktemp("raw")
        rng = np.random.default_rng(0)
        colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
        lines = []
        for i in range(48):
            name, rgb = list(colours.items())[i % 4]
            if i % 3 == 0:
                Image.new("RGB", (SIDE, SIDE), rgb).save(raw / f"{i}.png")
                lines.append({"image": f"{i}.png", "caption": f"a {name} square"})
            else:
                words = rng.choice(["the", "square", "is", name, "and", "a", "circle", "left", "right"], 12)
                lines.append({"text": " ".join(words)})
        (raw / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        spm = text.train_sentencepiece([x.get("text") or x["caption"] for x in lines] * 4,
                                       str(raw / "bpe"), vocab_size=320)
        cfg = vq_model.VQGANConfig(**VQ)
        vqgan = f"{bucket}/vqgan/{vq_checkpoint.EXPORT}"
        ckpt.export_params(vq_checkpoint.random_params(cfg), vqgan, {"model": dataclasses.asdict(cfg)})

        encode, load_image, n_codes = pretokenize.vqgan_tools(vqgan, encode_batch=4)
        tokenizer = text.load(spm, image_codes=n_codes)
        tokens = f"{bucket}/tok"
        manifest = pretokenize.run([str(raw / "docs.jsonl")], tokens, tokenizer=tokenizer, encode_images=encode,
                                   load_image=load_image, docs_per_shard=16, show_progress=False)
    assert manifest["documents"] == 48 and manifest["shards"] == 3
    voc = tokenizer.vocab
    overrides = {**OVERRIDES, "data.train_shards": tokens,
                 "loss.image_ids": (voc.image_start, voc.image_start + n_codes)}
    return Corpus(bucket, tokens, vqgan, spm, overrides)


def e2e_config(corpus):
    """experiments/tiny.py with the corpus's overrides, as the command line below sets them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny", REPO / "experiments/tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = tiny.get_config()
    for key, value in corpus.overrides.items():
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return config


def train_args(corpus, workdir):
    return ["--config", str(REPO / "experiments/tiny.py"), "--workdir", workdir] + [
        f"--config.{k}={v}" for k, v in corpus.overrides.items()]


def committed_steps(workdir) -> list[int]:
    """Steps whose commit marker exists: on GCS, Orbax writes a step in place and commits it last."""
    root = epath.Path(workdir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def logged(workdir):
    return {(r["step"], k): v for r in metrics_lib.read_metrics(workdir) for k, v in r.items()
            if k.startswith(("train/", "eval/"))}


class Child:
    """A training process in its own session (SIGKILL reaches python, not only `timeout`)."""

    def __init__(self, cmd, log, env):
        self.log = log
        self.proc = subprocess.Popen(["timeout", "-k", "5", "240", *cmd], env=env, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)

    def wait_for(self, predicate, what, timeout=200):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the child exited (rc={self.proc.returncode}) before {what}:\n"
                                     + Path(self.log).read_text()[-3000:])
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"timed out waiting for {what}:\n" + Path(self.log).read_text()[-3000:])

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        return self.proc.returncode


def test_pretokenize_train_kill_resume_eval_export_generate_all_on_gcs(gcs, corpus, tmp_path):
    from chameleon_jax.evals.checkpoint import evaluate_checkpoint
    from chameleon_jax.generate.answer import answer
    from chameleon_jax.train import runner

    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", PYTHONPATH=str(REPO),
               CHAMELEON_JAX_CACHE=str(tmp_path / "cache"))
    os.environ["CHAMELEON_JAX_CACHE"] = env["CHAMELEON_JAX_CACHE"]  # this process's shard cache too

    # The uninterrupted reference, in this process.
    reference_dir = f"{corpus.bucket}/reference"
    reference = runner.train(e2e_config(corpus), reference_dir)
    assert reference.step == STEPS
    assert committed_steps(reference_dir) == [STEPS - 2, STEPS], sorted(gcs.object_sizes(reference_dir + "/checkpoints"))
    assert not os.path.exists(REPO / "gs:") and not os.path.exists("gs:"), "a gs:// path became a local folder"

    # 1. Killed mid-save: step 4's items are on the bucket, its commit marker is not.
    workdir = f"{corpus.bucket}/run"
    marker = tmp_path / "stalled"
    child = Child([sys.executable, "-c", STALL, "4", str(marker), *train_args(corpus, workdir)],
                  tmp_path / "stalled.log", env)
    try:
        child.wait_for(marker.exists, "the step-4 save reached its commit")
    finally:
        assert child.kill() == -signal.SIGKILL
    partial = epath.Path(marker.read_text())
    assert (partial / "state").is_dir() and not (partial / "commit_success.txt").exists()
    assert committed_steps(workdir) == [2]

    # 2. Resumed from step 2, then killed mid-run at a seeded point past its first new checkpoint.
    rng = random.Random(21)
    child = Child([sys.executable, "-m", "chameleon_jax.train", *train_args(corpus, workdir)],
                  tmp_path / "killed.log", env)
    try:
        child.wait_for(lambda: committed_steps(workdir)[-1:] >= [4], "a checkpoint after the resume")
        time.sleep(rng.uniform(0.0, 0.5))
    finally:
        assert child.kill() == -signal.SIGKILL
    killed_at = committed_steps(workdir)[-1]
    assert 4 <= killed_at < STEPS, f"killed at step {killed_at}: the child finished before the kill"

    # 3. The rerun resumes and finishes bitwise like the uninterrupted run, metrics included.
    resumed = runner.train(e2e_config(corpus), workdir)
    assert resumed.step == STEPS
    assert_bitwise_equal(resumed.state, reference.state)
    assert logged(workdir) == logged(reference_dir)
    assert any("tfevents" in name for name in gcs.object_sizes(f"{workdir}/tensorboard"))
    assert json.loads(epath.Path(workdir, "config.json").read_text())["train"]["steps"] == STEPS

    # 4. Eval and export from gs://; the export restores bitwise.
    results, params = evaluate_checkpoint(workdir, mesh_sizes=(2, 2, 2))
    assert results["checkpoint"] == f"{workdir}/checkpoints/{STEPS}"
    # The same params, batches and mesh as the run's own evaluation at its last step: the same program.
    assert results["perplexity"] == logged(reference_dir)[(STEPS, "eval/perplexity")]
    assert_bitwise_equal(params, reference.state["params"])
    export = ckpt.export_params(params, f"{corpus.bucket}/export", ckpt.read_config(workdir))
    assert ckpt.read_config(export).train.steps == STEPS
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    assert_bitwise_equal(ckpt.restore_params(export, target), reference.state["params"])

    # 5. Generate from the gs:// checkpoint into gs://.
    out = f"{corpus.bucket}/answer"
    lines = answer(workdir, "a red", out, mode="image", tokenizer=corpus.tokenizer, vqgan=corpus.vqgan)
    assert lines == ["[image_1.png]"]
    written = gcs.object_sizes(out)
    assert {"answer/output.txt", "answer/output.json", "answer/image_1.png"} <= written.keys()
    assert json.loads(epath.Path(out, "output.json").read_text())["checkpoint"] == f"{workdir}/checkpoints/{STEPS}"
