"""Parity with taming-transformers (the reference Chameleon's VQ-GAN was taken from), encoder and decoder.

The peer is taming's own Encoder, Decoder and VectorQuantizer2 (PyPI `taming-transformers-rom1504`), wired
as `taming.models.vqgan.VQModel` wires them (encoder -> quant_conv -> quantize; post_quant_conv -> decoder).
VQModel itself is not imported: its module needs pytorch_lightning and torchvision at import time, which
the CPU torch of the `peers` extra cannot carry (docs/vqgan.md). Random weights (norms included) go into
both through one state dict in vqgan.ckpt layout, read by the release importer's `from_taming`.
"""
import jax
import numpy as np
import pytest
import torch
try:  # not in the peers extra (its dependencies break transformers there): docs/vqgan.md
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2
except ImportError as e:
    raise ImportError(f"{e}: the taming peer is missing; install it with "
                      "`.venv/bin/pip install --no-deps taming-transformers-rom1504` (docs/vqgan.md)") from e

from chameleon_jax.vqgan import convert, model as M
from numerics import ELEMENTWISE, chain_tol

# Attention at the 8 px level too (attn_resolutions), besides the mid blocks, to cover taming's level attention.
DDCONFIG = dict(double_z=False, z_channels=32, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
EMBED_DIM, N_EMBED = 8, 64


class TamingVQ(torch.nn.Module):
    """taming's VQModel inference path, from taming's modules, with its state-dict names."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = Encoder(**DDCONFIG), Decoder(**DDCONFIG)
        self.quantize = VectorQuantizer2(N_EMBED, EMBED_DIM, beta=0.25, sane_index_shape=True)
        self.quant_conv = torch.nn.Conv2d(DDCONFIG["z_channels"], EMBED_DIM, 1)
        self.post_quant_conv = torch.nn.Conv2d(EMBED_DIM, DDCONFIG["z_channels"], 1)

    def encode(self, x):
        _, _, (_, _, codes) = self.quantize(self.quant_conv(self.encoder(x)))
        return codes

    def decode_code(self, codes):
        b, h, w = codes.shape
        z_q = self.quantize.get_codebook_entry(codes.reshape(-1), (b, h, w, EMBED_DIM))
        return self.decoder(self.post_quant_conv(z_q))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    peer = TamingVQ().eval()
    with torch.no_grad():  # non-trivial norms, so a swapped scale/bias would show
        for name, p in peer.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        # A codebook spread like the latents, so images map to many different codes.
        peer.quantize.embedding.weight.normal_(0.0, 0.5)
    state_dict = {k: v.clone() for k, v in peer.state_dict().items()}
    state_dict["loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)  # vqgan.ckpt carries the GAN loss too
    cfg = convert.config_from_taming({"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": {**DDCONFIG, "attn_type": "vanilla"},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}})
    return peer, convert.from_taming(state_dict, cfg), cfg


def test_encode_gives_taming_codes(models):
    peer, params, _ = models
    x = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        want = peer.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    codes = np.asarray(jax.jit(M.encode)(params, x))
    assert len(np.unique(want)) > 8  # a meaningful comparison, not one code everywhere
    np.testing.assert_array_equal(codes, want)


def test_decode_matches_taming_pixels(models):
    peer, params, cfg = models
    codes = np.random.default_rng(1).integers(0, N_EMBED, (2, 8, 8)).astype(np.int32)
    with torch.no_grad():
        want = peer.decode_code(torch.from_numpy(codes).long()).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(jax.jit(M.decode)(params, codes))
    # Tolerance 1e-4 (pixels here reach ~1.9, like real decoder outputs in [-1, 1]). Along the decoder's path
    # the contractions sum n ~ 14.5k terms (_decoder_lengths; GroupNorm statistics and attention dominate).
    # Rounding errors of sums evaluated in different orders grow like sqrt(n)*u*|x| per side (Higham §3.1's
    # typical case): 2 * 120 * 6e-8 * 1.9 ~ 2.7e-5, so 1e-4 is ~4x the expected discrepancy (measured:
    # 4e-6). Higham's worst case for ANY order, n*u*|x| per side (chain_tol, ~3e-3), bounds it from above.
    lengths = _decoder_lengths(cfg)
    typical = 2 * np.sqrt(sum(lengths)) * 2.0 ** -24 * np.abs(want).max()
    assert typical < 1e-4 < chain_tol(want, lengths)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def _decoder_lengths(c):
    """Contraction lengths along the decoder: 1x1 post_quant_conv (embed_dim), conv_in (9*z), then per
    ResnetBlock two GroupNorms (mean and variance over H*W*C/32 each) and two 3x3 convs (9*C), per
    attention block a GroupNorm, q/k/v (C), scores (C), softmax and weighted sum (H*W each), proj_out (C),
    per upsample a 3x3 conv, and norm_out + conv_out; swish/exp/rsqrt add ELEMENTWISE ulps per stage."""
    side = c.resolution // 2 ** (len(c.ch_mult) - 1)
    ch = c.ch * c.ch_mult[-1]

    def res(side, cin, cout):
        return [2 * side * side * cin // 32, 9 * cin, 2 * side * side * cout // 32, 9 * cout, cin, 4 * ELEMENTWISE]

    def attn(side, ch):
        return [2 * side * side * ch // 32, ch, ch, side * side, side * side, ch, 2 * ELEMENTWISE]

    lengths = [c.embed_dim, 9 * c.z_channels] + res(side, ch, ch) + attn(side, ch) + res(side, ch, ch)
    for level in reversed(range(len(c.ch_mult))):
        out = c.ch * c.ch_mult[level]
        for _ in range(c.num_res_blocks + 1):
            lengths += res(side, ch, out) + (attn(side, out) if side in c.attn_resolutions else [])
            ch = out
        if level:
            side *= 2
            lengths.append(9 * ch)
    return lengths + [2 * side * side * ch // 32, 9 * ch, 2 * ELEMENTWISE]


def test_hf_config_with_attn_type_none_is_refused():
    """HF's attn_type="none" drops the mid attention; our model always has it, so the import refuses it
    instead of keeping a template's random attention weights."""
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig

    with pytest.raises(ValueError, match="attn_type='none'.*supported values: \\('vanilla',\\)"):
        convert.config_from_hf(ChameleonVQVAEConfig(attn_type="none"))
