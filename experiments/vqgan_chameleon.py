"""Chameleon's tokenizer configuration (spec §4.2): 512 px -> 32×32 codes from 8192×256, ~68.7 M params,
trained with the taming recipe (L1 + LPIPS-VGG + hinge PatchGAN with adaptive weight, Adam(0.5, 0.9)).

    python -m chameleon_jax.vqgan.train --config experiments/vqgan_chameleon.py --workdir /ckpt/vqgan \
        --config.data.inputs=/path/to/images

`data.inputs` takes what pretokenize reads, comma-separated: image folders (captions not needed), JSONL
files naming images, webdataset .tar shards. `eval.num_images` images are held out from them unless
`--config.eval.inputs` names a separate held-out set. LPIPS needs `pip install -e .[lpips]`.

Variant `:photos`: the same architecture and codebook (~68.7 M params; a convolutional network, so only
the input size differs) trained briefly on a CPU at 128 px (-> 8×8 codes) on the photographs that ship
inside scikit-image and scikit-learn (`chameleon_jax.data.photos`: 12 training photos with 8 crops each,
4 held-out photos never trained on), then writes a held-out report (PSNR, SSIM, LPIPS against a 16×
downsampling baseline, originals beside reconstructions) to WORKDIR/report:

    pip install -e ".[photos,lpips]"
    python -m chameleon_jax.data.photos --out /tmp/vqgan_photos/photos
    nice -n 5 python -m chameleon_jax.vqgan.train --config experiments/vqgan_chameleon.py:photos \
        --workdir /tmp/vqgan_photos/run

The schedule is fitted to an 18-minute budget (`train.time_budget_s`); what such a run reaches, and how
far that is from a converged tokenizer, is in docs/results/vqgan.md.
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(resolution=512, in_channels=3, out_ch=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                   attn_resolutions=(), z_channels=256, embed_dim=256, n_embed=8192)
    c.quantizer = dict(beta=0.25, legacy=True, l2_norm=False, dead_code_threshold=0.0, usage_decay=0.99)
    c.loss = dict(reconstruction="l1", perceptual_weight=1.0, codebook_weight=1.0,
                  disc_weight=0.8, disc_start=30_001, disc_adaptive=True, disc_ndf=64, disc_layers=3)
    c.optim = dict(lr=4.5e-6 * 8, b1=0.5, b2=0.9, warmup_steps=0, decay_steps=1_000_000, final_lr_fraction=1.0,
                   grad_clip=0.0)  # taming: lr = batch × 4.5e-6, constant
    c.disc_optim = dict(c.optim)
    c.data = dict(kind="images", inputs="", seed=0, image_size=512,
                  threads=8)  # image decoding threads per process
    c.train = dict(steps=500_000, batch_size=8, log_every=50, eval_every=5000, time_budget_s=0, max_bad_steps=10)
    c.checkpoint = dict(every=2000, keep=3)
    c.eval = dict(num_images=64, lpips=True, inputs="")  # inputs: a held-out set (default: held back from data)
    if arg == "photos":  # a short CPU run on the packaged photographs (module docstring)
        c.model.resolution = c.data.image_size = 128
        folder = "/tmp/vqgan_photos/photos"  # python -m chameleon_jax.data.photos --out ...
        c.data.update(inputs=f"{folder}/train", threads=2)
        c.eval.update(inputs=f"{folder}/heldout", num_images=4, report=True)  # report: WORKDIR/report
        # Chameleon's constant 3.6e-5 is for ~10^5+ steps; a run of a few hundred steps needs a larger
        # step size, warmed up and decayed to the end of the budget-fitted schedule
        c.optim.update(lr=2e-4, warmup_steps=20, decay_steps=2000, final_lr_fraction=0.1, grad_clip=1.0)
        c.init = dict(residual_scale=0.0)  # colour from step 0 (measured on the smoke, docs/results/vqgan.md)
        # 128 latents a batch against 8192 codes: a code unused for ~70 steps restarts from this batch's latents
        c.quantizer.update(dead_code_threshold=0.002, usage_decay=0.99)
        # one image per core: as many updates as the budget allows; the budget covers compile and steps, and
        # leaves ~5 minutes of a 25-minute slot for start-up, the final evaluation and the report
        c.train.update(steps=2000, batch_size=2, log_every=5, eval_every=0, time_budget_s=1080, fit_to_budget=True,
                       ema_decay=0.0)
        c.checkpoint.update(every=20, keep=2)
    return c
