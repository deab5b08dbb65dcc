"""Parity with HF transformers' ChameleonVQVAE (encoder only; HF has no decoder): same codes, latents within the fp32 any-order bound."""
import jax
import numpy as np
import pytest
import torch
from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

from chameleon_jax.vqgan import convert, model as M
from numerics import ELEMENTWISE, chain_tol


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = ChameleonVQVAEConfig(embed_dim=32, num_embeddings=128, latent_channels=32, resolution=32, base_channels=32,
                               channel_multiplier=[1, 2, 2], num_res_blocks=1)
    m = ChameleonVQVAE(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped scale/bias would show
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return m


def test_codes_and_latents_match_hf(hf_model):
    params = convert.from_hf(hf_model)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf_model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    codes = np.asarray(jax.jit(M.encode)(params, x))
    assert len(np.unique(codes)) > 4  # a meaningful comparison, not one code everywhere
    np.testing.assert_array_equal(codes.reshape(-1), ref.image_tokens.numpy())
    latents = np.asarray(M.encoder(params["encoder"], x))
    want = ref.last_hidden_state.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(latents, want, rtol=0, atol=chain_tol(want, _encoder_lengths(hf_model.config)))


def _encoder_lengths(c):
    """Contraction lengths along the encoder's path: a 3x3 conv sums 9*C_in terms, a GroupNorm
    H*W*C/32 per statistic (mean, then variance), the mid attention C (scores) and H*W (softmax, sum)."""
    side, ch, lengths = c.resolution, c.base_channels, [9 * c.in_channels]
    for level, mult in enumerate(c.channel_multiplier):
        for _ in range(c.num_res_blocks):
            out = c.base_channels * mult
            lengths += [2 * side * side * ch // 32, 9 * ch, 2 * side * side * out // 32, 9 * out, ch, 4 * ELEMENTWISE]
            ch = out
        if level < len(c.channel_multiplier) - 1:
            lengths.append(9 * ch)
            side //= 2
    mid_block = [2 * side * side * ch // 32, 9 * ch] * 2 + [2 * ELEMENTWISE]
    attention = [2 * side * side * ch // 32, ch, ch, side * side, side * side, ch, 2 * ELEMENTWISE]
    return lengths + 2 * mid_block + attention + [2 * side * side * ch // 32, 9 * ch, c.latent_channels]


def test_import_completes_a_template_and_round_trips(hf_model):
    cfg = convert.config_from_hf(hf_model.config)
    template = M.init(jax.random.key(0), cfg)
    params = convert.from_hf(hf_model, template)
    assert jax.tree.structure(params) == jax.tree.structure(template)  # decoder kept from the template
    sd = convert.to_state_dict(params)
    for k, v in hf_model.state_dict().items():
        np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
    bad = dict(hf_model.state_dict())
    bad["quant_conv.weight"] = torch.zeros(16, 32, 1, 1)
    with pytest.raises(ValueError, match="does not match"):
        convert.from_state_dict(bad, template)
