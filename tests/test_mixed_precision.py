"""Mixed precision as it runs on TPU: model.dtype="bfloat16" for activations and matmul inputs, over fp32
master weights and fp32 AdamW moments; softmax, norm statistics, logits, z-loss, the loss and the
gradient norm stay fp32. model.param_dtype="bfloat16" stores bf16 weights and keeps fp32 moments
(train/optimizer.py says why).

The training runs use experiments/tiny.py on one device. They share one fp32 initialisation and one
list of batches, so the only difference between the curves is the precision.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jax_core

from chameleon_jax import model as model_lib
from chameleon_jax.config import base_config
from chameleon_jax.data import sources
from chameleon_jax.model import ModelConfig, attention
from chameleon_jax.model import loss as loss_lib
from chameleon_jax.model import sharding as shd
from chameleon_jax.model.transformer import RMSNorm
from chameleon_jax.train import optimizer
from chameleon_jax.train import step as step_lib
from numerics import gamma
from test_config import load  # experiments/<name>.py's get_config

STEPS = 40
BF16_EPS = 2.0 ** -8  # relative spacing of bf16 (8-bit significand): one rounding moves a value by < 2^-8


def tiny_config(dtype="float32", param_dtype="float32"):
    config = load("tiny")
    config.model.update(dtype=dtype, param_dtype=param_dtype)
    return config


def dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree)}


def layout(tree):
    """(shape, dtype) per leaf."""
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def moments(opt_state):
    """AdamW's mu and nu trees from the optimizer state (clip state, then adamw's chain)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1, found
    return found[0].mu, found[0].nu


# ------------------------------------------------------------------------------------------------
# State dtypes, from the real init path (eval_shape of step.init_state).
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_params_follow_param_dtype_and_adam_moments_are_fp32(param_dtype):
    config = tiny_config("bfloat16", param_dtype)
    cfg = ModelConfig.from_config(config.model)
    tx = optimizer.make_optimizer(config.optimizer, config.train.steps)
    state = step_lib.abstract_state(cfg, tx)
    assert dtypes(state["params"]) == {param_dtype}
    mu, nu = moments(state["opt_state"])
    assert dtypes(mu) == dtypes(nu) == {"float32"}
    assert jax.tree.structure(mu) == jax.tree.structure(state["params"])


def test_optimizer_runs_in_fp32_for_bf16_grads_and_params():
    """Clip, moments, weight decay and the update see fp32 values: bf16 inputs give exactly the result
    of their fp32 casts. optax alone would keep bf16 moments and a bf16 clipping norm."""
    opt = base_config().optimizer
    opt.update(peak_lr=0.1, warmup_steps=0, decay="constant", clip_norm=1.0)
    tx = optimizer.make_optimizer(opt, 10)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.bfloat16),
              "final_norm": {"scale": jnp.ones((64,), jnp.bfloat16)}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 3.0, jnp.bfloat16), params)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    want_updates, want_state = tx.update(optimizer.to_float32(grads), tx.init(optimizer.to_float32(params)),
                                         optimizer.to_float32(params))
    assert dtypes(updates) == {"float32"} and dtypes(moments(state)) == {"float32"}
    for got, want in zip(jax.tree.leaves((updates, state)), jax.tree.leaves((want_updates, want_state))):
        np.testing.assert_array_equal(got, want)
    # Applying the fp32 update rounds once into the bf16 param.
    assert dtypes(optax.apply_updates(params, updates)) == {"bfloat16"}


def test_global_norm_sums_bf16_leaves_in_fp32():
    """The step's gradient norm (the non-finite guard) and the clip's norm accumulate in fp32.

    Against a float64 norm of the same bf16 values the fp32 sum of n squares errs by at most gamma(n+2)
    relative (n products, the sum, the sqrt). A norm computed in bf16 ends on a bf16 rounding: up to
    2^-9 relative, which these random values reach (checked below against the bf16 result).
    """
    rng = np.random.default_rng(1)
    tree = {"a": jnp.asarray(rng.normal(size=(128, 32)), jnp.bfloat16),
            "b": jnp.asarray(rng.normal(size=(1000,)) * 1e-3, jnp.bfloat16)}
    exact = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    n = sum(x.size for x in jax.tree.leaves(tree))
    got = optimizer.global_norm(tree)
    assert got.dtype == jnp.float32
    assert abs(float(got) - exact) <= gamma(n + 2) * exact
    assert abs(float(optax.tree.norm(tree)) - exact) > gamma(n + 2) * exact  # the bf16 sum would fail


def test_rope_and_rmsnorm_compute_in_fp32_and_round_once():
    """On bf16 input, RoPE and RMSNorm give their fp32 result rounded once to bf16, bit for bit. Done in
    bf16, every product would be rounded on the way, and some elements would differ."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 16, 4, 32)) * 3.0, jnp.bfloat16)
    rope = attention.rope_table(jnp.broadcast_to(jnp.arange(16), (2, 16)), 32, 10_000.0, size=16)
    np.testing.assert_array_equal(attention.apply_rope(x, rope),
                                  attention.apply_rope(x.astype(jnp.float32), rope).astype(jnp.bfloat16))
    norm = RMSNorm(32, 1e-5, "float32")
    norm.scale[...] = jnp.asarray(rng.normal(size=(32,)), jnp.float32)
    assert norm(x).dtype == jnp.bfloat16
    np.testing.assert_array_equal(norm(x), norm(x.astype(jnp.float32)).astype(jnp.bfloat16))


# ------------------------------------------------------------------------------------------------
# What the forward computes in which dtype, read from its jaxpr (no compile).
# ------------------------------------------------------------------------------------------------

def equations(jaxpr):
    """Every equation, including those inside scan / cond / custom_vjp / jit sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    yield from equations(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    yield from equations(sub)


def abstract_batch(config):
    shape = (config.train.batch_size, config.train.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("tokens", "segment_ids", "positions", "loss_mask")}


def abstract_model(cfg):
    """(graphdef, params as ShapeDtypeStructs) of the real init path."""
    graphdef, _ = model_lib.abstract(cfg)
    return graphdef, jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))


def training_loss(graphdef, loss_cfg):
    """The forward of the train step's loss (step.make_train_step's loss_fn, without dropout)."""
    def loss(params, batch):
        model = model_lib.bind(graphdef, params)
        x, _ = model(batch["tokens"], batch["segment_ids"], batch["positions"])
        value, _ = loss_lib.fused_loss_and_metrics(model.final_norm(x), model.output[...], batch,
                                                   image_ids=loss_cfg.image_ids,
                                                   z_loss_weight=loss_cfg.z_loss_weight)
        return value, x
    return loss


def test_bf16_forward_matmuls_with_fp32_softmax_norms_logits_and_loss():
    config = tiny_config("bfloat16", "float32")
    cfg = ModelConfig.from_config(config.model)
    graphdef, params = abstract_model(cfg)
    loss_fn = training_loss(graphdef, step_lib.LossConfig.from_config(config.loss))
    closed = jax.make_jaxpr(loss_fn)(params, abstract_batch(config))
    loss, residual = closed.out_avals
    assert loss.dtype == jnp.float32
    assert residual.dtype == jnp.bfloat16  # the residual stream leaving the last block

    dots, transcendental = [], []
    for eqn in equations(closed.jaxpr):
        name = eqn.primitive.name
        if name == "dot_general":
            dots.append(tuple(v.aval for v in eqn.invars) + (eqn.outvars[0].aval,))
        elif name in ("exp", "exp2", "log", "log1p", "rsqrt", "sqrt", "reduce_max", "logistic"):
            transcendental.append((name, eqn.invars[0].aval.dtype))
    # Every matmul takes bf16 operands (a weight left in fp32 would make a mixed f32 x bf16 dot).
    assert dots and all(a.dtype == b.dtype == jnp.bfloat16 for a, b, _ in dots), dots
    # Attention scores and output logits accumulate into fp32 (preferred_element_type); the rest
    # return bf16.
    fp32_out = [out.shape for *_, out in dots if out.dtype == jnp.float32]
    assert any(shape[-1] == cfg.vocab_size for shape in fp32_out), fp32_out  # logits [B, c, V]
    assert any(len(shape) == 5 for shape in fp32_out), fp32_out              # scores [B, K, G, T, S]
    assert all(out.dtype in (jnp.float32, jnp.bfloat16) for *_, out in dots)
    # Softmax (max, exp), logsumexp (exp, log), z-loss (from lse) and the norms' statistics (rsqrt)
    # are fp32; only SwiGLU's sigmoid (logistic) runs in bf16.
    assert {n for n, _ in transcendental} >= {"exp", "log", "rsqrt", "reduce_max"}
    assert all(dt == jnp.float32 for n, dt in transcendental if n != "logistic"), transcendental


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_gradients_come_back_in_the_param_dtype(param_dtype):
    config = tiny_config("bfloat16", param_dtype)
    cfg = ModelConfig.from_config(config.model)
    graphdef, params = abstract_model(cfg)
    loss_fn = training_loss(graphdef, step_lib.LossConfig.from_config(config.loss))
    grads = jax.eval_shape(jax.grad(lambda p, b: loss_fn(p, b)[0]), params, abstract_batch(config))
    assert jax.tree.map(lambda g: g.dtype, grads) == jax.tree.map(lambda p: p.dtype, params)


# ------------------------------------------------------------------------------------------------
# Training: the bf16 curve against the fp32 one, and the bf16-params option.
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


@pytest.fixture(scope="module")
def batches():
    """The first STEPS batches of experiments/tiny.py's synthetic source, the same for every run."""
    it = sources.make_data_iterator(tiny_config())
    return [next(it) for _ in range(STEPS)]


@pytest.fixture(scope="module")
def initial_state(mesh):
    """The fp32 initial train state (host copy): params and moments are fp32 in both default modes."""
    config = tiny_config()
    tx = optimizer.make_optimizer(config.optimizer, config.train.steps)
    state, _ = step_lib.init_sharded_state(ModelConfig.from_config(config.model), tx, mesh,
                                           jax.random.PRNGKey(config.train.seed))
    return jax.device_get(state)


def train(config, state, batches, mesh):
    """Runs the jitted train step over `batches` from the host `state`.

    Returns the per-step losses and loss-bearing token counts, the final state and the last metrics.
    """
    cfg = ModelConfig.from_config(config.model)
    tx = optimizer.make_optimizer(config.optimizer, config.train.steps)
    shardings = shd.named(mesh, step_lib.state_specs(cfg, tx))
    step = step_lib.jit_train_step(
        step_lib.make_train_step(model_lib.abstract(cfg)[0], cfg, tx, step_lib.LossConfig.from_config(config.loss)),
        mesh, shardings)
    losses, tokens = [], []
    with jax.set_mesh(mesh):
        state = jax.device_put(state, shardings)
        for batch in batches:
            state, metrics = step(state, jax.device_put(batch, shd.batch_sharding(mesh)))
            losses.append(float(metrics["loss"]))
            tokens.append(float(metrics["tokens"]))
    assert all(np.isfinite(losses)), losses
    return np.array(losses), np.array(tokens), jax.device_get(state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def fp32_run(initial_state, batches, mesh):
    return train(tiny_config("float32", "float32"), initial_state, batches, mesh)


def curve_tolerance(fp32_losses, tokens):
    """How far a correct bf16-activation run may drift from the fp32 run at each step.

    bf16 keeps 8 significant bits, so one rounding moves a value by a relative < 2^-8. Two effects:
    - The trajectory. With fp32 master weights, every bf16 rounding perturbs the gradient and so
      the update by a relative ~2^-8. To first order the progress made so far, L_0 - L_s (the
      largest drop by step s), then changes by that relative amount: 2^-8 (L_0 - L_s).
    - The read-out. The loss at step s averages N per-token losses. Their roundings are independent,
      so the mean moves by about 2^-8 L_s / sqrt(N).
    Measured (two seeds): the bf16 gap stayed below 0.16 of this tolerance over these 40 steps and
    below 0.29 over 60. Each planted bug crosses it within STEPS steps:
    - a bf16 loss: the final rounding alone is up to 2^-9 L, about 0.014 at L ~ 7;
    - fp32 weights rounded to bf16 after every update (bf16 "master" weights): 0.08 by step 40;
    - bf16 logits: crosses at a few steps (the dtype test above is the sharp check there).
    """
    progress = np.maximum.accumulate(np.maximum(fp32_losses[0] - fp32_losses, 0.0))
    return BF16_EPS * (progress + fp32_losses / np.sqrt(tokens))


def test_bf16_activations_track_the_fp32_loss_curve(fp32_run, initial_state, batches, mesh):
    fp32_losses, tokens, _, _ = fp32_run
    config = tiny_config("bfloat16", "float32")
    # The shared fp32 init is what this config's own init gives: the same shapes and dtypes.
    want = step_lib.abstract_state(ModelConfig.from_config(config.model),
                                   optimizer.make_optimizer(config.optimizer, config.train.steps))
    assert layout(initial_state) == layout(want)
    bf16_losses, bf16_tokens, state, metrics = train(config, initial_state, batches, mesh)
    np.testing.assert_array_equal(bf16_tokens, tokens)
    assert fp32_losses[0] - fp32_losses[-5:].mean() > 0.5  # the curve has a shape to track
    gap = np.abs(bf16_losses - fp32_losses)
    tol = curve_tolerance(fp32_losses, tokens)
    print(f"\nfp32 vs bf16 activations over {STEPS} steps: max |dloss| {gap.max():.2e} at step {gap.argmax()}, "
          f"max |dloss|/tolerance {np.max(gap / tol):.2f}")
    bad = np.flatnonzero(gap > tol)
    assert bad.size == 0, [(int(s), float(gap[s]), float(tol[s])) for s in bad]
    # Default mixed precision keeps fp32 master weights and moments through training.
    assert dtypes(state["params"]) == dtypes(moments(state["opt_state"])) == {"float32"}
    assert all(metrics[k].dtype == np.float32 for k in ("loss", "grad_norm", "param_norm"))


def test_bf16_params_train_and_keep_fp32_moments(fp32_run, initial_state, batches, mesh):
    """param_dtype="bfloat16": bf16 weights, fp32 AdamW moments (train/optimizer.py), fp32 loss and norms.

    The run must train: its loss must fall by at least half as much as the fp32 run's. It need not
    track the fp32 curve. Every update is rounded into an 8-bit significand, and the gap reached 0.2
    by step 60 in our measurements.
    """
    config = tiny_config("bfloat16", "bfloat16")
    cfg = ModelConfig.from_config(config.model)
    tx = optimizer.make_optimizer(config.optimizer, config.train.steps)
    # The fp32 init rounded to bf16. The optimizer state is unchanged: moments are fp32 zeros either
    # way. The result has the dtypes and structure of this config's own init.
    state = dict(initial_state, params=jax.tree.map(lambda p: p.astype(jnp.bfloat16), initial_state["params"]))
    want = step_lib.abstract_state(cfg, tx)
    assert layout(state) == layout(want)

    fp32_losses = fp32_run[0]
    losses, _, state, metrics = train(config, state, batches, mesh)
    print(f"\nfp32 vs bf16 params over {STEPS} steps: max |dloss| {np.abs(losses - fp32_losses).max():.3f}")
    assert losses[0] - losses[-5:].mean() > 0.5 * (fp32_losses[0] - fp32_losses[-5:].mean()), losses
    assert dtypes(state["params"]) == {"bfloat16"}
    assert dtypes(moments(state["opt_state"])) == {"float32"}
    # The gradients are bf16 here, and the guard's norm is still an fp32 sum.
    assert all(metrics[k].dtype == np.float32 for k in ("loss", "grad_norm", "param_norm"))


def test_bf16_params_accumulate_microbatch_gradients_in_fp32():
    """With bf16 params the microbatch gradient sum is fp32. A bf16 accumulator does not trace: its
    scan carry would turn fp32 after the first token-weighted add."""
    config = tiny_config("bfloat16", "bfloat16")
    cfg = ModelConfig.from_config(config.model)
    tx = optimizer.make_optimizer(config.optimizer, config.train.steps)
    step = step_lib.make_train_step(model_lib.abstract(cfg)[0], cfg, tx, step_lib.LossConfig.from_config(config.loss),
                                    microbatches=2)
    state = step_lib.abstract_state(cfg, tx)
    new_state, metrics = jax.eval_shape(step, state, abstract_batch(config))
    assert layout(new_state) == layout(state)
    assert all(metrics[k].dtype == jnp.float32 for k in ("loss", "grad_norm", "param_norm"))
