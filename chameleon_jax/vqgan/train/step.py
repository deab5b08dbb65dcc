"""The VQ-GAN train state and its update (taming recipe, research note A2).

State: generator params and Adam state, discriminator params and Adam state, the code-usage EMA, the
step, the rng, the count of consecutive skipped steps, and (with `train.ema_decay`) a Polyak average
of the generator weights, which is what gets evaluated and exported.

Losses: L1 (or L2) + optional LPIPS-VGG, codebook + commitment (β, legacy weighting), PatchGAN hinge
with the adaptive weight from `loss.disc_start` on. Codebook health: optional l2-normalised lookup
(the stored codebook is kept unit-norm, so `model.encode` needs no flag) and dead-code restarts from
batch latents. A step whose loss or gradients are non-finite changes nothing but `step`, `rng` and
`bad_steps`.
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import optax

from chameleon_jax.vqgan import discriminator, losses, model, perceptual


def model_config(config) -> model.VQGANConfig:
    return model.VQGANConfig.from_dict(config.model)


def optimizer(o) -> optax.GradientTransformation:
    warm = max(1, o.warmup_steps)  # linear warm-up from lr/warm (so step 0 already learns), then cosine
    sched = optax.warmup_cosine_decay_schedule(o.lr / warm, o.lr, warm, max(warm + 1, o.decay_steps),
                                               end_value=o.lr * o.final_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity(),
                       optax.adam(sched, b1=o.b1, b2=o.b2))


def ema_decay(config) -> float:
    return float(config.train.get("ema_decay", 0.0))


def init_state(config, rng) -> dict:
    k_g, k_d, k_r = jax.random.split(rng, 3)
    params = model.init(k_g, model_config(config))
    residual_scale = config.get("init", {}).get("residual_scale", 1.0)
    if residual_scale != 1.0:
        params = model.scale_residual_branches(params, residual_scale)
    if config.quantizer.l2_norm:
        params = normalise_codebook(params)
    d = config.loss
    dparams = discriminator.init(k_d, ndf=d.disc_ndf, n_layers=d.disc_layers)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer(config.optim).init(params),
             "disc_params": dparams, "disc_opt_state": optimizer(config.disc_optim).init(dparams),
             "code_ema": jnp.zeros((config.model.n_embed,), jnp.float32), "rng": k_r,
             "bad_steps": jnp.zeros((), jnp.int32)}
    if ema_decay(config):
        state["ema_params"] = jax.tree.map(jnp.copy, params)  # own buffers: the state is donated
    return state


def eval_params(state: dict) -> dict:
    """The weights to evaluate and export: the EMA copy when `train.ema_decay` keeps one."""
    return state.get("ema_params", state["params"])


def normalise_codebook(params):
    e = params["quantize"]["embedding"]
    e = e * jax.lax.rsqrt(jnp.sum(jnp.square(e), -1, keepdims=True) + 1e-12)
    return {**params, "quantize": {"embedding": e}}


def _forward(params, x, q):
    """x -> (x_hat, trunk features h, codes, latents z, codebook loss)."""
    z = model.encode_latents(params, x)
    z_q, codes, q_loss = model.quantize(params["quantize"]["embedding"], z, beta=q.beta, legacy=q.legacy,
                                        l2_norm=q.l2_norm)
    h = model.decoder_trunk(params["decoder"], model.conv(params["post_quant_conv"], z_q))
    return model.conv(params["decoder"]["conv_out"], h), h, codes, z, q_loss


# Advanced whether or not the step is applied; everything else is kept on a non-finite step.
_ALWAYS_ADVANCED = ("step", "rng", "bad_steps")


def make_train_step(config, *, gan: bool):
    """(state, images, lpips_params) -> (state, metrics), jitted with the state donated. `gan` selects
    the variant with the PatchGAN terms; the task switches to it at `loss.disc_start`, so earlier steps
    pay nothing for D.

    The jitted function is shared between calls with the same update settings, so a resumed run in the
    same process (tests, the smoke experiment) does not compile it again."""
    update = {k: config[k].to_dict() for k in _UPDATE_SETTINGS}
    return _train_step(json.dumps({**update, "train": {"ema_decay": ema_decay(config)}}, sort_keys=True), gan)


_UPDATE_SETTINGS = ("loss", "quantizer", "optim", "disc_optim")  # and train.ema_decay: all the step reads


@functools.lru_cache(maxsize=8)
def _train_step(settings: str, gan: bool):
    config = ml_collections.ConfigDict(json.loads(settings))
    L, q = config.loss, config.quantizer
    decay = ema_decay(config)
    tx, dtx = optimizer(config.optim), optimizer(config.disc_optim)
    use_lpips = L.perceptual_weight > 0

    def nll_of(x, x_hat, lp):
        rec = losses.reconstruction(x, x_hat, L.reconstruction)
        if use_lpips:
            rec = rec + L.perceptual_weight * jnp.mean(perceptual.lpips(lp, x, x_hat))
        return rec

    def g_loss_fn(params, dparams, x, lp):
        x_hat, h, codes, z, q_loss = _forward(params, x, q)
        nll = nll_of(x, x_hat, lp)
        loss = nll + L.codebook_weight * q_loss
        aux = {"nll": nll, "q_loss": q_loss}
        if gan:
            g = losses.hinge_g_loss(discriminator.apply(dparams, x_hat))
            if L.disc_adaptive:
                last = params["decoder"]["conv_out"]
                h_sg = jax.lax.stop_gradient(h)
                g_nll = jax.grad(lambda k: nll_of(x, model.conv({**last, "kernel": k}, h_sg), lp))(last["kernel"])
                g_gan = jax.grad(lambda k: losses.hinge_g_loss(
                    discriminator.apply(dparams, model.conv({**last, "kernel": k}, h_sg))))(last["kernel"])
                lam = losses.adaptive_weight(g_nll, g_gan, L.disc_weight)
            else:
                lam = jnp.float32(L.disc_weight)
            loss = loss + lam * g
            aux.update(g_loss=g, disc_lambda=lam)
        return loss, (aux, x_hat, codes, z)

    def step_fn(state, x, lp):
        rng, k_restart = jax.random.split(state["rng"])
        (loss, (aux, x_hat, codes, z)), grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
            state["params"], state["disc_params"], x, lp)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {**state, "params": params, "opt_state": opt_state, "rng": rng, "step": state["step"] + 1}
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux}

        if gan:
            def d_loss_fn(dp):
                return losses.hinge_d_loss(discriminator.apply(dp, x), discriminator.apply(dp, jax.lax.stop_gradient(x_hat)))
            d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state["disc_params"])
            finite = finite & jnp.isfinite(d_loss) & jnp.isfinite(optax.tree.norm(d_grads))
            d_upd, d_opt = dtx.update(d_grads, state["disc_opt_state"], state["disc_params"])
            new.update(disc_params=optax.apply_updates(state["disc_params"], d_upd), disc_opt_state=d_opt)
            metrics["d_loss"] = d_loss

        # codebook health: usage EMA, dead-code restarts from this batch's latents, unit-norm projection
        n_embed = params["quantize"]["embedding"].shape[0]
        counts = jnp.bincount(codes.reshape(-1), length=n_embed).astype(jnp.float32)
        ema = q.usage_decay * state["code_ema"] + (1 - q.usage_decay) * counts
        book = params["quantize"]["embedding"]
        if q.dead_code_threshold > 0:
            flat = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]))
            pick = jax.random.randint(k_restart, (n_embed,), 0, flat.shape[0])
            dead = ema < q.dead_code_threshold
            book = jnp.where(dead[:, None], flat[pick] + 1e-3 * jax.random.normal(k_restart, book.shape), book)
            ema = jnp.where(dead, 2.0 * q.dead_code_threshold, ema)  # a grace period before the next check
            metrics["dead_codes"] = jnp.sum(dead)
        new["params"] = {**params, "quantize": {"embedding": book}}
        if q.l2_norm:
            new["params"] = normalise_codebook(new["params"])
        new["code_ema"] = ema
        if decay:
            # Polyak average of the weights, warmed up (1+t)/(10+t) so early weights fade fast; the
            # codebook is averaged too and then put back on the unit sphere the lookup assumes.
            t = state["step"].astype(jnp.float32)
            d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
            avg = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], new["params"])
            new["ema_params"] = normalise_codebook(avg) if q.l2_norm else avg

        # The non-finite guard: a select, exact when finite (where(True, new, old) is new bit for bit).
        kept = [k for k in new if k not in _ALWAYS_ADVANCED]
        new.update(jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                                {k: new[k] for k in kept}, {k: state[k] for k in kept}))
        new["bad_steps"] = jnp.where(finite, 0, state["bad_steps"] + 1)
        metrics["batch_usage"] = jnp.mean(counts > 0)
        metrics["psnr"] = jnp.mean(losses.psnr(x, x_hat))
        metrics["finite"] = finite.astype(jnp.float32)
        return new, metrics

    return jax.jit(step_fn, donate_argnums=(0,))
