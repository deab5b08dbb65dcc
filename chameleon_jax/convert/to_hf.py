"""Export to a HF transformers `ChameleonForConditionalGeneration` folder: the inverse of hf.py (spec §9.3).

    write_hf(config, params, OUT, tokenizer=..., vqgan=(vq_cfg, vq_params))
    transformers.ChameleonForConditionalGeneration.from_pretrained(OUT)

Weights go to safetensors through its numpy API (no torch), in shards of at most `max_shard_bytes`
built one at a time, so the export holds the source params plus one shard. Our kernels (in, out) split
into heads become torch Linear weights (out, in); the q/k-norm groups (G, H) are repeated over each
group's heads to HF's (heads, H) (the inverse of hf.py's `_grouped_norm`). Wq/Wk rows stay as they are:
our RoPE pairs i with i + H/2, which is HF's `rotate_half` layout.

HF's model always builds the image tokenizer (`model.vqmodel`: encoder, quantizer, quant convs; no
decoder). Its weights are written when a VQ-GAN is given; otherwise from_pretrained initialises them at
random and warns that they are missing, so `ExportedHF.notes` says that image input will not work.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator

import jax
import numpy as np

from chameleon_jax.model.config import ModelConfig
from chameleon_jax.text import image_token_name

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Chameleon's special-token names at their official ids (spec §5); `<image>` is HF's placeholder, a
# reserved token renamed by HF's converter.
_CHAMELEON_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<eoss>": 8196, "<racm3:break>": 8197,
                       "<reserved08706>": 8710, "<image>": 8711}


@dataclasses.dataclass
class ExportedHF:
    out_dir: str
    files: list[str]          # written, relative to out_dir
    tensors: int              # transformer + VQ tensors written
    notes: list[str]          # what the folder lacks and why (printed by the program)


def _host(x) -> np.ndarray:
    return np.asarray(x)  # a view of a CPU jax.Array's buffer, not a copy


def _cast(x: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=dtype)


def transformer_tensors(cfg: ModelConfig, params: dict, dtype) -> Iterator[tuple[str, tuple, Callable]]:
    """(HF name, shape, make) for every transformer weight; `make()` builds that one tensor."""
    d, n, k, h, g = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm_groups
    blocks = params["blocks"]
    att, mlp = blocks["attention"], blocks["mlp"]

    def linear(leaf, i, fan_in):  # our kernel [in..., out...] of layer i -> torch (out, in)
        return lambda: _cast(_host(leaf)[i].reshape(fan_in, -1).T, dtype)

    def grouped(leaf, i, heads):  # (groups, H) -> (heads, H): each group's vector over its heads
        return lambda: _cast(np.repeat(_host(leaf)[i], heads // g, axis=0), dtype)

    def vector(leaf, i=None):
        return lambda: _cast(_host(leaf) if i is None else _host(leaf)[i], dtype)

    yield "model.embed_tokens.weight", (cfg.vocab_size, d), vector(params["embedding"])
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (n * h, d), linear(att["wq"], i, d)
        yield p + "self_attn.k_proj.weight", (k * h, d), linear(att["wk"], i, d)
        yield p + "self_attn.v_proj.weight", (k * h, d), linear(att["wv"], i, d)
        yield p + "self_attn.o_proj.weight", (d, n * h), linear(att["wo"], i, n * h)
        for norm, heads in (("q_norm", n), ("k_norm", k)):
            yield p + f"self_attn.{norm}.weight", (heads, h), grouped(att[norm]["scale"], i, heads)
            yield p + f"self_attn.{norm}.bias", (heads, h), grouped(att[norm]["bias"], i, heads)
        yield p + "mlp.gate_proj.weight", (cfg.ffn_dim, d), linear(mlp["w1"], i, d)
        yield p + "mlp.up_proj.weight", (cfg.ffn_dim, d), linear(mlp["w3"], i, d)
        yield p + "mlp.down_proj.weight", (d, cfg.ffn_dim), linear(mlp["w2"], i, cfg.ffn_dim)
        # HF's swin layer applies `input_layernorm` to the attention output, as our swin
        # `attention_norm` does, so the names map 1:1 in both block orders (see hf.py).
        yield p + "input_layernorm.weight", (d,), vector(blocks["attention_norm"]["scale"], i)
        yield p + "post_attention_layernorm.weight", (d,), vector(blocks["ffn_norm"]["scale"], i)
    yield "model.norm.weight", (d,), vector(params["final_norm"]["scale"])
    yield "lm_head.weight", (cfg.vocab_size, d), linear(params["output"], slice(None), d)


def vqgan_tensors(vq_params: dict) -> Iterator[tuple[str, tuple, Callable]]:
    """HF `model.vqmodel.*` tensors: the taming state dict without the decoder, which HF's model lacks."""
    from chameleon_jax.vqgan.convert import to_state_dict

    for name, arr in to_state_dict(vq_params).items():
        if name.startswith("decoder."):
            continue
        arr = np.ascontiguousarray(arr, np.float32)  # HF's VQ model is fp32 (the official one too)
        yield "model.vqmodel." + name, arr.shape, lambda a=arr: a


def vq_config(vq_cfg) -> dict:
    """HF ChameleonVQVAEConfig fields from our VQGANConfig; refuses encoders HF cannot run."""
    if vq_cfg.encoder_kind != "chameleon":
        raise ValueError(f"the VQ-GAN has encoder_kind={vq_cfg.encoder_kind!r}; HF's ChameleonVQVAE has "
                         f"only the taming conv encoder ('chameleon'). Export without the VQ-GAN (--novqgan).")
    return dict(embed_dim=vq_cfg.embed_dim, num_embeddings=vq_cfg.n_embed, double_latent=False,
                latent_channels=vq_cfg.z_channels, resolution=vq_cfg.resolution, in_channels=vq_cfg.in_channels,
                out_channels=vq_cfg.out_ch, base_channels=vq_cfg.ch, channel_multiplier=list(vq_cfg.ch_mult),
                num_res_blocks=vq_cfg.num_res_blocks, attn_resolutions=list(vq_cfg.attn_resolutions),
                dropout=0.0, attn_type="vanilla")


def vocabulary_map(image_ids: tuple[int, int], vocab_size: int, tokenizer_vocab: dict | None = None) -> dict:
    """HF's `vocabulary_map` (name -> id): the tokenizer's whole vocab when there is one, else the image
    tokens (`IMGIMG*`, which HF masks and maps VQ codes through) plus Chameleon's specials when the ids
    are Chameleon's layout."""
    if tokenizer_vocab is not None:
        names = dict(tokenizer_vocab)
        if "<image>" not in names and "<reserved08707>" in names:  # as HF's converter does
            names["<image>"] = names.pop("<reserved08707>")
        return names
    start, stop = image_ids
    names = {image_token_name(code): start + code for code in range(stop - start)}
    if (start, stop, vocab_size) == (4, 8196, 65_536):
        names.update(_CHAMELEON_SPECIALS)
    return names


def hf_config(config, cfg: ModelConfig, vocab_map: dict, vq: dict | None, dtype) -> dict:
    """config.json of ChameleonForConditionalGeneration for our model config."""
    out = dict(
        architectures=["ChameleonForConditionalGeneration"], model_type="chameleon",
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        # RoPE has no length limit; HF reads this as the longest context (Chameleon's 4096, or longer if trained so).
        hidden_act="silu", max_position_embeddings=max(4096, int(config.get("train", {}).get("seq_len", 0))),
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        model_parallel_size=cfg.qk_norm_groups, swin_norm=cfg.block_order == "swin",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=0, pad_token_id=1, eos_token_id=2,  # the unified vocabulary's (vocab.py)
        vocabulary_map=vocab_map, dtype=np.dtype(dtype).name)
    if vq is not None:
        out["vq_config"] = vq
    return out


def write_safetensors(tensors: list[tuple[str, tuple, Callable]], out_dir: str, itemsizes: dict,
                      max_shard_bytes: int) -> list[str]:
    """Writes tensors in shards of at most max_shard_bytes (a larger single tensor gets its own), each
    built only when written; an index names the shard of every tensor when there is more than one."""
    from safetensors.numpy import save_file

    shards, size = [[]], 0
    for t in tensors:
        nbytes = int(np.prod(t[1])) * itemsizes[t[0]]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        arrays = {}
        for key, shape, make in shard:
            arrays[key] = make()
            if arrays[key].shape != tuple(shape):
                raise AssertionError(f"{key}: built {arrays[key].shape}, planned {shape}")
            weight_map[key] = name
            total += arrays[key].nbytes
        save_file(arrays, os.path.join(out_dir, name), metadata={"format": "pt"})
        del arrays  # this shard's copies go before the next is built
    if len(names) > 1:
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        names.append(SAFETENSORS_INDEX)
    return names


def write_tokenizer(tokenizer_json: str, out_dir: str, bos="<s>", eos="</s>", pad="<pad>") -> list[str]:
    """The official text tokenizer as HF's `tokenizer.json` (with `<reserved08707>` renamed `<image>`, as
    HF's converter does) and a tokenizer_config.json that loads it exactly as written."""
    with open(tokenizer_json) as f:
        tok = json.load(f)
    vocab = tok.get("model", {}).get("vocab", {})
    if "<reserved08707>" in vocab and "<image>" not in vocab:
        vocab["<image>"] = vocab.pop("<reserved08707>")
        for added in tok.get("added_tokens", []):
            if added.get("content") == "<reserved08707>":
                added["content"] = "<image>"
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    # The generic fast-tokenizer class keeps tokenizer.json's normaliser and pre-tokeniser as they are
    # (a model-specific class may rebuild them from its own defaults).
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
          "add_bos_token": False, "add_eos_token": False}
    names = {t.get("content") for t in tok.get("added_tokens", [])} | set(vocab)
    tc = {k: v for k, v in tc.items() if not k.endswith("_token") or v in names}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json"]


def write_hf(config, params: dict, out_dir: str, *, tokenizer: str | None = None, vqgan=None,
             dtype=None, max_shard_bytes: int = 1 << 30) -> ExportedHF:
    """Writes (experiment config, params) as a HF Chameleon folder; see the module docstring.

    `tokenizer`: the official text_tokenizer.json, if the model has one (a sentencepiece .model maps ids
    in our own way, which HF's tokenizer classes cannot reproduce, so it is not written).
    `vqgan`: (VQGANConfig, params) of the image tokenizer, or None. `dtype`: of the written transformer
    weights (default: the params' own).
    """
    from chameleon_jax.convert import check_params

    if "://" in str(out_dir):
        raise ValueError(f"--out {out_dir}: the HF folder is written to local disk; copy it to the bucket after.")
    cfg = ModelConfig.from_config(config.model)
    check_params(params, cfg)
    dtype = np.dtype(dtype) if dtype is not None else _host(params["embedding"]).dtype
    os.makedirs(out_dir, exist_ok=True)
    notes, files = [], []
    image_ids = tuple(int(i) for i in config.loss.image_ids)

    tok_vocab = None
    if tokenizer is not None and tokenizer.endswith(".json"):
        files += write_tokenizer(tokenizer, out_dir)
        with open(os.path.join(out_dir, "tokenizer.json")) as f:
            tok_vocab = json.load(f).get("model", {}).get("vocab")
    elif tokenizer is not None:
        notes.append(f"no tokenizer written: {tokenizer} is our sentencepiece model, whose ids HF's tokenizers "
                     f"do not reproduce; tokenize with chameleon_jax.text and pass input_ids")
    else:
        notes.append("no tokenizer written: the source names no text tokenizer; pass input_ids, or copy "
                     "tokenizer.json from the model the source was converted from")

    tensors = list(transformer_tensors(cfg, params, dtype))
    itemsizes = {name: dtype.itemsize for name, _, _ in tensors}
    vq = None
    if vqgan is not None:
        vq_cfg, vq_params = vqgan
        vq = vq_config(vq_cfg)
        if vq_cfg.n_embed != image_ids[1] - image_ids[0]:
            raise ValueError(f"the VQ-GAN has {vq_cfg.n_embed} codes but loss.image_ids={image_ids} spans "
                             f"{image_ids[1] - image_ids[0]} ids; export the VQ-GAN the model was trained with.")
        vq_t = list(vqgan_tensors(jax.tree.map(_host, vq_params)))
        itemsizes.update({name: 4 for name, _, _ in vq_t})
        tensors += vq_t
    else:
        notes.append("no VQ-GAN weights written (model.vqmodel.*): from_pretrained initialises HF's image "
                     "encoder at random and warns that its weights are missing; text in and out is exact, "
                     "image input is not usable")
    files += write_safetensors(tensors, out_dir, itemsizes, max_shard_bytes)
    vocab_map = vocabulary_map(image_ids, cfg.vocab_size, tok_vocab)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(config, cfg, vocab_map, vq, dtype), f, indent=2)
    files.append("config.json")
    return ExportedHF(out_dir=str(out_dir), files=files, tensors=len(tensors), notes=notes)
