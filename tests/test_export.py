"""Export (`--to hf|meta`): random tiny models of ours -> HF / Meta layouts -> the same model.

Every param leaf is random (norm scales, QK-norm vectors different per group), saved as a params export,
then exported through the CLI entry point. HF: `from_pretrained` loads the folder and its fp32 logits match
ours. Meta: our `--from meta` import reads the shards back bit-identically, and the shards equal an
independent HF->Meta writer (test_convert_hf's), which pins the adjacent-pair RoPE rows and per-rank
q/k-norm vectors that a self-consistent but wrong export/import pair would both get wrong.
"""

import numpy as np
import pytest

import torch  # noqa: E402  (the `peers` extra: a missing peer fails, never skips)
import transformers  # noqa: E402

import jax  # noqa: E402

from chameleon_jax import model as M  # noqa: E402
from chameleon_jax.convert import experiment_config, load_converted, save_converted  # noqa: E402
from numerics import chain_tol, transformer_lengths  # noqa: E402
from test_convert_hf import (IMAGE_IDS, _hf_logits, _write_meta_release, logits_against_hf,  # noqa: E402
                             convert_main)

VOCAB = 320
IMAGE_ARGS = ["--image-ids", f"{IMAGE_IDS[0]}:{IMAGE_IDS[1]}"]  # Meta's params.json does not carry them
MODELS = {
    # 7B-style: MHA, pre-norm, one QK-norm group.
    "prenorm_g1": dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
                       ffn_dim=160, qk_norm_groups=1, block_order="prenorm"),
    # 34B-style: GQA, swin order, 4 QK-norm groups (the released 30B's 4 ranks).
    "swin_g4": dict(vocab_size=VOCAB, d_model=128, n_layers=2, n_heads=16, n_kv_heads=8, head_dim=8,
                    ffn_dim=256, qk_norm_groups=4, block_order="swin"),
}


def _random_params(cfg: M.ModelConfig, seed: int) -> dict:
    """Every leaf random: matrices fan-in scaled, norm scales around 1, QK-norm biases around 0."""
    shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(seed)

    fan_in = {"wq": cfg.d_model, "wk": cfg.d_model, "wv": cfg.d_model, "wo": cfg.n_heads * cfg.head_dim,
              "w1": cfg.d_model, "w3": cfg.d_model, "w2": cfg.ffn_dim, "output": cfg.d_model, "embedding": 1}

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return (("scale" in name) + 0.3 * rng.standard_normal(s.shape)).astype(np.float32)
        return (rng.standard_normal(s.shape) * fan_in[path[-1].key] ** -0.5).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _assert_same_leaves(got: dict, want: dict, what: str) -> None:
    """Every leaf of `got` equals `want`'s at the same path, bit for bit."""
    flat = dict(jax.tree_util.tree_leaves_with_path(want))
    for path, x in jax.tree_util.tree_leaves_with_path(got):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(flat[path]), err_msg=f"{what} {path}")


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    """(name, cfg, params, root) with root/ours a params export of random weights."""
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    config = experiment_config(MODELS[request.param], image_ids=IMAGE_IDS)
    cfg = M.ModelConfig.from_config(config.model)
    save_converted(str(root / "ours"), config, _random_params(cfg, seed=len(request.param)))
    config, params = load_converted(str(root / "ours"))
    return request.param, cfg, params, root


@pytest.fixture(scope="module")
def hf_folder(exported):
    name, cfg, params, root = exported
    convert_main(["--to", "hf", "--src", str(root / "ours"), "--out", str(root / "hf")])
    model, info = transformers.ChameleonForConditionalGeneration.from_pretrained(
        root / "hf", output_loading_info=True, attn_implementation="eager")
    return model.float().eval(), info


def test_hf_from_pretrained_loads_every_transformer_weight(exported, hf_folder):
    name, cfg, _, root = exported
    hf, info = hf_folder
    assert not info["unexpected_keys"]
    # Only the image tokenizer is missing (no VQ-GAN in this source): from_pretrained leaves it random.
    assert info["missing_keys"] and all(k.startswith("model.vqmodel.") for k in info["missing_keys"])
    c = hf.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.model_parallel_size, c.swin_norm) == (
        cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.qk_norm_groups,
        cfg.block_order == "swin")
    assert hf.model.vocabulary_mapping.image_tokens == list(range(*IMAGE_IDS))  # from loss.image_ids


def test_hf_logits_match_ours(exported, hf_folder):
    name, cfg, params, _ = exported
    hf, _ = hf_folder
    tokens, _, ours, ref = logits_against_hf(cfg, params, hf)
    diff = np.abs(ours - ref).max()
    print(f"{name}: max |logits diff| ours vs exported HF = {diff:.2e} (logits std {ref.std():.2f})")
    assert ref.std() > 0.5  # logits carry signal, so the tolerance is meaningful
    # fp32 on both sides, every sum in a different order. Along one logit's path the contraction lengths
    # add to n ~ 1,300 (prenorm_g1) / 2,000 (swin_g4) (tests/numerics.py). Rounding errors of random sign
    # grow like sqrt(n)*u per side: 2*sqrt(n)*2^-24*max|logit| ~ 2e-5 for these logits (|logit| <= ~8), so
    # 1e-4 leaves a 5x margin; the any-order worst case 2*gamma(n)*max|logit| (chain_tol, ~1e-3) is looser.
    lengths = transformer_lengths(cfg, context=24)
    typical = 2 * np.sqrt(sum(lengths)) * 2.0 ** -24 * np.abs(ref).max()
    print(f"{name}: typical fp32 error {typical:.1e}, worst case {chain_tol(ref, lengths):.1e}")
    assert diff <= min(1e-4, chain_tol(ref, lengths)), f"{name}: max |diff| {diff:.3g} > 1e-4"

    if cfg.qk_norm_groups > 1:
        # The group layout matters: HF rows in tile order (group g on heads g, g+G, ...) instead of
        # repeat order (group g on its own consecutive heads) must break parity.
        saved = {}
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                if ".q_norm." in pname or ".k_norm." in pname:
                    saved[pname] = p.clone()
                    g, heads = cfg.qk_norm_groups, p.shape[0]
                    p.copy_(p[::heads // g].repeat(heads // g, 1))
            wrong = _hf_logits(hf, tokens)
            for pname, p in hf.named_parameters():
                if pname in saved:
                    p.copy_(saved[pname])
        assert np.abs(wrong - ours).max() > 1e-2


def test_hf_round_trip_is_bit_identical(exported, hf_folder):
    """Our `--from hf` import of the exported folder gives back every leaf exactly (fp32 both ways)."""
    name, cfg, params, root = exported
    convert_main(["--from", "hf", "--src", str(root / "hf"), "--out", str(root / "hf_back")])
    config, back = load_converted(str(root / "hf_back"))
    assert M.ModelConfig.from_config(config.model) == cfg and tuple(config.loss.image_ids) == IMAGE_IDS
    _assert_same_leaves(back, params, name)


def test_meta_round_trip_is_bit_identical(exported, hf_folder):
    name, cfg, params, root = exported
    hf, _ = hf_folder
    convert_main(["--to", "meta", "--src", str(root / "ours"), "--out", str(root / "meta")])
    files = sorted(p.name for p in (root / "meta").glob("consolidated*.pth"))
    assert len(files) == cfg.qk_norm_groups  # one rank per QK-norm group by default
    convert_main(["--from", "meta", "--src", str(root / "meta"), "--out", str(root / "back"), *IMAGE_ARGS])
    config, back = load_converted(str(root / "back"))
    assert M.ModelConfig.from_config(config.model) == cfg
    _assert_same_leaves(back, params, name)

    # Against an independent writer of Meta's layout (HF's tensors -> adjacent-pair rows and per-shard
    # norms with torch ops): every tensor of every rank equal. Leaving Wq in our half-split order would
    # fail here even though the round trip above (our own inverse) would still pass.
    _write_meta_release(hf, root / "meta_ref")
    for f in files:
        ours, ref = (torch.load(d / f, weights_only=True) for d in (root / "meta", root / "meta_ref"))
        assert ours.keys() == ref.keys()
        for key in ref:
            if key != "rope.freqs":  # a buffer the reference leaves at zero; nobody loads it
                assert torch.equal(ours[key], ref[key]), f"{name} {f} {key}"
    # The RoPE reorder is not a no-op: rank 0's layer-0 Wq rows in our half-split order differ.
    rank0 = np.asarray(params["blocks"]["attention"]["wq"][0])[:, :cfg.n_heads // len(files)]
    written = torch.load(root / "meta" / files[0], weights_only=True)["layers.0.attention.wq.weight"]
    assert not np.array_equal(written.numpy(), rank0.reshape(cfg.d_model, -1).T)

def test_meta_export_to_more_ranks_than_groups(exported):
    """R = 2G ranks: each group's vector on two ranks; the import then has 2G equal-in-pairs groups and
    every other leaf bit-identical."""
    name, cfg, params, root = exported
    ranks = 2 * cfg.qk_norm_groups
    convert_main(["--to", "meta", "--src", str(root / "ours"), "--out", str(root / f"meta{ranks}"),
                  "--ranks", str(ranks)])
    convert_main(["--from", "meta", "--src", str(root / f"meta{ranks}"), "--out", str(root / f"back{ranks}"),
                  *IMAGE_ARGS])
    config, back = load_converted(str(root / f"back{ranks}"))
    assert config.model.qk_norm_groups == ranks
    qk_groups_twice = jax.tree_util.tree_map_with_path(  # [L, G, H] q/k-norm leaves -> [L, 2G, H]
        lambda p, x: np.repeat(x, 2, axis=1) if "_norm" in jax.tree_util.keystr(p) and x.ndim == 3 else x, params)
    _assert_same_leaves(back, qk_groups_twice, name)


def test_meta_refuses_fewer_ranks_than_qk_groups(tmp_path):
    from chameleon_jax.convert.to_meta import write_meta

    config = experiment_config(MODELS["swin_g4"], image_ids=IMAGE_IDS)
    cfg = M.ModelConfig.from_config(config.model)
    with pytest.raises(ValueError, match=r"--ranks 2: .*multiple of qk_norm_groups=4.*Pick --ranks in \[4, 8\]"):
        write_meta(config, _random_params(cfg, 0), str(tmp_path), ranks=2)


def test_cli_needs_exactly_one_direction(tmp_path):
    from absl import app

    for args in (["--src", "x", "--out", "y"], ["--from", "hf", "--to", "meta", "--src", "x", "--out", "y"]):
        with pytest.raises(app.UsageError, match="exactly one of --from"):
            convert_main(args)
    with pytest.raises(app.UsageError, match="--ranks applies to --to meta"):
        convert_main(["--to", "hf", "--ranks", "2", "--src", "x", "--out", "y"])


# --- What travels with the model: text tokenizer, VQ-GAN; a training workdir as the source ---------------


def _tiny_tokenizer_json(path):
    """A word-level tokenizer in the chameleon id layout: specials 0..3, image tokens at IMAGE_IDS."""
    import tokenizers

    from chameleon_jax.text import image_token_name

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({image_token_name(c): i for c, i in enumerate(range(*IMAGE_IDS))})
    for word in "a red circle on the left of blue square".split():
        vocab[word] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """A converted release: transformer params + OUT/vqgan + OUT/tokenizer/text_tokenizer.json."""
    from chameleon_jax.convert import release
    from chameleon_jax.vqgan import checkpoint as vq_checkpoint
    from chameleon_jax.vqgan.model import VQGANConfig

    root = tmp_path_factory.mktemp("bundled")
    config = experiment_config(MODELS["prenorm_g1"], image_ids=IMAGE_IDS)
    cfg = M.ModelConfig.from_config(config.model)
    params = _random_params(cfg, seed=5)
    save_converted(str(root / "ours"), config, params)
    vq_cfg = VQGANConfig(resolution=16, ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(),
                         z_channels=4, embed_dim=4, n_embed=IMAGE_IDS[1] - IMAGE_IDS[0])
    vq_params = vq_checkpoint.random_params(vq_cfg, seed=3)
    release.save_vqgan(root / "ours", vq_cfg, vq_params)
    tok = _tiny_tokenizer_json(root / "ours" / release.TOKENIZER)
    return root, config, cfg, params, vq_cfg, vq_params, tok


def test_hf_export_carries_the_tokenizer_and_the_vqgan(bundled, capsys):
    from chameleon_jax.vqgan import model as vq_model

    root, _, _, _, vq_cfg, vq_params, tok = bundled
    convert_main(["--to", "hf", "--src", str(root / "ours"), "--out", str(root / "hf")])
    assert "note:" not in capsys.readouterr().out  # nothing left out
    hf, info = transformers.ChameleonForConditionalGeneration.from_pretrained(root / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.model.vocabulary_mapping.image_tokens == list(range(*IMAGE_IDS))  # from the tokenizer's names

    # The image tokenizer: HF's encoder + quantizer give our codes, as unified ids (code + 4).
    images = np.random.default_rng(0).uniform(-1, 1, (2, vq_cfg.resolution, vq_cfg.resolution, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(vq_model.encode)(vq_params, images)).reshape(2, -1) + IMAGE_IDS[0]
    with torch.no_grad():
        theirs = hf.model.get_image_tokens(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_array_equal(theirs, ours)

    # The text tokenizer: HF's AutoTokenizer gives the same ids as the tokenizer we converted with.
    text = "a red circle on the left of a blue square"
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False).ids
    assert hf_tok.pad_token_id == 1 and hf_tok.eos_token_id == 2


def test_export_from_a_training_workdir(bundled):
    """A workdir's latest checkpoint (train state with optimizer moments) exports its params; the
    tokenizer and VQ-GAN come from the export the run was initialised from."""
    from chameleon_jax import checkpoint as ckpt

    root, config, cfg, params, *_ = bundled
    config = config.copy_and_resolve_references()
    config.init.checkpoint = str(root / "ours")
    manager = ckpt.make_manager(root / "run" / "checkpoints", async_save=False)
    for step, scale in ((1, 0.5), (2, 2.0)):  # the latest step must win
        state = {"params": jax.tree.map(lambda x: np.asarray(x) * scale, params),
                 "opt_state": jax.tree.map(np.zeros_like, params), "step": np.int32(step)}
        ckpt.save(manager, step, state, config=config)
    manager.wait_until_finished()
    manager.close()
    convert_main(["--to", "meta", "--src", str(root / "run"), "--out", str(root / "run_meta")])
    convert_main(["--from", "meta", "--src", str(root / "run_meta"), "--out", str(root / "run_back"), *IMAGE_ARGS])
    _, back = load_converted(str(root / "run_back"))
    _assert_same_leaves(back, jax.tree.map(lambda x: np.asarray(x) * 2.0, params), "latest step")

    from chameleon_jax.convert.export import load_source

    source = load_source(str(root / "run"))
    assert source.path.endswith("/2") and source.tokenizer and source.vqgan


def test_a_lora_run_exports_its_merged_weights(bundled):
    """A LoRA run's checkpoint holds frozen params + adapters; the export writes W + (alpha/rank)·A·B."""
    from chameleon_jax import checkpoint as ckpt
    from chameleon_jax.model.lora import LoraConfig, init_lora, merge_lora

    root, config, cfg, params, *_ = bundled
    config = config.copy_and_resolve_references()
    config.finetune.trainable = ""  # the adapters only
    config.finetune.lora.update(rank=2, alpha=4.0, targets="wq,w2")
    lora_cfg = LoraConfig.from_config(config.finetune.lora)
    rng = np.random.default_rng(7)
    lora = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.1,  # B != 0: trained
                        init_lora(params, lora_cfg, jax.random.key(0)))
    manager = ckpt.make_manager(root / "lora_run" / "checkpoints", async_save=False)
    ckpt.save(manager, 1, {"params": params, "lora": lora, "step": np.int32(1)}, config=config)
    manager.wait_until_finished()
    manager.close()
    convert_main(["--to", "meta", "--src", str(root / "lora_run"), "--out", str(root / "lora_meta")])
    convert_main(["--from", "meta", "--src", str(root / "lora_meta"), "--out", str(root / "lora_back"), *IMAGE_ARGS])
    _, back = load_converted(str(root / "lora_back"))
    merged = merge_lora(params, lora, lora_cfg)
    assert not np.array_equal(merged["blocks"]["mlp"]["w2"], params["blocks"]["mlp"]["w2"])
    _assert_same_leaves(back, merged, "merged")


def test_hf_export_in_shards_loads_the_same_weights(bundled):
    """Several safetensors shards + model.safetensors.index.json (what a 7B export writes at 1 GiB each)."""
    from chameleon_jax.convert.to_hf import SAFETENSORS_INDEX, write_hf

    root, config, cfg, params, *_ = bundled
    result = write_hf(config, params, str(root / "hf_sharded"), max_shard_bytes=40_000)
    shards = [f for f in result.files if f.endswith(".safetensors")]
    assert len(shards) > 3 and SAFETENSORS_INDEX in result.files
    write_hf(config, params, str(root / "hf_single"))
    sharded, single = (transformers.ChameleonForConditionalGeneration.from_pretrained(root / d).state_dict()
                       for d in ("hf_sharded", "hf_single"))
    for key, value in single.items():
        if not key.startswith("model.vqmodel."):  # random in both (no VQ-GAN given)
            assert torch.equal(sharded[key], value), key
