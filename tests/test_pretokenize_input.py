"""pretokenize on a hostile corpus, driven through its command line: every input line is a document or
a counted skip, image paths stay under the input folder, and huge images are refused from their header."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chameleon_jax import text
from chameleon_jax.data import corpora, readers
from chameleon_jax.vqgan import images

REPO = Path(__file__).resolve().parents[1]

VQGAN_CONFIG = '''
import ml_collections
def get_config(arg=None):
    return ml_collections.ConfigDict(dict(model=dict(resolution=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                                                     z_channels=32, embed_dim=32, n_embed=64)))
'''


def _pretokenize(tmp_path, inputs, *extra):
    spm = tmp_path / "spm.model"
    if not spm.exists():
        text.train_sentencepiece([d["text"] for d in corpora.pydoc_documents()][:100], str(tmp_path / "spm"), 400)
        (tmp_path / "vqgan_tiny.py").write_text(VQGAN_CONFIG)
    out = tmp_path / "tok"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "chameleon_jax.pretokenize", "--input=" + ",".join(map(str, inputs)),
                        f"--out={out}", f"--tokenizer={spm}", f"--vqgan_config={tmp_path}/vqgan_tiny.py",
                        "--vqgan_random_init", "--encode_batch=2", "--docs_per_shard=100", *extra],
                       capture_output=True, text=True, timeout=180, cwd=REPO,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    print(f"pretokenize took {time.perf_counter() - t:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "manifest.json").read_text()), r.stdout


def _by_file(out_dir):
    """input file name -> (documents, skipped items) from the per-shard entries."""
    out = {}
    for sc in Path(out_dir).glob("0*.json"):
        e = json.loads(sc.read_text())
        name = os.path.basename(e["input"]["path"])
        docs, skips = out.get(name, (0, []))
        out[name] = (docs + e["documents"], skips + e["skipped"])
    return out


def _png(path, side=8, color=(200, 30, 30)):
    Image.new("RGB", (side, side), color).save(path)


def test_hostile_corpus_every_line_is_a_document_or_a_counted_skip(tmp_path):
    root = tmp_path / "corpus"
    (root / "img").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    _png(root / "img/ok.png")
    _png(outside / "valid.png")  # a valid image: without the boundary it would be kept
    os.symlink(outside / "valid.png", root / "img/link.png")
    # Bare carriage returns: one line (no \n), so one counted skip, not one silent document.
    (root / "cr.jsonl").write_bytes(b'{"text": "one"}\r{"text": "two"}\r{"text": "three"}\r')
    # A \r inside a line is JSON whitespace: b parses, and d is not lost (4 lines, 4 documents).
    (root / "mixed.jsonl").write_bytes(b'{"text": "a"}\n{"text": "b",\r"id": "x"}\n{"text": "c"}\n{"text": "d"}\n')
    lines = [{"image": "/etc/passwd", "caption": "absolute"},
             {"image": "../outside/valid.png", "caption": "dot-dot"},
             {"image": "img/link.png", "caption": "symlink out"},
             {"segments": [{"text": "inside"}, {"image": "img/ok.png"}]},
             {"image": "img/../img/ok.png", "caption": "dot-dot that stays inside"}]
    (root / "paths.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # 6000^2 = 36 MP: legal for Pillow (< 89 MP) but over the 16.8 MP limit of 32 px images.
    Image.new("RGB", (6000, 6000), (9, 9, 9)).save(root / "img/huge.png")
    (root / "huge.jsonl").write_text(json.dumps({"image": "img/huge.png", "caption": "huge"}) + "\n")

    manifest, stdout = _pretokenize(tmp_path, [root / "cr.jsonl", root / "mixed.jsonl", root / "paths.jsonl",
                                               root / "huge.jsonl"])
    per_file = _by_file(tmp_path / "tok")
    lines_in = {"cr.jsonl": 1, "mixed.jsonl": 4, "paths.jsonl": 5, "huge.jsonl": 1}
    for name, n in lines_in.items():  # the counts add up per file
        docs, skips = per_file[name]
        assert docs + len(skips) == n, (name, docs, skips)
    assert per_file["mixed.jsonl"][0] == 4
    cr_skip = per_file["cr.jsonl"][1][0]["reason"]
    assert "carriage returns" in cr_skip and "tr '\\r' '\\n'" in cr_skip, cr_skip
    reasons = {s["item"]: s["reason"] for s in per_file["paths.jsonl"][1]}
    assert sorted(reasons) == ["paths.jsonl:1", "paths.jsonl:2", "paths.jsonl:3"], reasons
    assert "an absolute path" in reasons["paths.jsonl:1"] and "leaves the input folder" in reasons["paths.jsonl:1"]
    assert "'..'" in reasons["paths.jsonl:2"] and "a symlink" in reasons["paths.jsonl:3"]
    assert all("--allow_paths_outside_input" in r for r in reasons.values())
    huge = per_file["huge.jsonl"][1][0]["reason"]
    assert "6000x6000" in huge and "--max_image_pixels" in huge, huge
    assert f"{sum(lines_in.values()) - 5} documents" in stdout

    # The explicit option lets a trusted corpus reach outside its folder again.
    unit, = readers.plan([str(root / "paths.jsonl")], 10)
    items = list(readers.read(unit, allow_paths_outside_input=True))
    assert [i.error for i in items] == [None] * 5 and items[0].document.segments[1] == ("image", "/etc/passwd")


def test_a_folder_input_skips_a_symlink_that_leaves_it(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    _png(folder / "a.png")
    (folder / "a.txt").write_text("inside")
    _png(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", folder / "b.png")
    (folder / "b.txt").write_text("outside")
    unit, = readers.plan([str(folder)], 10)
    items = list(readers.read(unit))
    assert [i.error is None for i in items] == [True, False] and "a symlink" in items[1].error
    assert all(i.error is None for i in readers.read(unit, allow_paths_outside_input=True))


def _peak_rss_of_load(path, size):
    """Peak RSS growth (MiB) of one load_image call, in a fresh process (Linux: the peak is reset to the
    current RSS after the imports, whose own peak would otherwise hide a 100 MB decode)."""
    code = ("import sys; from chameleon_jax.vqgan import images as I\n"
            "kb = lambda f: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(f))\n"
            "open('/proc/self/clear_refs', 'w').write('5'); base = kb('VmRSS:')\n"
            "try: I.load_image(sys.argv[1], size=int(sys.argv[2])); r = 'ok'\n"
            "except I.BadImage as e: r = 'refused'\n"
            "print(r, (kb('VmHWM:') - base) / 1024)")
    r = subprocess.run([sys.executable, "-c", code, str(path), str(size)], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    verdict, mib = r.stdout.split()
    return verdict, float(mib)


def test_large_jpegs_decode_reduced_and_huge_pngs_are_refused_before_decoding(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (2400, 3200, 3), np.uint8)  # 7.7 MP: 23 MB decoded in full
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    # Draft mode: 2400 // (2*64) = 18 -> 1/8 scale, 300x400, still >= 2x the 64 px target.
    assert images.open_image(str(tmp_path / "big.jpg"), size=64).size == (400, 300)
    verdict, mib = _peak_rss_of_load(tmp_path / "big.jpg", 64)
    print(f"7.7 MP JPEG at 64 px: peak RSS +{mib:.0f} MiB")
    assert verdict == "ok" and mib < 10, mib  # a full decode alone holds 23 MB
    Image.new("RGB", (4500, 4000), (1, 2, 3)).save(tmp_path / "big.png")  # 18 MP > the 16.8 MP default
    verdict, mib = _peak_rss_of_load(tmp_path / "big.png", 64)
    print(f"18 MP PNG at 64 px: {verdict}, peak RSS +{mib:.0f} MiB")
    assert verdict == "refused" and mib < 10, mib  # decoding would hold 54 MB
    with pytest.raises(images.BadImage, match="4500x4000 = 18.0 MP"):
        images.load_image(str(tmp_path / "big.png"), size=64)
    assert images.load_image(str(tmp_path / "big.png"), size=64, max_pixels=0).shape == (64, 64, 3)


def test_an_alpha_image_blends_in_bands_to_the_same_bytes():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (700, 600, 4), np.uint8)  # > one band of 2**18 / 600 = 436 rows
    alpha = a[..., 3:4] / 255.0
    expected = ((1.0 - alpha) * 255.0 + alpha * a[..., :3]).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(images.to_rgb(Image.fromarray(a, "RGBA"))), expected)
