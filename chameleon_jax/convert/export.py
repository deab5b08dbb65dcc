"""Export our params to HF transformers or Meta's release layout (the way back from `convert`).

    python -m chameleon_jax.convert --to hf   --src EXPORT_OR_WORKDIR --out HF_DIR
    python -m chameleon_jax.convert --to meta --src EXPORT_OR_WORKDIR --out META_DIR [--ranks 4]

`export` reads a params export (what `--from` writes) or a training workdir (its latest checkpoint,
restored for eval on one host device; a LoRA run's adapters merged into their kernels) and calls
`to_hf.write_hf` / `to_meta.write_meta`, which take (experiment config, params): fine-tuned params in
memory export the same way.

The text tokenizer and the VQ-GAN that go into the HF folder are the ones the source names: its
config's `generate.tokenizer` / `generate.vqgan` (paths absolute or relative to the source), else the
parts of a converted release (`release.tokenizer_path` / `release.vqgan_path`) in the source or in the
export the run was initialised from (`init.checkpoint`).
"""
from __future__ import annotations

import dataclasses

from etils import epath

TARGETS = ("hf", "meta")


@dataclasses.dataclass
class Source:
    config: object         # experiment config (ml_collections)
    params: dict           # on one host device
    path: str              # the step folder or export restored
    tokenizer: str | None  # text tokenizer file, if the source names one that exists
    vqgan: str | None      # VQ-GAN export folder, if the source names one that exists


def _recorded(path: str | None, roots) -> str | None:
    """A path a config recorded, absolute or relative to one of `roots`, if it exists."""
    if not path:
        return None
    return next((str(p) for p in [epath.Path(path)] + [r / path for r in roots] if p.exists()), None)


def load_source(src) -> Source:
    """(config, params, tokenizer, VQ-GAN) of a params export, a training workdir or a step folder."""
    import jax

    from chameleon_jax import checkpoint as ckpt
    from chameleon_jax.convert import release
    from chameleon_jax.evals.checkpoint import restore_for_eval
    from chameleon_jax.model import sharding as shd

    config = ckpt.read_config(src)
    config.mesh.update(data=1, fsdp=1, tensor=1, slices=1)
    mesh = shd.make_mesh(config.mesh, jax.local_devices()[:1])
    params, _, step_dir = restore_for_eval(src, config, mesh)  # a LoRA run's adapters merged
    recorded = dict(config.get("generate", {}) or {})
    roots = [epath.Path(src), epath.Path(step_dir)]
    if config.get("init", {}).get("checkpoint"):
        roots.append(epath.Path(config.init.checkpoint))
    tokenizer = _recorded(recorded.get("tokenizer"), roots) or next(
        (str(p) for p in map(release.tokenizer_path, roots) if p is not None), None)
    vqgan = _recorded(recorded.get("vqgan"), roots) or next(
        (str(p) for p in map(release.vqgan_path, roots) if p is not None), None)
    return Source(config=config, params=params, path=str(step_dir), tokenizer=tokenizer, vqgan=vqgan)


def export(target: str, src, out_dir: str, *, ranks: int | None = None, dtype=None, with_vqgan: bool = True):
    """Writes the model at `src` to `out_dir` in `target`'s layout; returns (Source, ExportedHF | ExportedMeta)."""
    if target not in TARGETS:
        raise ValueError(f"--to {target!r}: choose 'hf' (transformers from_pretrained folder) or 'meta' "
                         f"(consolidated*.pth + params.json).")
    source = load_source(src)
    if target == "meta":
        from chameleon_jax.convert.to_meta import write_meta

        return source, write_meta(source.config, source.params, out_dir, ranks=ranks, dtype=dtype)
    from chameleon_jax.convert.to_hf import write_hf

    vqgan = None
    if with_vqgan and source.vqgan is not None:
        from chameleon_jax.vqgan import checkpoint as vq_checkpoint

        vqgan = vq_checkpoint.load(source.vqgan)
    return source, write_hf(source.config, source.params, out_dir, tokenizer=source.tokenizer, vqgan=vqgan,
                            dtype=dtype)
