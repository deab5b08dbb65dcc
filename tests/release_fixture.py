"""A tiny synthetic Meta Chameleon release, as Meta ships it: ROOT/30b/consolidated.NN.pth (2 model-parallel
shards, bf16) + params.json, ROOT/tokenizer/vqgan.ckpt (a Lightning checkpoint of random taming-layout VQ-GAN
weights), vqgan.yaml and text_tokenizer.json (a `tokenizers` BPE in the official id layout).

Shared by the release import's tests (tests/test_convert_release.py) and the release -> fine-tune -> HF
round trip (tests/test_release_to_hf.py).
"""
import argparse
import json

import numpy as np
import torch
import yaml

from chameleon_jax import text
from chameleon_jax.convert import __main__ as convert_program
from chameleon_jax.vqgan import checkpoint as vq_checkpoint
from chameleon_jax.vqgan import convert as vq_convert

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
    # Matrices scaled by fan-in (torch (out, in): in = axis 1), as a trained model's are: logits of order 1, so
    # a few fine-tuning steps move the loss visibly (std-1 matrices give logits of order sqrt(D) and a loss of ~25).
    full = {k: x / np.sqrt(x.shape[1]) if x.ndim == 2 and not k.startswith("tok_embeddings") else x
            for k, x in full.items()}
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
    # Like the release's, the tokenizer names every id of the model's vocabulary, so any text token a model
    # samples decodes to text: the rest are 4-letter pieces (no merge produces them).
    letters = "abcdefghijklmnopqrstuvwxyz"
    names += ["".join(letters[i // 26 ** k % 26] for k in range(4)) for i in range(VOCAB - len(names))]
    vocab = {name: i for i, name in enumerate(names)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("c", "a"), ("ca", "t")], unk_token="<unk>"))
    tok.save(str(path))


def build_release(root, seed: int = 0):
    """Writes the release under `root` (a pathlib.Path); returns (root, full, shards, vq_sd, vq_cfg, tripwire):
    the transformer's full fp64 tensors, the bf16 shards as saved, the VQ-GAN state dict, its VQGANConfig,
    and the file the pickled Tripwire would write if the loader ran its code."""
    rng = np.random.default_rng(seed)
    model_dir, tok_dir = root / "30b", root / "tokenizer"
    model_dir.mkdir(parents=True)
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


