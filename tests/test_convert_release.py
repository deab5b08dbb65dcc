"""Meta's whole release -> one export: a tiny synthetic release (2 transformer shards, vqgan.ckpt as a Lightning
checkpoint, vqgan.yaml, a `tokenizers` BPE text_tokenizer.json) converts through the CLI, and the export alone
serves the VQ-GAN loader, the text tokenizer loader, pretokenize and generate."""
import json
import os

import numpy as np
import pytest
import torch

import jax

from chameleon_jax import text
from chameleon_jax.convert import load_converted, release
from chameleon_jax.vqgan import checkpoint as vq_checkpoint
from chameleon_jax.vqgan import convert as vq_convert
from chameleon_jax.vqgan import model as vq_model
from release_fixture import H, N_EMBED, SHARDS, VQ_DDCONFIG, build_release, convert_main


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    return build_release(tmp_path_factory.mktemp("release"))


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
