"""Chameleon's VQ-GAN (taming-transformers VQModel) as pure functions of a params pytree.

Spec: chameleon-spec.md §4, research note A1. Layout conventions:
- images NHWC float32 in [-1, 1]; codes int32 [B, h, w] in raster order.
- params is a nested dict whose key paths are taming's state-dict names with the leaf renamed:
  conv `weight` (OIHW) -> `kernel` (HWIO), GroupNorm `weight` -> `scale`; indices are string keys
  ("down"/"0"/"block"/"1"), so `"encoder.down.0.block.1.conv1.weight"` lives at
  `params["encoder"]["down"]["0"]["block"]["1"]["conv1"]["kernel"]` and an import is a key map.
- The architecture is read from the params (levels, blocks, widths, attention), so encode/decode need
  nothing but params and inputs. The config only matters to `init`.

Blocks: GroupNorm(32, eps 1e-6) + swish (fused into one elementwise pass after float32 statistics);
ResnetBlock with a 1×1 `nin_shortcut` when channels change; Downsample = zero pad right/bottom then
3×3 stride-2 VALID conv; Upsample = nearest ×2 then 3×3 conv; single-head attention in the mid blocks.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
GN_GROUPS, GN_EPS = 32, 1e-6


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # encoder; the decoder has num_res_blocks + 1 per level
    attn_resolutions: tuple[int, ...] = ()  # Chameleon: attention only in the mid blocks
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 8192
    # "chameleon": the conv encoder above (every latent sees the whole image through the mid attention).
    # "patch": NOT Chameleon's - each latent is an MLP of its own f×f pixel patch only, so a patch's code
    # does not depend on the rest of the image. For toy data whose content is fixed per patch (the
    # shapes smoke), that makes codes a function of the scene, which a small transformer can learn
    # to write from a caption; the decoder is unchanged.
    encoder_kind: str = "chameleon"
    patch_hidden: int = 256

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def code_shape(self) -> tuple[int, int]:
        s = self.resolution // self.downsample_factor
        return s, s

    @classmethod
    def from_dict(cls, d) -> "VQGANConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(d).items() if k in fields}
        return cls(**d)


CHAMELEON = VQGANConfig()  # 512 px -> 32×32 codes from 8192, ~68.7 M params


# --------------------------------------------------------------------------------------------- layers

def _pads(padding, k: int):
    if padding == "SAME":
        return ((k // 2, (k - 1) // 2),) * 2
    return tuple(tuple(q) for q in padding)


def _conv_raw(x, kernel, stride, pads):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv(p: Params, x: jax.Array, stride: int = 1, padding="SAME") -> jax.Array:
    return conv_unbiased(p, x, stride, padding) + p["bias"].astype(x.dtype)


def conv_unbiased(p: Params, x: jax.Array, stride: int = 1, padding="SAME") -> jax.Array:
    """The convolution without its bias, for a consumer that adds the bias itself (`group_norm`'s
    `bias`, a residual sum): XLA:CPU's convolution fusion does not take the bias add, which then cost
    one extra pass over the activation per layer (~10% of the 64 px encode, profiled 2026-12-02)."""
    kernel = p["kernel"].astype(x.dtype)
    return _conv_raw(x, kernel, stride, _pads(padding, kernel.shape[0]))


def group_norm(p: Params, x: jax.Array, swish: bool = False, bias: jax.Array | None = None) -> jax.Array:
    """GroupNorm(32, eps 1e-6) of `x + bias` (bias per channel, default none), optionally followed by
    swish, as one scale-shift pass per element.

    Statistics are float32 and two-pass (mean, then centred variance) for parity with torch. Each pass
    reduces over pixels per channel first ([B, HW, C] -> [B, C], a column sum XLA vectorises along C)
    and only then over the channels of a group: 2.3x faster at 512 px x 128 channels, and 2.9x at
    64 px x 32, than reducing (pixels, channel-in-group) of a [B, HW, G, C/G] view in one go (measured
    2026-11-27). The normalisation is folded into a per-(batch, channel) scale a and shift, so the big
    tensor is touched by two reductions and one fused elementwise `x*a + b` (then `y*sigmoid(y)`).
    A preceding convolution's bias enters the statistics per channel (pixel sums + HW·bias) and the
    folded shift, so `x + bias` is never written out (see `conv_unbiased`).
    """
    b_, h, w, c = x.shape
    per_group = c // GN_GROUPS
    xf = x.astype(jnp.float32).reshape(b_, h * w, c)
    bias = jnp.zeros((c,), jnp.float32) if bias is None else bias.astype(jnp.float32)

    def group_mean(channel_sums):  # [B, C] sums over pixels -> each channel's group mean, [B, C]
        g = channel_sums.reshape(b_, GN_GROUPS, per_group).sum(-1) / (h * w * per_group)
        return jnp.repeat(g, per_group, axis=1)

    mean = group_mean(xf.sum(axis=1) + (h * w) * bias)
    centre = mean - bias  # x + bias - mean = x - centre
    var = group_mean(jnp.square(xf - centre[:, None, :]).sum(axis=1))
    a = jax.lax.rsqrt(var + GN_EPS) * p["scale"]
    shift = p["bias"] - centre * a
    y = x * a[:, None, None, :].astype(x.dtype) + shift[:, None, None, :].astype(x.dtype)
    return y * jax.nn.sigmoid(y) if swish else y


def resnet_block(p: Params, x: jax.Array, x_bias: jax.Array | None = None) -> jax.Array:
    """ResnetBlock of `x + x_bias` (x_bias: the producing convolution's bias, not yet added). Each
    convolution's bias is added by its consumer: conv1's inside norm2, conv2's in the residual sum."""
    h = conv_unbiased(p["conv1"], group_norm(p["norm1"], x, swish=True, bias=x_bias))
    h = conv_unbiased(p["conv2"], group_norm(p["norm2"], h, swish=True, bias=p["conv1"]["bias"]))
    h = h + p["conv2"]["bias"].astype(h.dtype)  # dropout is 0.0 in Chameleon
    if x_bias is not None:
        x = x + x_bias.astype(x.dtype)
    if "nin_shortcut" in p:
        x = conv(p["nin_shortcut"], x)
    return x + h


def attn_block(p: Params, x: jax.Array) -> jax.Array:
    b_, h, w, c = x.shape
    n = group_norm(p["norm"], x).reshape(b_, h * w, c)

    def proj(q):
        return n @ q["kernel"].reshape(c, c).astype(x.dtype) + q["bias"].astype(x.dtype)

    q, k, v = proj(p["q"]), proj(p["k"]), proj(p["v"])
    att = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5), axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", att, v)
    out = out @ p["proj_out"]["kernel"].reshape(c, c).astype(x.dtype) + p["proj_out"]["bias"].astype(x.dtype)
    return x + out.reshape(b_, h, w, c)


def downsample(p: Params, x: jax.Array) -> jax.Array:
    return conv(p["conv"], x, stride=2, padding=((0, 1), (0, 1)))  # right/bottom only, not SAME


def downsample_unbiased(p: Params, x: jax.Array) -> jax.Array:
    return conv_unbiased(p["conv"], x, stride=2, padding=((0, 1), (0, 1)))


def upsample(p: Params, x: jax.Array) -> jax.Array:
    b_, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b_, h, 2, w, 2, c)).reshape(b_, 2 * h, 2 * w, c)
    return conv(p["conv"], x)


def _n(d: dict) -> int:
    return len([k for k in d if k.isdigit()])


def _mid(p: Params, x: jax.Array) -> jax.Array:
    return resnet_block(p["block_2"], attn_block(p["attn_1"], resnet_block(p["block_1"], x)))


def patch_encoder(p: Params, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/f, W/f, z]: space-to-depth by f, then a pointwise MLP per patch."""
    b, hgt, wid, c = x.shape
    f = int(round((p["patch_in"]["kernel"].shape[2] // c) ** 0.5))  # patch side, from the kernel's fan-in
    h = x.reshape(b, hgt // f, f, wid // f, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hgt // f, wid // f, f * f * c)
    h = jax.nn.swish(conv(p["patch_in"], h))
    h = jax.nn.swish(conv(p["patch_mid"], h))
    return conv(p["conv_out"], h)


def conv_in_rgb(p: Params, x: jax.Array) -> jax.Array:
    """The first conv without its bias (the first block adds it), with the image's channels zero-padded
    to a multiple of 4 (the kernel's input rows likewise), which is exact: XLA:CPU's convolution ran a
    16×64²×3 -> 32 conv in 0.58 ms with 4 channels against 1.89 ms with 3 (2026-11-27); at 512 px the
    two are within noise."""
    extra = -x.shape[-1] % 4
    if not extra:
        return conv_unbiased(p, x)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return conv_unbiased({"kernel": jnp.pad(p["kernel"], ((0, 0), (0, 0), (0, extra), (0, 0)))}, x)


def encoder(p: Params, x: jax.Array) -> jax.Array:
    if "patch_in" in p:
        return patch_encoder(p, x)
    h, pending = conv_in_rgb(p["conv_in"], x), p["conv_in"]["bias"]  # pending: a bias not yet added to h
    levels = _n(p["down"])
    for i in range(levels):
        lvl = p["down"][str(i)]
        for j in range(_n(lvl["block"])):
            h, pending = resnet_block(lvl["block"][str(j)], h, pending), None
            if "attn" in lvl:
                h = attn_block(lvl["attn"][str(j)], h)
        if "downsample" in lvl:
            h, pending = downsample_unbiased(lvl["downsample"], h), lvl["downsample"]["conv"]["bias"]
    if pending is not None:
        h = h + pending.astype(h.dtype)
    h = _mid(p["mid"], h)
    return conv(p["conv_out"], group_norm(p["norm_out"], h, swish=True))


def decoder_trunk(p: Params, z: jax.Array) -> jax.Array:
    """Everything up to (not including) conv_out; split out so the GAN's adaptive weight can take
    gradients with respect to the last layer alone."""
    h = _mid(p["mid"], conv(p["conv_in"], z))
    for i in reversed(range(_n(p["up"]))):
        lvl = p["up"][str(i)]
        for j in range(_n(lvl["block"])):
            h = resnet_block(lvl["block"][str(j)], h)
            if "attn" in lvl:
                h = attn_block(lvl["attn"][str(j)], h)
        if "upsample" in lvl:
            h = upsample(lvl["upsample"], h)
    return group_norm(p["norm_out"], h, swish=True)


def decoder(p: Params, z: jax.Array) -> jax.Array:
    return conv(p["conv_out"], decoder_trunk(p, z))


# ------------------------------------------------------------------------------------------ quantizer

def nearest_codes(codebook: jax.Array, z: jax.Array) -> jax.Array:
    """argmin_k ‖z − e_k‖² over the last axis, in float32 (‖z‖² is constant per row, so dropped).

    The first index attaining the minimum, as `jnp.argmin` gives, found as two plain float reductions:
    the row minimum, then the smallest of `index + K * sign(d - min)`, which is the index itself
    exactly where d equals the minimum and at least K elsewhere (float32 holds every integer below
    2K exactly). XLA:CPU's variadic (value, index) reduction took 1.3 ms for [512 rows, 512 codes]
    in the 64 px encode; an int32 `where(d == min, index, K)` ran as two passes of XLA's own loops
    (a select, then a windowed min) because YNNPACK takes neither integers nor selects; sign, multiply,
    add and min are all YNNPACK's, so the index search is one fused YNNPACK reduction:
    0.39 -> 0.23 ms for [512, 512] (2026-12-02)."""
    z = z.astype(jnp.float32)
    e = codebook.astype(jnp.float32)
    d = jnp.sum(e * e, axis=-1) - 2.0 * jnp.einsum("...d,kd->...k", z, e)
    k = d.shape[-1]
    gap = d - jnp.min(d, axis=-1, keepdims=True)  # exactly 0 at the minima, > 0 elsewhere
    index = jax.lax.broadcasted_iota(jnp.float32, d.shape, d.ndim - 1)
    first = jnp.min(index + k * jnp.sign(gap), axis=-1)
    # a row with a NaN distance has a NaN minimum: the last code, as for any bad input
    return jnp.clip(jnp.nan_to_num(first, nan=k - 1), 0, k - 1).astype(jnp.int32)


def quantize(codebook: jax.Array, z: jax.Array, *, beta: float = 0.25, legacy: bool = True,
             l2_norm: bool = False):
    """Nearest-code lookup with a straight-through estimator (taming VectorQuantizer2).

    Returns (z_q, codes, loss). legacy=True (Chameleon/taming default): loss = ‖sg[z_q] − z‖² +
    β‖z_q − sg[z]‖², i.e. weight 1 on commitment and β on the codebook (taming's historical swap);
    legacy=False is the VQ-VAE paper's β·commit + codebook. l2_norm: z and codes are projected onto the
    unit sphere first (ViT-VQGAN/LlamaGen); with a unit-norm codebook stored in params the plain lookup
    of `encode` gives the same codes, so inference needs no flag.
    """
    if l2_norm:
        z = z * jax.lax.rsqrt(jnp.sum(jnp.square(z), -1, keepdims=True) + 1e-12)
        codebook = codebook * jax.lax.rsqrt(jnp.sum(jnp.square(codebook), -1, keepdims=True) + 1e-12)
    codes = nearest_codes(codebook, z)
    z_q = jnp.take(codebook, codes, axis=0).astype(z.dtype)
    commit = jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
    book = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
    loss = commit + beta * book if legacy else beta * commit + book
    z_st = z + jax.lax.stop_gradient(z_q - z)
    return z_st, codes, loss


# ------------------------------------------------------------------------------------------ public API

def encode_latents(params: Params, images: jax.Array) -> jax.Array:
    """images [B,H,W,3] in [-1,1] -> pre-quantisation latents [B,h,w,embed_dim] (after quant_conv)."""
    return conv(params["quant_conv"], encoder(params["encoder"], images.astype(jnp.float32)))


def encode(params: Params, images: jax.Array) -> jax.Array:
    """images float [B,H,W,3] in [-1,1] -> codes int32 [B,H/f,W/f]."""
    return nearest_codes(params["quantize"]["embedding"], encode_latents(params, images))


def cpu_compiler_options() -> dict[str, Any]:
    """XLA options for compiling the encoder for this host's CPU.

    With AVX-512, XLA's own loops use 512-bit vectors (`xla_cpu_prefer_vector_width=512`; XLA's default
    is 256). YNNPACK runs the convolutions and reductions with its own kernels either way; what XLA's
    loops run is every GroupNorm's scale-shift + swish (an exp and a divide per element), the residual
    sums and the padding, so the option matters wherever the activations are large against their
    convolutions: scale-shift + swish of 8x64²x32 took 0.26 ms at 512 bits against 0.55-0.75 ms at
    256, and the 64 px smoke encode on one device 1.13-1.17x less CPU time; on the train step's matmul
    shapes the option is within noise (chameleon_jax.cpu), so it is chosen here, per program, not as
    a process-wide flag. It needs AVX-512 (Intel Xeon since Skylake-SP, AMD EPYC since Genoa); other
    CPUs, and hosts whose default backend is an accelerator, get no option."""
    from chameleon_jax import cpu
    if jax.default_backend() != "cpu" or "avx512f" not in cpu.machine().features:
        return {}
    return {"xla_cpu_prefer_vector_width": 512}


def jit_encode(**jit_kwargs) -> Any:
    """`jax.jit(encode, **jit_kwargs)` compiled with `cpu_compiler_options()`: how a program should
    build its encoder on a CPU host. Only the vector width of XLA's elementwise loops differs, which
    changes no per-element arithmetic: the codes were identical to plain `jax.jit(encode)` in every
    comparison (tests/test_vqgan.py, bench_vqgan's HF parity column)."""
    return jax.jit(encode, compiler_options=cpu_compiler_options(), **jit_kwargs)


def lookup(params: Params, codes: jax.Array) -> jax.Array:
    """codes int [B,h,w] -> quantised latents [B,h,w,embed_dim] (taming get_codebook_entry)."""
    return jnp.take(params["quantize"]["embedding"], codes, axis=0)


def decode_latents(params: Params, z_q: jax.Array) -> jax.Array:
    return decoder(params["decoder"], conv(params["post_quant_conv"], z_q))


def decode(params: Params, codes: jax.Array) -> jax.Array:
    """codes int [B,h,w] -> images float32 [B,h·f,w·f,3] (unclamped; see images.to_uint8)."""
    return decode_latents(params, lookup(params, codes))


# --------------------------------------------------------------------------------------------- init

def _conv_init(key, k: int, cin: int, cout: int, scale: float = 1.0) -> Params:
    # torch Conv2d's default: U(±1/sqrt(fan_in)) for both kernel and bias, so from-scratch runs match taming
    bound = 1.0 / np.sqrt(cin * k * k)
    kk, kb = jax.random.split(key)
    return {"kernel": scale * jax.random.uniform(kk, (k, k, cin, cout), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(kb, (cout,), jnp.float32, -bound, bound)}


def _norm_init(c: int) -> Params:
    if c % GN_GROUPS:
        raise ValueError(f"GroupNorm(32) needs channels divisible by 32, got {c}; pick ch as a multiple of 32")
    return {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}


def _resnet_init(key, cin: int, cout: int) -> Params:
    k1, k2, k3 = jax.random.split(key, 3)
    p = {"norm1": _norm_init(cin), "conv1": _conv_init(k1, 3, cin, cout),
         "norm2": _norm_init(cout), "conv2": _conv_init(k2, 3, cout, cout)}
    if cin != cout:
        p["nin_shortcut"] = _conv_init(k3, 1, cin, cout)
    return p


def _attn_init(key, c: int) -> Params:
    ks = jax.random.split(key, 4)
    return {"norm": _norm_init(c), **{n: _conv_init(k, 1, c, c) for n, k in zip(("q", "k", "v", "proj_out"), ks)}}


def _mid_init(key, c: int) -> Params:
    k1, k2, k3 = jax.random.split(key, 3)
    return {"block_1": _resnet_init(k1, c, c), "attn_1": _attn_init(k2, c), "block_2": _resnet_init(k3, c, c)}


def init(rng: jax.Array, config: VQGANConfig) -> Params:
    """Fresh parameters for `config` (a VQGANConfig or a mapping of its fields)."""
    cfg = config if isinstance(config, VQGANConfig) else VQGANConfig.from_dict(config)
    keys = iter(jax.random.split(rng, 1024))
    mult = (1,) + tuple(cfg.ch_mult)
    levels = len(cfg.ch_mult)

    enc: Params = {"conv_in": _conv_init(next(keys), 3, cfg.in_channels, cfg.ch), "down": {}}
    res = cfg.resolution
    for i in range(levels):
        cin, cout = cfg.ch * mult[i], cfg.ch * cfg.ch_mult[i]
        lvl: Params = {"block": {}}
        for j in range(cfg.num_res_blocks):
            lvl["block"][str(j)] = _resnet_init(next(keys), cin if j == 0 else cout, cout)
        if res in cfg.attn_resolutions:
            lvl["attn"] = {str(j): _attn_init(next(keys), cout) for j in range(cfg.num_res_blocks)}
        if i != levels - 1:
            lvl["downsample"] = {"conv": _conv_init(next(keys), 3, cout, cout)}
            res //= 2
        enc["down"][str(i)] = lvl
    top = cfg.ch * cfg.ch_mult[-1]
    enc["mid"] = _mid_init(next(keys), top)
    enc["norm_out"] = _norm_init(top)
    enc["conv_out"] = _conv_init(next(keys), 3, top, cfg.z_channels)
    if cfg.encoder_kind == "patch":
        f, hid = cfg.downsample_factor, cfg.patch_hidden
        enc = {"patch_in": _conv_init(next(keys), 1, f * f * cfg.in_channels, hid),
               "patch_mid": _conv_init(next(keys), 1, hid, hid),
               "conv_out": _conv_init(next(keys), 1, hid, cfg.z_channels)}
    elif cfg.encoder_kind != "chameleon":
        raise ValueError(f"model.encoder_kind={cfg.encoder_kind!r}; choose 'chameleon' or 'patch'.")

    dec: Params = {"conv_in": _conv_init(next(keys), 3, cfg.z_channels, top), "mid": _mid_init(next(keys), top),
                   "up": {}}
    cin = top
    for i in reversed(range(levels)):
        cout = cfg.ch * cfg.ch_mult[i]
        lvl = {"block": {}}
        for j in range(cfg.num_res_blocks + 1):
            lvl["block"][str(j)] = _resnet_init(next(keys), cin if j == 0 else cout, cout)
        cin = cout
        if res in cfg.attn_resolutions:
            lvl["attn"] = {str(j): _attn_init(next(keys), cout) for j in range(cfg.num_res_blocks + 1)}
        if i != 0:
            lvl["upsample"] = {"conv": _conv_init(next(keys), 3, cout, cout)}
            res *= 2
        dec["up"][str(i)] = lvl
    dec["norm_out"] = _norm_init(cin)
    dec["conv_out"] = _conv_init(next(keys), 3, cin, cfg.out_ch)

    return {
        "encoder": enc,
        "quant_conv": _conv_init(next(keys), 1, cfg.z_channels, cfg.embed_dim),
        "quantize": {"embedding": jax.random.uniform(next(keys), (cfg.n_embed, cfg.embed_dim), jnp.float32,
                                                     -1.0 / cfg.n_embed, 1.0 / cfg.n_embed)},
        "post_quant_conv": _conv_init(next(keys), 1, cfg.embed_dim, cfg.z_channels),
        "decoder": dec,
    }


def scale_residual_branches(params: Params, scale: float) -> Params:
    """Multiplies the last layer of every residual branch (ResnetBlock conv2, attention proj_out) by
    `scale`. With scale 0 every block starts as the identity (SkipInit / zero-init residuals, as in
    diffusion U-Nets), so at step 0 the autoencoder is a shallow linear path plus the norms: colour is
    copied from the start instead of being rediscovered through ~20 random residual branches. Measured
    on the 64 px shapes smoke: 22.1 dB vs 20.4 dB held-out PSNR after 300 steps, same seed.
    Leaves the architecture, and therefore imports, untouched."""
    def visit(path, x):
        names = [getattr(k, "key", None) for k in path]
        return x * scale if names[-1] == "kernel" and names[-2] in ("conv2", "proj_out") else x
    return jax.tree_util.tree_map_with_path(visit, params)


def param_count(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
