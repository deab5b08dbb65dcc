"""The held-out report of a VQ-GAN run (`eval.report=True`): WORKDIR/report/ holds

    originals/NAME.png        the held-out images as the tokenizer sees them (preprocessed, uint8)
    reconstructions/NAME.png  decode(encode(original)), uint8 (the official postprocessing)
    baseline/NAME.png         the original shrunk 16× and enlarged back: the calibration point
    comparison.png            original | reconstruction | baseline, one cell per image
    metrics.json              per-image and mean PSNR / SSIM / LPIPS of both, codebook health
    report.md                 the same as tables, with the grid

PSNR, SSIM and LPIPS are computed on the saved uint8 files (`evaluate.score`), so anyone can recompute
them from the PNGs.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
from etils import epath
from PIL import Image

from chameleon_jax.vqgan import images as images_lib
from chameleon_jax.vqgan.train import data, evaluate

log = logging.getLogger(__name__)

BASELINE_FACTOR = 16  # Chameleon's tokenizer downsamples 16×: one baseline pixel per code position


def heldout_images(data_config, eval_config) -> tuple[list[str], np.ndarray]:
    """(names, float32 [N, S, S, 3]) of the held-out images that decode, in the held-out order."""
    _, refs = data.split_inputs(data_config, eval_config)
    names, images = [], []
    for ref in refs:
        try:
            images.append(data.load(ref, int(data_config.image_size)))
        except images_lib.BadImage as e:  # as in training: a logged skip, never a crash
            log.warning("skipping a held-out image that cannot be decoded: %s", e)
            continue
        path = ref if isinstance(ref, str) else ref[1] if isinstance(ref, data.TarMember) else f"image{len(names)}"
        name = os.path.splitext(os.path.basename(path))[0]
        names.append(name if name not in names else f"{name}_{len(names)}")
    if not images:
        raise ValueError("no held-out image could be decoded; check eval.inputs / data.inputs")
    return names, np.stack(images)


def _means(scores: dict) -> dict:
    return {k: float(np.mean(v)) for k, v in scores.items()}


def write(out_dir, names, originals, recon, *, lpips_params=None, codebook: dict | None = None,
          title: str = "VQ-GAN held-out reconstructions", cols: int = 2) -> dict:
    """Writes the report for uint8 `originals` and `recon` [N, H, W, 3] named `names`; returns metrics.json."""
    out = epath.Path(out_dir)
    baseline = evaluate.downsample_baseline(originals, BASELINE_FACTOR)
    for folder, arrays in (("originals", originals), ("reconstructions", recon), ("baseline", baseline)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for name, img in zip(names, arrays):
            with (out / folder / f"{name}.png").open("wb") as f:
                Image.fromarray(img).save(f, format="PNG")
    grid = evaluate.comparison_grid(originals, recon, n=len(names), cols=cols, more=(baseline,))
    with (out / "comparison.png").open("wb") as f:
        Image.fromarray(grid).save(f, format="PNG", optimize=True)
    vq, base = evaluate.score(originals, recon, lpips_params), evaluate.score(originals, baseline, lpips_params)
    h, w = originals.shape[1:3]
    metrics = {
        "images": list(names), "resolution": [int(h), int(w)], "baseline_factor": BASELINE_FACTOR,
        "grid": {"cols": cols, "pad": 2, "cell": ["original", "reconstruction", "baseline"]},
        "vqgan": {"mean": _means(vq), "per_image": {k: v.tolist() for k, v in vq.items()}},
        "baseline": {"mean": _means(base), "per_image": {k: v.tolist() for k, v in base.items()}},
        "codebook": codebook or {},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "report.md").write_text(_markdown(metrics, title))
    return metrics


def _markdown(m: dict, title: str) -> str:
    keys = [k for k in ("psnr", "ssim", "lpips") if k in m["vqgan"]["mean"]]
    head = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "lpips": "LPIPS-VGG ↓"}
    f = m["baseline_factor"]
    lines = [f"# {title}", "",
             f"{len(m['images'])} held-out images at {m['resolution'][1]}×{m['resolution'][0]} px, scored on the "
             f"saved uint8 PNGs. Baseline: each image shrunk {f}× (box average) and enlarged back (bicubic), one "
             f"pixel per code position.", "",
             "| image | " + " | ".join(f"VQ-GAN {head[k]} | baseline {head[k]}" for k in keys) + " |",
             "|---|" + "---:|" * (2 * len(keys))]
    rows = [(name, i) for i, name in enumerate(m["images"])] + [("**mean**", None)]
    for name, i in rows:
        cells = []
        for k in keys:
            for side in ("vqgan", "baseline"):
                v = m[side]["mean"][k] if i is None else m[side]["per_image"][k][i]
                cells.append(f"{v:.2f}" if k == "psnr" else f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if m["codebook"]:
        lines += ["", "Codebook over these images: " + ", ".join(f"{k} {v:.4g}" for k, v in m["codebook"].items())]
    lines += ["", "Each cell: original | reconstruction | baseline.", "", "![comparison](comparison.png)", ""]
    return "\n".join(lines)


def heldout_report(params, config, out_dir, *, lpips_params=None) -> dict:
    """Encodes and decodes the run's held-out images with `params` and writes the report to `out_dir`."""
    names, images = heldout_images(config.data, config.eval)
    metrics, recon = evaluate.evaluate(params, images, n_embed=config.model.n_embed)
    codebook = {k: metrics[k] for k in ("codebook_usage", "perplexity", "code_round_trip")}
    return write(out_dir, names, evaluate.originals_uint8(images), recon, lpips_params=lpips_params,
                 codebook=codebook)
