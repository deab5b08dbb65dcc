"""The packaged photographs: a folder built only from installed package files with a disjoint split,
the VQ-GAN runner trained on it, and its held-out report checked against an independent computation.

The run is the `:tiny` smoke config (16 px, 64 codes, 2 steps) on the photo folder with one crop per
photo; the report's metrics are recomputed with scikit-image from the PNGs it saved.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from chameleon_jax.data import photos
from chameleon_jax.vqgan import train as T
from chameleon_jax.vqgan.train import evaluate

REPO = Path(__file__).resolve().parents[1]


def package_dir(module: str) -> str:
    return list(importlib.util.find_spec(module).submodule_search_locations)[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos")
    return out, photos.write_photo_folder(out, crops_per_photo=1, seed=3, min_crop=64)


def test_folder_comes_from_package_files_with_a_disjoint_split(folder):
    out, manifest = folder
    roots = (package_dir("skimage.data"), package_dir("sklearn.datasets.images"))
    files = manifest["files"]
    on_disk = {s: sorted(os.listdir(out / s)) for s in ("train", "heldout")}
    assert sorted(os.path.basename(f["path"]) for f in files if f["split"] == "train") == on_disk["train"]
    assert sorted(os.path.basename(f["path"]) for f in files if f["split"] == "heldout") == on_disk["heldout"]
    assert len(on_disk["train"]) == 2 * len(photos.TRAIN) and len(on_disk["heldout"]) == len(photos.HELD_OUT)
    for f in files:
        # the source is a file inside an installed package, unchanged since the folder was written
        assert os.path.dirname(f["file"]) in roots, f["file"]
        assert hashlib.sha256(Path(f["file"]).read_bytes()).hexdigest() == f["sha256"]
        # and the written image is exactly that file's pixels in the recorded box
        with Image.open(f["file"]) as src:
            expect = np.asarray(src.convert("RGB").crop(tuple(f["box"])))
        np.testing.assert_array_equal(np.asarray(Image.open(out / f["path"])), expect)
    train_sources = {f["photo"] for f in files if f["split"] == "train"}
    held_sources = {f["photo"] for f in files if f["split"] == "heldout"}
    assert held_sources == set(photos.HELD_OUT) and not train_sources & held_sources
    assert not {f["sha256"] for f in files if f["split"] == "train"} & {f["sha256"] for f in files if f["split"] == "heldout"}
    # the crops are a function of the seed
    crop = next(f for f in files if "_crop" in f["path"])
    rebuilt = photos.crop_boxes(*Image.open(crop["file"]).size, 1, np.random.default_rng(
        [3, list(photos.SOURCES).index(crop["photo"])]), 64)
    assert list(rebuilt[0]) == crop["box"]


def test_baseline_is_the_downsampled_image():
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, :16] = 200  # top half bright: a 2x2 box average keeps the halves
    out = evaluate.downsample_baseline(img, 16)
    assert out.shape == img.shape and out[0, 0, 0, 0] > 150 and out[0, -1, 0, 0] < 50
    with pytest.raises(ValueError, match="factor"):
        evaluate.downsample_baseline(np.zeros((1, 24, 24, 3), np.uint8), 16)


def test_runner_trains_on_the_photos_and_reports_what_it_saved(folder, tmp_path):
    out, _ = folder
    spec = importlib.util.spec_from_file_location("vqgan_smoke", REPO / "experiments/vqgan_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    # 16 px: the baseline keeps 1x1 pixel (16x), the VQ-GAN 8x8 codes
    config.data.update(kind="images", inputs=str(out / "train"), threads=2)
    # LPIPS and the GAN stay off: each would add a compile of its own to a test about the data and the report
    config.eval.update(inputs=str(out / "heldout"), num_images=4, report=True, lpips=False)
    config.loss.disc_weight = 0.0
    config.train.update(eval_every=0, ema_decay=0.0)
    config.checkpoint.every = 2
    result = T.train(config, tmp_path)
    assert result.step == 2 and not result.preempted

    rep = tmp_path / "report"
    m = json.loads((rep / "metrics.json").read_text())
    assert m["images"] == sorted(photos.HELD_OUT)  # the held-out folder, nothing else
    names = m["images"]
    load = lambda sub: np.stack([np.asarray(Image.open(rep / sub / f"{n}.png")) for n in names])  # noqa: E731
    originals, recon, base = load("originals"), load("reconstructions"), load("baseline")
    assert originals.shape == (4, 16, 16, 3) and not np.array_equal(originals, recon)
    # the originals are the held-out photos as the loader preprocesses them
    for n, o in zip(names, originals):
        expect = evaluate.originals_uint8(T.data.load(str(out / "heldout" / f"{n}.png"), 16))
        np.testing.assert_array_equal(o, expect)

    # Independent figures from the saved PNGs. PSNR: fp32 MSE over 768 values, error ~1e-6 relative,
    # ~1e-5 dB. SSIM: fp32 Gaussian blurs of values in [0, 1]; the variance terms (E[x²] − E[x]², ~0.1)
    # lose ~1e-7 absolute, which divided by C2 = 9e-4 moves one window's SSIM by ~1e-4 at most.
    for side, images in (("vqgan", recon), ("baseline", base)):
        for i in range(len(names)):
            psnr = peak_signal_noise_ratio(originals[i], images[i], data_range=255)
            ssim = structural_similarity(originals[i], images[i], channel_axis=-1, data_range=255,
                                         gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
            assert abs(m[side]["per_image"]["psnr"][i] - psnr) < 1e-3, (side, names[i])
            assert abs(m[side]["per_image"]["ssim"][i] - ssim) < 2e-4, (side, names[i])
        assert abs(m[side]["mean"]["psnr"] - np.mean(m[side]["per_image"]["psnr"])) < 1e-9
    md = (rep / "report.md").read_text()
    assert f"{m['vqgan']['mean']['psnr']:.2f}" in md and f"{m['baseline']['mean']['ssim']:.3f}" in md

    # the grid: each cell is original | its reconstruction | its baseline, in the report's order
    grid = np.asarray(Image.open(rep / "comparison.png"))
    cols, pad, (h, w) = m["grid"]["cols"], m["grid"]["pad"], originals.shape[1:3]
    for i in range(len(names)):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (3 * w + pad)
        np.testing.assert_array_equal(grid[y:y + h, x:x + w], originals[i])
        np.testing.assert_array_equal(grid[y:y + h, x + w:x + 2 * w], recon[i])
        np.testing.assert_array_equal(grid[y:y + h, x + 2 * w:x + 3 * w], base[i])
