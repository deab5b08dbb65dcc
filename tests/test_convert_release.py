"""Meta's whole release -> one export: a tiny synthetic release (2 transformer shards, vqgan.ckpt as a Lightning
checkpoint, vqgan.yaml, a `tokenizers` BPE text_tokenizer.json) converts through the CLI, and the export alone
serves the VQ-GAN loader, the text tokenizer loader, pretokenize and generate."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
import yaml

import jax

from chameleon_jax import text
from chameleon_jax.convert import __main__ as convert_program
from chameleon_jax.convert import load_converted, release
from chameleon_jax.vqgan import checkpoint as vq_checkpoint
from chameleon_jax.vqgan import convert as vq_convert
from chameleon_jax.vqgan import model as vq_model

D, N_HEADS, N_KV, LAYERS, FFN, SHARDS, VOCAB = 32, 4, 2, 2, 64, 2, 65_536
H = D // N_HEADS
VQ_DDCONFIG = dict(double_z=False, z_channels=32, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                   num_res_blocks=1, attn_resolutions=[], dropout=0.0, attn_type="vanilla")
N_EMBED = 8192  # the chameleon vocabulary's image block; the tokenizer names exactly this many image tokens


class Tripwire:
    """Pickled into vqgan.ckpt like a Lightning callback; unpickling it for real would write a file."""

    def __init__(self, path):
        self.path = path

    def __setstate__(self, state):
        with open(state["path"], "w") as f:
            f.write("code from the pickle ran")


def convert_main(args):
    from absl import flags

    flags.FLAGS.unparse_flags()
    convert_program.main(flags.FLAGS(["convert", *args]))


def _transformer_shards(rng):
    """Meta-layout shards (torch (out, in) matrices split over model-parallel ranks) and their full tensors."""
    full = {"tok_embeddings.weight": rng.standard_normal((VOCAB, D)), "output.weight": rng.standard_normal((VOCAB, D)),
            "norm.weight": 1 + 0.1 * rng.standard_normal(D)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        full |= {p + "attention.wq.weight": rng.standard_normal((N_HEADS * H, D)),
                 p + "attention.wk.weight": rng.standard_normal((N_KV * H, D)),
                 p + "attention.wv.weight": rng.standard_normal((N_KV * H, D)),
                 p + "attention.wo.weight": rng.standard_normal((D, N_HEADS * H)),
                 p + "feed_forward.w1.weight": rng.standard_normal((FFN, D)),
                 p + "feed_forward.w3.weight": rng.standard_normal((FFN, D)),
                 p + "feed_forward.w2.weight": rng.standard_normal((D, FFN)),
                 p + "attention_norm.weight": 1 + 0.1 * rng.standard_normal(D),
                 p + "ffn_norm.weight": 1 + 0.1 * rng.standard_normal(D)}
    split_axis = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
    shards = []
    for s in range(SHARDS):
        shard = {}
        for name, x in full.items():
            axis = split_axis.get(name.split(".")[-2])
            shard[name] = np.split(x, SHARDS, axis)[s] if axis is not None else x
        for i in range(LAYERS):  # each rank carries its own q/k-norm vectors (its QK-norm group)
            for norm in ("q_normalization", "k_normalization"):
                shard[f"layers.{i}.attention.{norm}.weight"] = 1 + 0.1 * rng.standard_normal(H)
                shard[f"layers.{i}.attention.{norm}.bias"] = 0.1 * rng.standard_normal(H)
        shard["rope.freqs"] = np.zeros(H // 2)
        shards.append({k: torch.tensor(np.asarray(v, np.float32)).to(torch.bfloat16) for k, v in shard.items()})
    return full, shards


def _tokenizer_json(path):
    """A BPE tokenizer in the official id layout: specials, IMGIMG<code>Z at 4 + code, reserved ids, then text."""
    import tokenizers

    names = ["<s>", "<pad>", "</s>", "<unk>"] + [text.image_token_name(c) for c in range(N_EMBED)]
    names += ["<eoss>", "<racm3:break>"] + [f"<reserved{i - 4:05d}>" for i in range(8198, 8711)]
    names += list("abcdefghijklmnopqrstuvwxyz .") + ["ca", "cat"]
    vocab = {name: i for i, name in enumerate(names)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("c", "a"), ("ca", "t")], unk_token="<unk>"))
    tok.save(str(path))


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("release")
    model_dir, tok_dir = root / "30b", root / "tokenizer"
    model_dir.mkdir()
    tok_dir.mkdir()
    full, shards = _transformer_shards(rng)
    for s, shard in enumerate(shards):
        torch.save(shard, model_dir / f"consolidated.{s:02d}.pth")
    (model_dir / "params.json").write_text(json.dumps({"model": dict(
        dim=D, n_layers=LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV, vocab_size=VOCAB, norm_eps=1e-5, rope_theta=10_000.0,
        qk_normalization=True, swin_norm=True, multiple_of=16)}))

    cfg = vq_convert.config_from_taming({"model": {"params": dict(embed_dim=8, n_embed=N_EMBED, ddconfig=VQ_DDCONFIG)}})
    vq_sd = {k: torch.tensor(np.asarray(v)) for k, v in vq_convert.to_state_dict(
        vq_checkpoint.random_params(cfg, seed=1)).items()}
    vq_sd["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)  # training-only: dropped
    tripwire = root / "tripwire_fired"
    torch.save({"state_dict": vq_sd, "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8",
                "hyper_parameters": argparse.Namespace(base_learning_rate=4.5e-6),
                "callbacks": {Tripwire: Tripwire(str(tripwire))}}, tok_dir / "vqgan.ckpt")
    (tok_dir / "vqgan.yaml").write_text(yaml.safe_dump({"model": {
        "base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
        "params": {"embed_dim": 8, "n_embed": N_EMBED, "ddconfig": VQ_DDCONFIG,
                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}))
    _tokenizer_json(tok_dir / "text_tokenizer.json")
    return root, full, shards, vq_sd, cfg, tripwire


@pytest.fixture(scope="module")
def export(release_dir, tmp_path_factory):
    root = release_dir[0]
    out = tmp_path_factory.mktemp("export") / "chameleon"
    convert_main(["--from", "meta", "--src", str(root), "--out", str(out)])
    return out


def test_release_converts_into_one_export(release_dir, export, capsys):
    root, full, shards, vq_sd, cfg, tripwire = release_dir
    assert not tripwire.exists()  # the callback object was read as an inert stand-in, its code never ran
    config, params = load_converted(str(export))
    assert (config.model.qk_norm_groups, config.model.block_order) == (SHARDS, "swin")
    bf16 = lambda x: torch.tensor(np.asarray(x, np.float32)).to(torch.bfloat16).float().numpy()  # noqa: E731
    np.testing.assert_array_equal(np.asarray(params["output"]), bf16(full["output.weight"]).T)
    np.testing.assert_array_equal(np.asarray(params["blocks"]["mlp"]["w2"][1]),
                                  bf16(full["layers.1.feed_forward.w2.weight"]).T)
    # Adjacent RoPE pairs -> half-split: head 0's row j*H/2+i of wq comes from Meta's row 2i+j.
    order = np.concatenate([np.arange(0, H, 2), np.arange(1, H, 2)])
    np.testing.assert_array_equal(np.asarray(params["blocks"]["attention"]["wq"][0][:, 0, :]),
                                  bf16(full["layers.0.attention.wq.weight"])[:H][order].T)
    np.testing.assert_array_equal(np.asarray(params["blocks"]["attention"]["k_norm"]["bias"][1][1]),
                                  shards[1]["layers.1.attention.k_normalization.bias"].float().numpy()[order])

    vq_cfg, vq_params = vq_checkpoint.load(str(export))  # the export root finds OUT/vqgan
    assert vq_cfg == cfg
    got = vq_convert.to_state_dict(jax.tree.map(np.asarray, vq_params))
    assert set(got) == {k for k in vq_sd if not k.startswith("loss.")}
    for k, v in got.items():
        np.testing.assert_array_equal(v, vq_sd[k].numpy(), err_msg=k)

    tok = text.load(str(export))
    assert tok.encode("cat").tolist() == [8740]  # the merged token "cat", at its id in the JSON (after 8711 specials, 26 letters, " ", ".", "ca")
    assert release.tokenizer_path(export).read_bytes() == (root / "tokenizer" / "text_tokenizer.json").read_bytes()


def test_cli_prints_every_part(release_dir, tmp_path, capsys):
    convert_main(["--from", "meta", "--src", str(release_dir[0] / "30b"), "--out", str(tmp_path / "o"),
                  "--param_dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "2 layers, d_model 32, 4 heads / 2 kv, qk_norm_groups 2, block_order swin" in out
    assert "VQ-GAN 16 px -> 8x8 codes of 8192 (encoder and decoder)" in out
    assert "tokenizer/text_tokenizer.json: text tokenizer" in out


def test_pretokenize_and_generate_take_the_export_alone(export, tmp_path):
    from PIL import Image

    from chameleon_jax import pretokenize
    from chameleon_jax.generate.answer import answer

    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 20, 3), np.uint8)).save(img)
    (tmp_path / "docs.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a cat."}) + "\n")
    manifest = pretokenize.pretokenize_corpus([str(tmp_path / "docs.jsonl")], str(tmp_path / "tok"),
                                              vqgan=str(export), encode_batch=1)
    assert manifest["documents"] == 1 and not manifest["skipped"]

    lines = answer(str(export), "a cat", str(tmp_path / "gen"), mode="image", max_new_tokens=66)
    assert lines[0] == "[image_1.png]"
    assert Image.open(tmp_path / "gen" / "image_1.png").size == (16, 16)


def test_refuses_what_the_model_cannot_run(release_dir, tmp_path):
    sd = release_dir[3]
    for field, value in (("attn_type", "none"), ("attn_type", "linear"), ("double_z", True), ("tanh_out", True),
                         ("mystery", 1)):
        with pytest.raises(ValueError, match=f"ddconfig.{field}="):
            vq_convert.config_from_taming({"model": {"params": {
                "embed_dim": 8, "n_embed": N_EMBED, "ddconfig": {**VQ_DDCONFIG, field: value}}}})
    with pytest.raises(ValueError, match="supported: \\['vanilla'\\]"):
        vq_convert.config_from_taming({"model": {"params": {
            "embed_dim": 8, "n_embed": N_EMBED, "ddconfig": {**VQ_DDCONFIG, "attn_type": "none"}}}})
    cfg = release_dir[4]
    partial = {k: v for k, v in sd.items() if not k.startswith("encoder.mid.attn_1.")}
    with pytest.raises(ValueError, match="missing encoder.mid.attn_1.q.weight"):
        vq_convert.from_taming(partial, cfg)
    wrong = dict(sd, **{"quant_conv.weight": torch.zeros(8, 16, 1, 1)})
    with pytest.raises(ValueError, match="quant_conv.weight: checkpoint shape"):
        vq_convert.from_taming(wrong, cfg)


def test_locates_the_model_folder(release_dir, tmp_path):
    root = release_dir[0]
    assert release.locate(str(root)) == (str(root / "30b"), str(root / "tokenizer"))
    assert release.locate(str(root / "30b")) == (str(root / "30b"), str(root / "tokenizer"))
    os.symlink(root / "30b", tmp_path / "7b")
    os.symlink(root / "30b", tmp_path / "30b")
    with pytest.raises(ValueError, match="several models"):
        release.locate(str(tmp_path))
