"""HF transformers import: random tiny `ChameleonForConditionalGeneration` models -> our params, same logits.

Every HF parameter is randomised (norm scales, q/k-norm weights and biases with different values per
QK group), the model is written with `save_pretrained`, converted through the CLI entry point, restored
from the Orbax checkpoint, and both models run in fp32.
"""

import json

import numpy as np
import pytest

# The `peers` extra (the README's test command installs it): a missing peer fails, never skips.
import torch  # noqa: E402
import transformers  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from chameleon_jax import model as M  # noqa: E402
from chameleon_jax.convert import load_converted  # noqa: E402
from chameleon_jax.convert import __main__ as convert_program  # noqa: E402
from chameleon_jax.convert.hf import params_from_hf  # noqa: E402
from chameleon_jax.text import image_token_name  # noqa: E402
from numerics import chain_tol, transformer_lengths  # noqa: E402

VOCAB = 320
IMAGE_IDS = (4, 4 + 64)  # tiny stand-in for Chameleon's 8192 image codes at ids 4..8195
BOI, EOI = 70, 71
# Tolerance: the fp32 any-order bound along the model's path (tests/numerics.py), relative to the
# largest logit; torch (oneDNN/MKL) and XLA order every sum differently.


def convert_main(args: list[str]):
    """`python -m chameleon_jax.convert ARGS`, in this process (its absl flags parsed afresh)."""
    from absl import flags

    flags.FLAGS.unparse_flags()
    convert_program.main(flags.FLAGS(["convert", *args]))

CONFIGS = {
    # 7B-style: MHA, pre-norm, one QK-norm group.
    "7b": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, model_parallel_size=1, swin_norm=False),
    # 34B-style: GQA (2 q heads per kv head), swin block order, 4 QK-norm groups (4 q / 2 kv heads
    # each), like the released 30B's 4 shards.
    "34b": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=16,
                num_key_value_heads=8, model_parallel_size=4, swin_norm=True),
}


def _hf_config(**arch):
    vocabulary_map = {f"t{i}": i for i in range(VOCAB)}
    for code, i in enumerate(range(*IMAGE_IDS)):
        vocabulary_map.pop(f"t{i}")
        vocabulary_map[image_token_name(code)] = i
    vocabulary_map["<image>"] = 72
    vq = dict(embed_dim=4, num_embeddings=16, latent_channels=4, resolution=16, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[])
    return transformers.ChameleonConfig(
        vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5, vq_config=vq,
        vocabulary_map=vocabulary_map, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        attn_implementation="eager", **arch)


def _randomise(model, seed: int):
    """Every transformer parameter gets random values; q/k-norm rows differ between groups only."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    groups = cfg.model_parallel_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.vqmodel."):
                continue
            if ".q_norm." in name or ".k_norm." in name:
                heads, hd = p.shape
                base = torch.randn(groups, hd, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0)
                p.copy_(base.repeat_interleave(heads // groups, dim=0))  # HF's per-shard layout
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name == "model.embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # Linear (out, in)
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    """(name, HF model, our bound model) for each architecture."""
    torch.manual_seed(0)
    hf = transformers.ChameleonForConditionalGeneration(_hf_config(**CONFIGS[request.param])).float().eval()
    _randomise(hf, seed=1)
    root = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf.save_pretrained(root / "hf")
    convert_main(["--from", "hf", "--src", str(root / "hf"), "--out", str(root / "ours")])
    config, params = load_converted(str(root / "ours"))
    cfg = M.ModelConfig.from_config(config.model)
    return request.param, hf, cfg, params, config, root


def logits_against_hf(cfg, params, hf, length: int = 24, seed: int = 0):
    """Two random rows of mixed text and image tokens, their positions, and our fp32 logits and HF's."""
    rng = np.random.default_rng(seed)
    tokens = np.stack([_mixed_tokens(rng, length), _mixed_tokens(rng, length)])
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    ours = _our_logits(cfg, params, tokens, np.ones_like(tokens), positions)
    return tokens, positions, ours, _hf_logits(hf, tokens)


def _hf_logits(hf, tokens, positions=None):
    # Unmasked logits: the base model + lm_head. ChameleonForConditionalGeneration.forward would set
    # the image-code columns to the dtype minimum (text-only release), hiding half of what we compare.
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    pos = None if positions is None else torch.tensor(np.asarray(positions), dtype=torch.long)
    with torch.no_grad():
        h = hf.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        return hf.lm_head(h).numpy()


def _our_logits(cfg, params, tokens, segment_ids, positions):
    graphdef, _ = M.abstract(cfg)
    fn = jax.jit(lambda p, t, s, q: M.bind(graphdef, p).logits(t, s, q))
    return np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(segment_ids), jnp.asarray(positions)))


def _mixed_tokens(rng, length):
    """Text, then an image block (begin-image, image codes, end-image), then text."""
    text = lambda n: rng.integers(IMAGE_IDS[1] + 8, VOCAB, n)  # noqa: E731
    image = rng.integers(*IMAGE_IDS, 8)
    row = np.concatenate([[0], text(4), [BOI], image, [EOI], text(length)])[:length]
    return row.astype(np.int32)


def test_config_derived_from_hf(converted):
    name, hf, cfg, _, config, _ = converted
    c = hf.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)
    assert cfg.qk_norm_groups == c.model_parallel_size
    assert cfg.block_order == ("swin" if c.swin_norm else "prenorm")
    assert tuple(config.loss.image_ids) == IMAGE_IDS  # from HF's vocabulary_map


def test_logits_match_hf(converted):
    name, hf, cfg, params, _, _ = converted
    tokens, positions, ours, ref = logits_against_hf(cfg, params, hf)
    assert ((tokens >= IMAGE_IDS[0]) & (tokens < IMAGE_IDS[1])).any()
    diff = np.abs(ours - ref).max()
    print(f"{name}: max |logits diff| = {diff:.2e} (logits std {ref.std():.2f})")
    assert ref.std() > 0.5  # logits carry signal, so the tolerance is meaningful
    tol = chain_tol(ref, transformer_lengths(cfg, context=24))
    assert diff <= tol, f"{name}: max |diff| {diff:.3g} > {tol:.3g}"

    if cfg.qk_norm_groups > 1:
        # The groups matter: giving every head group 0's q/k-norm must break parity.
        tied = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.broadcast_to(x[:, :1], x.shape) if "_norm" in jax.tree_util.keystr(p)
            and x.ndim == 3 else x, params)
        assert np.abs(_our_logits(cfg, tied, tokens, np.ones_like(tokens), positions) - ref).max() > 1e-2


def test_packed_documents_match_hf_run_alone(converted):
    name, hf, cfg, params, _, _ = converted
    rng = np.random.default_rng(1)
    docs = [_mixed_tokens(rng, 14), _mixed_tokens(rng, 9)]
    pad = 5
    tokens = np.concatenate(docs + [np.ones(pad, np.int32)])[None]
    segment_ids = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(pad)])
    positions = np.concatenate([np.arange(len(d)) for d in docs] + [np.zeros(pad)])
    ours = _our_logits(cfg, params, tokens, segment_ids[None].astype(np.int32),
                       positions[None].astype(np.int32))[0]
    start = 0
    for doc in docs:
        ref = _hf_logits(hf, doc[None])[0]
        diff = np.abs(ours[start:start + len(doc)] - ref).max()
        print(f"{name}: packed document at {start}: max |logits diff| vs HF alone = {diff:.2e}")
        tol = chain_tol(ref, transformer_lengths(cfg, context=tokens.shape[1]))
        assert diff <= tol, f"{name}: packed document at {start} differs from HF alone by {diff:.3g} > {tol:.3g}"
        start += len(doc)


def test_rejects_untied_rows_within_a_qk_group():
    cfg = M.ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=2,
                        ffn_dim=8, qk_norm_groups=2)
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in {
        "model.embed_tokens.weight": (8, 8), "lm_head.weight": (8, 8), "model.norm.weight": (8,),
        "model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.k_proj.weight": (4, 8),
        "model.layers.0.self_attn.v_proj.weight": (4, 8), "model.layers.0.self_attn.o_proj.weight": (8, 8),
        "model.layers.0.mlp.gate_proj.weight": (8, 8), "model.layers.0.mlp.up_proj.weight": (8, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 8), "model.layers.0.input_layernorm.weight": (8,),
        "model.layers.0.post_attention_layernorm.weight": (8,)}.items()}
    for norm, heads in (("q_norm", 4), ("k_norm", 2)):
        for part in ("weight", "bias"):
            tensors[f"model.layers.0.self_attn.{norm}.{part}"] = np.repeat(
                rng.standard_normal((2, 2)).astype(np.float32), heads // 2, axis=0)
    params_from_hf(tensors, cfg)  # consistent groups convert
    tensors["model.layers.0.self_attn.q_norm.bias"][1, 0] += 1e-3  # head 1 drifts from head 0 (group 0)
    with pytest.raises(ValueError, match=r"q_norm.bias: rows within QK-norm group 0 differ"):
        params_from_hf(tensors, cfg)


# --- Meta's release layout (`--from meta`) -------------------------------------------------------------


def _write_meta_release(hf, out):
    """Writes `hf`'s weights in Meta's layout: one consolidated*.pth per model-parallel shard, adjacent-pair
    RoPE rows, one q/k-norm vector per shard. This inverts HF's converter (spec §9.2–9.3)."""
    c = hf.config
    shards, n, k = c.model_parallel_size, c.num_attention_heads, c.num_key_value_heads
    hd = c.hidden_size // n
    sd = {name: p.detach().clone() for name, p in hf.state_dict().items() if not name.startswith("model.vqmodel.")}

    def adjacent(w, heads):  # HF half-split rows -> Meta adjacent-pair rows, per head
        return w.view(heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)

    def chunk(w, dim, s):
        return w.chunk(shards, dim=dim)[s].clone()

    out.mkdir()
    for s in range(shards):
        state = {"tok_embeddings.weight": chunk(sd["model.embed_tokens.weight"], 1, s),
                 "norm.weight": sd["model.norm.weight"], "output.weight": chunk(sd["lm_head.weight"], 0, s),
                 "rope.freqs": torch.zeros(hd // 2)}
        for i in range(c.num_hidden_layers):
            hf_l, m = f"model.layers.{i}.", f"layers.{i}."
            state[m + "attention.wq.weight"] = chunk(adjacent(sd[hf_l + "self_attn.q_proj.weight"], n), 0, s)
            state[m + "attention.wk.weight"] = chunk(adjacent(sd[hf_l + "self_attn.k_proj.weight"], k), 0, s)
            state[m + "attention.wv.weight"] = chunk(sd[hf_l + "self_attn.v_proj.weight"], 0, s)
            state[m + "attention.wo.weight"] = chunk(sd[hf_l + "self_attn.o_proj.weight"], 1, s)
            for ours, theirs, heads in (("q_normalization", "q_norm", n), ("k_normalization", "k_norm", k)):
                for part in ("weight", "bias"):
                    row = sd[f"{hf_l}self_attn.{theirs}.{part}"][s * heads // shards]
                    state[f"{m}attention.{ours}.{part}"] = row.view(2, hd // 2).T.reshape(hd).clone()
            state[m + "feed_forward.w1.weight"] = chunk(sd[hf_l + "mlp.gate_proj.weight"], 0, s)
            state[m + "feed_forward.w3.weight"] = chunk(sd[hf_l + "mlp.up_proj.weight"], 0, s)
            state[m + "feed_forward.w2.weight"] = chunk(sd[hf_l + "mlp.down_proj.weight"], 1, s)
            state[m + "attention_norm.weight"] = sd[hf_l + "input_layernorm.weight"]
            state[m + "ffn_norm.weight"] = sd[hf_l + "post_attention_layernorm.weight"]
        name = "consolidated.pth" if shards == 1 else f"consolidated.{s:02d}.pth"
        torch.save(state, out / name)
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": n, "n_kv_heads": k,
              "vocab_size": c.vocab_size, "norm_eps": c.rms_norm_eps, "rope_theta": 10_000.0,
              "qk_normalization": True, "swin_norm": c.swin_norm, "multiple_of": 256}
    (out / "params.json").write_text(json.dumps({"model": params}))
    (out / "consolidate_params.json").write_text(json.dumps({"model_parallel_size": shards}))


def test_meta_release_imports_to_the_same_params(converted):
    """Meta shards (adjacent RoPE rows, per-shard norms) import to exactly the params of the HF import,
    whose logits match HF above."""
    name, hf, cfg, hf_params, _, root = converted
    _write_meta_release(hf, root / "meta")
    convert_main(["--from", "meta", "--src", str(root / "meta"), "--out", str(root / "ours_meta"),
                  "--image-ids", f"{IMAGE_IDS[0]}:{IMAGE_IDS[1]}"])
    config, params = load_converted(str(root / "ours_meta"))
    assert M.ModelConfig.from_config(config.model) == cfg
    flat_hf = dict(jax.tree_util.tree_leaves_with_path(hf_params))
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_hf[path]), err_msg=f"{name} {path}")
