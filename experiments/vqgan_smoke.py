"""CPU smoke VQ-GAN: Chameleon's architecture at small width, 64 px shapes scenes -> 8×8 codes from 1024.

    python -m chameleon_jax.vqgan.train --config experiments/vqgan_smoke.py --workdir /tmp/vqgan_smoke

Targets on held-out scenes within 10 minutes on 2 vCPUs: PSNR >= 28 dB, codebook usage >= 80%,
shape analyzer exact on >= 95% of reconstructions. Variant `:tiny` is the unit-test size; `:patch`
swaps in the patch-local encoder (not Chameleon's) that the text<->image smoke experiment uses.
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    # same blocks as Chameleon (GN32, swish, nin shortcuts, right/bottom-padded downsampling, mid attention)
    c.model = dict(resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                   attn_resolutions=(), z_channels=64, embed_dim=8, n_embed=1024)
    # residual branches start at zero (model.scale_residual_branches): colour is learned from step 0
    c.init = dict(residual_scale=0.0)
    # l2-normalised 8-d lookup (LlamaGen) + dead-code restarts keep usage high; beta/legacy as Chameleon
    c.quantizer = dict(beta=0.25, legacy=True, l2_norm=True, dead_code_threshold=0.01, usage_decay=0.98)
    c.loss = dict(reconstruction="l2",  # L2 = what PSNR measures; "l1" is the taming default
                   perceptual_weight=0.0, codebook_weight=1.0,
                  disc_weight=0.0, disc_start=10_000, disc_adaptive=True, disc_ndf=32, disc_layers=2)
    c.optim = dict(lr=2e-3, b1=0.9, b2=0.99, warmup_steps=20, decay_steps=4000, final_lr_fraction=0.05, grad_clip=1.0)
    c.disc_optim = dict(lr=2e-4, b1=0.5, b2=0.9, warmup_steps=0, decay_steps=4000, final_lr_fraction=1.0, grad_clip=0.0)
    # scenes drawn uniformly over distinct scenes (mostly two objects), like the held-out evaluation; the
    # corpora's 50% single-object draws would repeat the same ~290 training scenes in half the batch
    c.data = dict(kind="shapes", seed=0, image_size=64, uniform_scenes=True, threads=2,
                  inputs="")  # kind="images": image folders / JSONL / tar shards, comma-separated
    # 0.14-0.45 s/step on 2 vCPUs (one device per core), depending on the neighbours: `fit_to_budget`
    # plans as many steps as fit the 540 s budget (up to `steps`; decay lengths scale with the plan), so
    # the schedule always ends decayed; the budget leaves room for compile and the final eval
    c.train = dict(steps=4000, batch_size=8, log_every=25, eval_every=4000,
                   time_budget_s=540,  # stop (and export) early when the wall-clock budget is spent
                   fit_to_budget=True,
                   ema_decay=0.99,  # evaluate and export a Polyak average of the weights (~100-step window)
                   max_bad_steps=10)  # non-finite steps are skipped; this many in a row stop the run
    c.checkpoint = dict(every=250, keep=2)
    c.eval = dict(num_images=256, lpips=False, inputs="")
    if arg == "patch":  # the smoke experiment's tokenizer: patch-local codes (model.encoder_kind docs)
        c.model.update(encoder_kind="patch", patch_hidden=256)
        # pinned to the recipe the smoke experiment's published figures were measured with
        c.model.n_embed = 512
        c.data.uniform_scenes = False
        c.optim.decay_steps = c.disc_optim.decay_steps = c.train.steps = c.train.eval_every = 1250
        c.train.update(ema_decay=0.0, fit_to_budget=False)
    if arg == "tiny":  # unit tests: a few seconds per step even under load
        c.model.update(ch=32, ch_mult=(1, 2), z_channels=32, embed_dim=8, n_embed=64, resolution=16)
        c.data.update(image_size=16)
        c.checkpoint.every = 1
        c.loss.update(disc_weight=0.8, disc_start=1, disc_ndf=32, disc_layers=1)
        c.train.update(steps=2, batch_size=8, log_every=1, eval_every=2, fit_to_budget=False, time_budget_s=0)
        c.eval.num_images = 8
    return c
