"""Train the VQ-GAN (taming recipe, research note A2) on the procedural shapes dataset.

    python -m chameleon_jax.vqgan.train --config experiments/vqgan_smoke.py --workdir /tmp/vqgan_smoke

Reruns with the same workdir resume from the latest Orbax checkpoint; a finished run is not retrained.
`train_or_load(config, workdir)` gives the trained params either way (the smoke experiment caches on it).

Stages of this file: data → state (init / abstract shapes) → jitted update → evaluation → loop.
Losses: L1 (or L2) + optional LPIPS-VGG, codebook + commitment (β, legacy weighting), PatchGAN hinge with
the adaptive weight from `disc_start` on. Codebook health: optional l2-normalised lookup (the stored
codebook is kept unit-norm, so `model.encode` needs no flag) and dead-code restarts from batch latents.
Options for a wall-clock budget: `train.fit_to_budget` sizes the schedule to `train.time_budget_s` on the
machine at hand (`_BudgetPlan`), and `train.ema_decay` evaluates and exports averaged weights.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import queue
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from chameleon_jax import checkpoint, cpu
from chameleon_jax.data import shapes
from chameleon_jax.vqgan import discriminator, losses, model, perceptual
from chameleon_jax.vqgan.images import to_uint8

log = logging.getLogger(__name__)
EXPORT = "export"  # workdir/export: params-only, written when training finishes


def model_config(config) -> model.VQGANConfig:
    return model.VQGANConfig.from_dict(config.model)


# ------------------------------------------------------------------------------------------------ data

def train_batch(config, step: int) -> np.ndarray:
    """Images float32 [B, S, S, 3] in [-1, 1] for `step`: a pure function of (seed, step), so resumes
    see exactly the batches they would have seen."""
    d = config.data
    uniform = d.get("uniform_scenes", False)  # every distinct scene equally likely (shapes.sample_scene)
    scenes, index = [], step * d.batch_size * 4
    while len(scenes) < d.batch_size:
        s = shapes.sample_scene(d.seed, index, uniform=uniform)
        index += 1
        if shapes.split_of(s) == "train":
            scenes.append(s)
    return shapes.render_batch(scenes, d.image_size).astype(np.float32) / 127.5 - 1.0


def eval_set(config):
    """Held-out ('val' split) scenes, all different, and their images, fixed for the run.

    Distinct scenes (`shapes.iter_split(unique=True)`): plain draws repeat the few single-object
    scenes so often that one of them decided ~6% of the score (README, VQ-GAN)."""
    scenes = list(shapes.iter_split("val", config.data.seed, config.eval.num_images, unique=True))
    return scenes, shapes.render_batch(scenes, config.data.image_size).astype(np.float32) / 127.5 - 1.0


class _Prefetch:
    """Renders the next batches on a thread while the step runs."""

    def __init__(self, config, start: int, depth: int = 2):
        self._q: queue.Queue = queue.Queue(depth)
        self._stop = False
        self._t = threading.Thread(target=self._run, args=(config, start), daemon=True)
        self._t.start()

    def _run(self, config, step):
        while not self._stop:
            self._q.put(train_batch(config, step))
            step += 1

    def next(self) -> np.ndarray:
        return self._q.get()

    def close(self):
        self._stop = True
        while not self._q.empty():
            self._q.get_nowait()


# ----------------------------------------------------------------------------------------------- state

def _optimizer(o) -> optax.GradientTransformation:
    warm = max(1, o.warmup_steps)  # linear warm-up from lr/warm (so step 0 already learns), then cosine
    sched = optax.warmup_cosine_decay_schedule(o.lr / warm, o.lr, warm, max(warm + 1, o.decay_steps),
                                               end_value=o.lr * o.final_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity(),
                       optax.adam(sched, b1=o.b1, b2=o.b2))


def init_state(config, rng) -> dict:
    k_g, k_d, k_r = jax.random.split(rng, 3)
    params = model.init(k_g, model_config(config))
    residual_scale = config.get("init", {}).get("residual_scale", 1.0)
    if residual_scale != 1.0:
        params = model.scale_residual_branches(params, residual_scale)
    if config.quantizer.l2_norm:
        params = _normalise_codebook(params)
    d = config.loss
    dparams = discriminator.init(k_d, ndf=d.disc_ndf, n_layers=d.disc_layers)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": _optimizer(config.optim).init(params),
             "disc_params": dparams, "disc_opt_state": _optimizer(config.disc_optim).init(dparams),
             "code_ema": jnp.zeros((config.model.n_embed,), jnp.float32), "rng": k_r}
    if _ema_decay(config):
        state["ema_params"] = jax.tree.map(jnp.copy, params)  # own buffers: the state is donated
    return state


def _ema_decay(config) -> float:
    return float(config.train.get("ema_decay", 0.0))


def eval_params(state: dict) -> dict:
    """The weights to evaluate and export: the EMA copy when `train.ema_decay` keeps one."""
    return state.get("ema_params", state["params"])


def _normalise_codebook(params):
    e = params["quantize"]["embedding"]
    e = e * jax.lax.rsqrt(jnp.sum(jnp.square(e), -1, keepdims=True) + 1e-12)
    return {**params, "quantize": {"embedding": e}}


# --------------------------------------------------------------------------------------------- update

def _forward(params, x, q):
    """x -> (x_hat, trunk features h, codes, latents z, codebook loss)."""
    z = model.encode_latents(params, x)
    z_q, codes, q_loss = model.quantize(params["quantize"]["embedding"], z, beta=q.beta, legacy=q.legacy,
                                        l2_norm=q.l2_norm)
    h = model.decoder_trunk(params["decoder"], model.conv(params["post_quant_conv"], z_q))
    return model.conv(params["decoder"]["conv_out"], h), h, codes, z, q_loss


def make_train_step(config, *, gan: bool):
    """(state, images, lpips_params) -> (state, metrics). `gan` selects the variant with the PatchGAN
    terms; the loop switches to it at `loss.disc_start`, so earlier steps pay nothing for D."""
    L, q = config.loss, config.quantizer
    ema_decay = _ema_decay(config)
    tx, dtx = _optimizer(config.optim), _optimizer(config.disc_optim)
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
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {**state, "params": params, "opt_state": opt_state, "rng": rng, "step": state["step"] + 1}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

        if gan:
            def d_loss_fn(dp):
                return losses.hinge_d_loss(discriminator.apply(dp, x), discriminator.apply(dp, jax.lax.stop_gradient(x_hat)))
            d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state["disc_params"])
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
            new["params"] = _normalise_codebook(new["params"])
        new["code_ema"] = ema
        if ema_decay:
            # Polyak average of the weights, warmed up (1+t)/(10+t) so early weights fade fast; the
            # codebook is averaged too and then put back on the unit sphere the lookup assumes.
            t = state["step"].astype(jnp.float32)
            d = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
            avg = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], new["params"])
            new["ema_params"] = _normalise_codebook(avg) if q.l2_norm else avg
        metrics["batch_usage"] = jnp.mean(counts > 0)
        metrics["psnr"] = jnp.mean(losses.psnr(x, x_hat))
        return new, metrics

    return jax.jit(step_fn, donate_argnums=(0,))


# ------------------------------------------------------------------------------------------- evaluate

@functools.partial(jax.jit, static_argnames=())
def _eval_batch(params, x):
    codes = model.encode(params, x)
    x_hat = model.decode(params, codes)
    codes2 = model.encode(params, jnp.clip(x_hat, -1.0, 1.0))
    return codes, x_hat, losses.psnr(x, x_hat), losses.ssim(x, x_hat), jnp.mean(codes == codes2, axis=(1, 2))


def evaluate(params, scenes, images, *, n_embed: int, batch_size: int = 64, lpips_params=None) -> dict:
    """Held-out metrics: PSNR, SSIM, (LPIPS), codebook usage and perplexity over all codes, code round
    trip (encode(decode(codes)) == codes), and the shape analyzer's exact-scene accuracy on the
    reconstructions (the tokenizer's semantic-fidelity gate, research note B4.4)."""
    out = {k: [] for k in ("codes", "x_hat", "psnr", "ssim", "round_trip", "lpips")}
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        codes, x_hat, p, s, rt = _eval_batch(params, x)
        for k, v in zip(("codes", "x_hat", "psnr", "ssim", "round_trip"), (codes, x_hat, p, s, rt)):
            out[k].append(np.asarray(v))
        if lpips_params is not None:
            out["lpips"].append(np.asarray(jax.jit(perceptual.lpips)(lpips_params, x, x_hat)))
    codes = np.concatenate(out["codes"])
    x_hat = np.concatenate(out["x_hat"])
    usage, ppl = losses.codebook_stats(jnp.asarray(codes), n_embed)
    recon = to_uint8(x_hat)
    analyzer = np.mean([shapes.analyze(r) == s for r, s in zip(recon, scenes)])
    metrics = {"psnr": float(np.mean(np.concatenate(out["psnr"]))), "ssim": float(np.mean(np.concatenate(out["ssim"]))),
               "codebook_usage": float(usage), "perplexity": float(ppl), "analyzer_exact": float(analyzer),
               "code_round_trip": float(np.mean(np.concatenate(out["round_trip"])))}
    if out["lpips"]:
        metrics["lpips"] = float(np.mean(np.concatenate(out["lpips"])))
    return metrics, recon


# ----------------------------------------------------------------------------------------------- loop

def _write_images(writer, workdir: Path, step: int, images, recon, n: int = 16):
    from chameleon_jax.vqgan.images import to_uint8 as u8
    from PIL import Image
    pairs = np.concatenate([u8(images[:n]), recon[:n]], axis=2)  # original | reconstruction
    grid = _grid(pairs)
    Image.fromarray(grid).save(workdir / f"recon_{step:06d}.png")
    tb = getattr(writer, "_tb", None)  # the shared MetricsWriter is scalars-only; images go to its TB file
    if tb is not None:
        tb.add_image("eval/reconstructions", grid, step, dataformats="HWC")


def _grid(x: np.ndarray, cols: int = 4, pad: int = 2) -> np.ndarray:
    n, h, w, c = x.shape
    rows = -(-n // cols)
    g = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        g[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = x[i]
    return g


class _BudgetPlan:
    """With `train.fit_to_budget`, sizes the schedule to the wall-clock budget on the machine at hand.

    The step time is measured over the warm-up (whose learning rates do not depend on the schedule's
    length), and the run is planned to end, fully decayed, within `train.time_budget_s` with a margin;
    `train.steps` is then an upper bound, and the decay lengths scale with the planned steps. At each
    checkpoint the plan is checked against the recent step time and shortened if the machine slowed
    down, so a slow spell costs steps rather than a run cut off at a high learning rate. The plan is
    kept in workdir/schedule.json, so a resumed run follows the schedule it started with.
    """

    MARGIN = 0.9  # planned time / time left: room for noise and checkpoint writes

    def __init__(self, config, workdir: Path):
        self._config, self._file = config, Path(workdir) / "schedule.json"
        self.enabled = bool(config.train.get("fit_to_budget", False) and config.train.get("time_budget_s", 0))
        if self.enabled and jax.process_count() > 1:
            # each host would time its own steps and could plan a different length: the hosts' step
            # counts would diverge and the collectives hang
            raise ValueError(f"train.fit_to_budget plans from one host's step time, but {jax.process_count()} "
                             "processes are running: set --config.train.fit_to_budget=False and size "
                             "train.steps / optim.decay_steps yourself")
        self.steps = config.train.steps
        self._planned = False
        if self.enabled and self._file.exists():
            self.steps, self._planned = json.loads(self._file.read_text())["steps"], True
        self._mark = None  # (done, elapsed) where the current timing window began
        self._restart = False  # a new plan recompiles the step: start the next window after that

    def config(self):
        c = ml_collections.ConfigDict(self._config.to_dict())
        if self.steps != c.train.steps:
            scale = self.steps / c.train.steps
            for o in (c.optim, c.disc_optim):
                o.decay_steps = max(1, round(o.decay_steps * scale))
        return c

    def wants_timing(self, done: int, start: int) -> bool:
        if not self.enabled:
            return False
        warm = max(self._config.optim.warmup_steps, 10)
        return done == start + 1 or self._restart or (not self._planned and done == start + warm) or \
            done % self._config.train.checkpoint_every == 0

    def update(self, done: int, start: int, elapsed: float) -> bool:
        """Called (after a device sync) at the points `wants_timing` picks; True if the plan changed."""
        mark, self._mark = self._mark, (done, elapsed)
        if mark is None or done == start + 1 or self._restart:  # those steps included compilation
            self._restart = False
            return False
        per_step = (elapsed - mark[1]) / (done - mark[0])
        left = self._config.train.time_budget_s - elapsed
        if self._planned and done + left / per_step >= self.steps:
            return False  # still on time (the margin is kept for new plans, so it does not compound)
        new = max(done + 1, min(self._config.train.steps, done + int(self.MARGIN * left / per_step)))
        changed = new != self.steps
        self.steps, self._planned, self._restart = new, True, changed
        if jax.process_index() == 0:
            self._file.write_text(json.dumps({"steps": new, "seconds_per_step": per_step, "at_step": done}))
        return changed


def train(config, workdir) -> dict:
    """Trains (resuming if checkpoints exist) and returns the final params; writes workdir/export."""
    from tqdm import tqdm

    from chameleon_jax.train.metrics import MetricsWriter

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = cpu.data_mesh(config.data.batch_size)  # data parallel over the devices the batch divides
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    abstract = jax.eval_shape(lambda: init_state(config, jax.random.key(config.seed)))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
    mngr = checkpoint.make_manager(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    start = mngr.latest_step()
    if start is not None:
        state = checkpoint.restore(mngr, start, abstract)
        log.info("resumed from step %d", start)
    else:
        start = 0
        state = jax.device_put(init_state(config, jax.random.key(config.seed)), replicated)

    lp = None
    if config.loss.perceptual_weight > 0 or config.eval.lpips:
        if config.loss.perceptual_weight > 0 or perceptual.available():
            lp = jax.device_put(perceptual.load_params(), replicated)
    plan = _BudgetPlan(config, workdir)

    def build_steps():  # both variants, for the current plan's schedule
        run_config = plan.config()
        return {gan: make_train_step(run_config, gan=gan) for gan in (False, True)}

    steps = build_steps()
    scenes, eval_images = eval_set(config)
    n_embed = config.model.n_embed
    writer = MetricsWriter(workdir, resume_step=start, enabled=jax.process_index() == 0)
    total = plan.steps
    feed = _Prefetch(config, start)
    bar = tqdm(range(start, config.train.steps), initial=start, total=total, desc="vqgan", dynamic_ncols=True)
    gan_on = config.loss.disc_weight > 0
    budget = config.train.get("time_budget_s", 0)
    t0 = time.monotonic()
    try:
        for step in bar:
            x = jax.device_put(feed.next(), batch_sharding)
            state, m = steps[gan_on and step >= config.loss.disc_start](state, x, lp)
            done = step + 1
            if plan.wants_timing(done, start):
                jax.block_until_ready(state["step"])
                if plan.update(done, start, time.monotonic() - t0):
                    total, steps = plan.steps, build_steps()
                    bar.total = total
                    bar.write(f"schedule fitted to the {budget:.0f} s budget: {total} steps")
            if budget and time.monotonic() - t0 > budget and done < total:
                log.warning("time budget of %ss spent at step %d of %d: finishing here", budget, done, total)
                total = done
            if done % config.train.log_every == 0 or done == total:
                m = {f"train/{k}": float(v) for k, v in m.items()}
                writer.write(done, m)
                bar.set_postfix(loss=f"{m['train/loss']:.4f}", psnr=f"{m['train/psnr']:.1f}")
            if done % config.train.eval_every == 0 or done == total:
                em, recon = evaluate(eval_params(state), scenes, eval_images, n_embed=n_embed,
                                     lpips_params=lp if config.eval.lpips else None)
                writer.write(done, {f"eval/{k}": v for k, v in em.items()})
                _write_images(writer, workdir, done, eval_images, recon)
                bar.write(f"step {done} held-out: " + " ".join(f"{k}={v:.4f}" for k, v in em.items()))
            if done % config.train.checkpoint_every == 0 or done == total:
                checkpoint.save(mngr, done, state, config=config, force=True)
            if done == total:
                break
    finally:
        feed.close()
        mngr.wait_until_finished()
        writer.close()
    final = eval_params(state)
    checkpoint.export_params(final, workdir / EXPORT, config)
    return final


def train_or_load(config, workdir):
    """The trained params for `config` in `workdir`: loaded from workdir/export if that run finished,
    otherwise trained (resuming from its checkpoints). Cache-friendly entry for later experiments."""
    export = Path(workdir) / EXPORT
    if (export / "state").is_dir():
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), model_config(config)))
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), abstract)
        return checkpoint.restore_params(export, abstract)
    return train(config, workdir)


def main(argv):
    del argv
    from absl import flags

    cpu.use_every_core(divides=(flags.FLAGS.config.data.batch_size,))  # before any backend exists
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    config = flags.FLAGS.config
    workdir = Path(flags.FLAGS.workdir)
    finished = (workdir / EXPORT / "state").is_dir()
    params = train_or_load(config, workdir)
    if not finished:
        return  # the run's final held-out evaluation was printed (and logged) by train()
    scenes, images = eval_set(config)
    lp = jax.device_put(perceptual.load_params()) if config.eval.lpips and perceptual.available() else None
    metrics, _ = evaluate(params, scenes, images, n_embed=config.model.n_embed, lpips_params=lp)
    print("held-out:", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    from chameleon_jax import cpu
    cpu.use_huge_pages()  # before anything allocates; see chameleon_jax/cpu.py
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "an experiments/vqgan_*.py file", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, export)")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
