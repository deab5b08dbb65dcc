"""VQ-GAN model: shapes, architecture facts, straight-through gradients, quantizer losses, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chameleon_jax.vqgan import model as M
from numerics import ELEMENTWISE, chain_tol, gamma

TINY = M.VQGANConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, embed_dim=8, n_embed=64)


@pytest.fixture(scope="module")
def params():
    return M.init(jax.random.key(0), TINY)


def _images(n, size=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32))


def test_chameleon_config_matches_the_reference_parameter_count():
    shapes = jax.eval_shape(lambda r: M.init(r, M.CHAMELEON), jax.random.key(0))
    assert M.param_count(shapes) == 68_718_467  # the reference torch module (research note A1)
    assert M.CHAMELEON.code_shape == (32, 32)
    enc = shapes["encoder"]
    assert "attn" not in enc["down"]["0"] and "attn_1" in enc["mid"]  # attention only in the mid block
    assert len(shapes["decoder"]["up"]["0"]["block"]) == 3 and len(enc["down"]["0"]["block"]) == 2
    assert "nin_shortcut" in enc["down"]["2"]["block"]["0"] and "nin_shortcut" not in enc["down"]["1"]["block"]["0"]
    assert shapes["quantize"]["embedding"].shape == (8192, 256)


def test_encode_decode_shapes_and_jit(params):
    x = _images(2)
    codes = jax.jit(M.encode)(params, x)
    assert codes.shape == (2, 8, 8) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    out = jax.jit(M.decode)(params, codes)
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32


def test_downsample_pads_right_and_bottom_only():
    p = {"conv": {"kernel": jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0), "bias": jnp.zeros((1,))}}
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    y = M.downsample(p, x)  # top-left tap of each stride-2 window = x[2i, 2j] with no top/left padding
    np.testing.assert_array_equal(y[0, :, :, 0], x[0, ::2, ::2, 0])


def test_group_norm_matches_definition():
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 64)) * 3 + 1
    p = {"scale": jnp.linspace(0.5, 2, 64), "bias": jnp.linspace(-1, 1, 64)}
    g = x.reshape(2, 16, 32, 2)
    ref = (g - g.mean((1, 3), keepdims=True)) / jnp.sqrt(g.var((1, 3), keepdims=True) + 1e-6)
    ref = ref.reshape(2, 4, 4, 64) * p["scale"] + p["bias"]
    # Two fp32 evaluations of 512-term mean and variance (per channel then per group, or at once):
    # the mean is off by gamma(512)*max|x|, i.e. max|x|/sigma of the normalised value, the variance's
    # relative error halves through the sqrt; then the scale (<= 2). swish multiplies by <= 1 + |y|.
    g64 = np.asarray(g, np.float64)
    sigma = np.sqrt(g64.var((1, 3))).min()
    tol = 2 * gamma(512 + 2 * ELEMENTWISE) * (1 + 2 * np.abs(g64).max() / sigma) * 2.0
    np.testing.assert_allclose(M.group_norm(p, x), ref, rtol=0, atol=tol)
    np.testing.assert_allclose(M.group_norm(p, x, swish=True), ref * jax.nn.sigmoid(ref), rtol=0,
                               atol=tol * (1 + float(jnp.abs(ref).max())))


def test_quantizer_nearest_code_and_losses():
    book = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    z = jnp.array([[[[0.9, 0.1], [0.1, 1.5]]]])
    z_q, codes, loss = M.quantize(book, z, beta=0.25, legacy=True)
    np.testing.assert_array_equal(codes, [[[1, 2]]])
    # straight-through z + (z_q - z): two roundings of values <= 2
    np.testing.assert_allclose(z_q, book[jnp.array([[[1, 2]]])], rtol=0, atol=gamma(2) * 2 * 2)
    mse = jnp.mean(jnp.square(book[jnp.array([1, 2])] - z[0, 0]))
    # both terms share the value; weights 1 + β. A 4-term mean of squares, then the weighting.
    np.testing.assert_allclose(loss, 1.25 * mse, rtol=2 * gamma(4 + 3), atol=0)
    # legacy puts β on the codebook term, the paper form on the commitment term
    g_leg = jax.grad(lambda e: M.quantize(e, z, legacy=True)[2])(book)
    g_new = jax.grad(lambda e: M.quantize(e, z, legacy=False)[2])(book)
    # the same 2(e - z)/n scaled by 1 or by 1/4 (a power of two): a few roundings apart
    np.testing.assert_allclose(g_new, 4.0 * g_leg, rtol=2 * gamma(4 + 3), atol=0)


def test_straight_through_gradient_reaches_the_encoder(params):
    x = _images(2)

    def loss(p):
        z = M.encode_latents(p, x)
        z_q, _, _ = M.quantize(p["quantize"]["embedding"], z)
        return jnp.mean(jnp.square(z_q))  # d/dz_q flows to z unchanged

    g = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(g["encoder"]["conv_in"]["kernel"]).sum()) > 0
    z = M.encode_latents(params, x)
    gz = jax.jit(jax.grad(lambda z: jnp.sum(M.quantize(params["quantize"]["embedding"], z)[0] * 3.0)))(z)
    np.testing.assert_array_equal(gz, 3.0)  # identity Jacobian through the lookup: no arithmetic on the cotangent


def test_l2_norm_lookup_equals_plain_lookup_on_a_unit_codebook():
    book = jax.random.normal(jax.random.key(2), (32, 8))
    book = book / jnp.linalg.norm(book, axis=-1, keepdims=True)
    z = jax.random.normal(jax.random.key(3), (4, 5, 5, 8)) * 4.0
    _, c_l2, _ = M.quantize(book, z, l2_norm=True)
    np.testing.assert_array_equal(c_l2, M.nearest_codes(book, z))


def test_nearest_codes_is_argmin_first_index_on_ties_and_last_code_on_nan():
    book = jax.random.normal(jax.random.key(5), (48, 8))
    book = book.at[40].set(book[3]).at[17].set(book[9])  # duplicated codes: exact ties, the first must win
    z = jnp.concatenate([jax.random.normal(jax.random.key(6), (200, 8)), book[jnp.array([3, 9, 40, 17])]])
    # exact squared distances in float64, so the reference's ties are the codebook's own duplicates
    d = ((np.asarray(z, np.float64)[:, None, :] - np.asarray(book, np.float64)[None]) ** 2).sum(-1)
    codes = np.asarray(jax.jit(M.nearest_codes)(book, z))
    np.testing.assert_array_equal(codes, d.argmin(-1))
    assert list(codes[-4:]) == [3, 9, 3, 9]
    bad = jax.jit(M.nearest_codes)(book, jnp.full((2, 8), jnp.nan))
    np.testing.assert_array_equal(bad, [47, 47])  # in range (a valid token), as for any bad input


def test_jit_encode_gives_the_codes_of_plain_jit(params):
    x = _images(4, seed=7)
    np.testing.assert_array_equal(M.jit_encode()(params, x), jax.jit(M.encode)(params, x))


def test_encode_is_batch_sharded_and_matches_unsharded(params):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = _images(8, seed=4)
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    codes = jax.jit(M.encode)(params, sharded)
    assert len(codes.sharding.device_set) == 8
    np.testing.assert_array_equal(codes, M.encode(params, x))


def test_init_rejects_widths_groupnorm_cannot_split():
    with pytest.raises(ValueError, match="multiple of 32"):
        M.init(jax.random.key(0), M.VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), n_embed=8, embed_dim=4))


def test_zeroed_residual_branches_make_every_block_the_identity(params):
    zeroed = M.scale_residual_branches(params, 0.0)
    x = _images(2, size=8) @ jnp.ones((3, 32)) / 3  # a 32-channel activation
    block = zeroed["encoder"]["down"]["0"]["block"]["0"]
    np.testing.assert_array_equal(M.resnet_block(block, x), x + block["conv2"]["bias"])
    attn = zeroed["encoder"]["mid"]["attn_1"]
    x64 = jnp.concatenate([x, x], -1)
    # a zero kernel makes the projection exactly 0 + bias: the same one addition as the reference
    np.testing.assert_array_equal(M.attn_block(attn, x64), x64 + attn["proj_out"]["bias"])
    # only the branches' last kernels changed: the rest of the tree (and so an import's key map) is intact
    changed = jax.tree_util.tree_map_with_path(
        lambda p, a, b: jax.tree_util.keystr(p) if not np.array_equal(a, b) else None, params, zeroed)
    names = [n for n in jax.tree.leaves(changed) if n]
    assert names and all(("'conv2'" in n or "'proj_out'" in n) and n.endswith("['kernel']") for n in names)
    assert jax.tree.structure(zeroed) == jax.tree.structure(params)


def test_patch_encoder_codes_depend_only_on_their_own_patch():
    cfg = M.VQGANConfig(resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16,
                        embed_dim=8, n_embed=64, encoder_kind="patch", patch_hidden=32)
    params = M.init(jax.random.PRNGKey(0), cfg)
    assert set(params["encoder"]) == {"patch_in", "patch_mid", "conv_out"}
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
    lat = jax.jit(M.encode_latents)(params, images)
    assert lat.shape == (2, 16, 16, 8) and M.decode(params, M.encode(params, images)).shape == images.shape
    # Repaint the 2×2 patch at latent (3, 5) of image 0: only that latent changes.
    edited = images.at[0, 6:8, 10:12].set(0.7)
    diff = np.abs(np.asarray(M.encode_latents(params, edited) - lat)).max(axis=-1)
    assert diff[0, 3, 5] > 1e-4
    diff[0, 3, 5] = 0
    assert diff.max() == 0.0
    # The same patch content gives the same latent wherever it sits (a per-patch MLP, no position).
    tiled = jnp.tile(images[:, :2, :2], (1, 16, 16, 1))
    tl = np.asarray(M.encode_latents(params, tiled))
    # Every patch runs the same MLP, but vector lanes and loop tails may round differently: the
    # any-order bound over its contractions (2x2x3 pixels, two hidden layers, the output projection).
    tol = chain_tol(tl, [12, 32, 32, 32, 4 * ELEMENTWISE])
    np.testing.assert_allclose(tl, np.broadcast_to(tl[:, :1, :1], tl.shape), rtol=0, atol=tol)
    with pytest.raises(ValueError, match="encoder_kind"):
        M.init(jax.random.PRNGKey(0), M.VQGANConfig(resolution=32, ch=32, ch_mult=(1, 2), encoder_kind="vit"))
