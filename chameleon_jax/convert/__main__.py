"""Converts a HF transformers or Meta Chameleon checkpoint into our params + config, and back.

  python -m chameleon_jax.convert --from hf --src HF_DIR --out OUT_DIR
  python -m chameleon_jax.convert --from meta --src RELEASE_DIR --out OUT_DIR [--param_dtype bfloat16]
  python -m chameleon_jax.convert --to hf --src EXPORT_OR_WORKDIR --out HF_DIR
  python -m chameleon_jax.convert --to meta --src EXPORT_OR_WORKDIR --out META_DIR [--ranks 4]
"""
from absl import app, flags

flags.DEFINE_enum("from", None, ["hf", "meta"], "Import. hf: a save_pretrained directory of "
                  "ChameleonForConditionalGeneration (safetensors); meta: Meta's release (7b/ or 30b/ beside "
                  "tokenizer/: the transformer, VQ-GAN and text tokenizer into one export) or one model folder "
                  "(params.json, consolidated*.pth).")
flags.DEFINE_enum("to", None, ["hf", "meta"], "Export (--src: a params export or a training workdir). hf: a "
                  "folder for ChameleonForConditionalGeneration.from_pretrained; meta: consolidated*.pth + "
                  "params.json.")
flags.DEFINE_string("src", None, "Directory to read.", required=True)
flags.DEFINE_string("out", None, "Directory to write (--from: state/, config.json; local or gs://. --to: local).",
                    required=True)
flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                  "dtype of the written params (float32 = training master weights; --to: default the source's).")
flags.DEFINE_integer("ranks", None, "--to meta: model-parallel ranks to write (default: qk_norm_groups).")
flags.DEFINE_bool("vqgan", True, "--to hf: write the source's VQ-GAN as model.vqmodel (--novqgan: leave it out).")
flags.DEFINE_alias("param-dtype", "param_dtype")
flags.DEFINE_string("image_ids", None, "START:STOP image-code id range written to loss.image_ids (default: "
                    "HF's vocabulary_map, else Chameleon's 4:8196).")
flags.DEFINE_alias("image-ids", "image_ids")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    F = flags.FLAGS
    if (F["from"].value is None) == (F.to is None):
        raise app.UsageError("give exactly one of --from hf|meta (import into our params) or --to hf|meta "
                             "(export our params)")
    if F.to is not None:
        return _export(F)
    if F.ranks is not None:
        raise app.UsageError("--ranks applies to --to meta; an import takes its ranks from the shard files")
    try:
        image_ids = None if F.image_ids is None else tuple(int(i) for i in F.image_ids.split(":"))
    except ValueError:
        raise app.UsageError(f"--image_ids={F.image_ids!r}; write it as START:STOP, e.g. 4:8196") from None
    import jax

    # Conversion is host-side numpy work; keep accelerators free for a job running beside it.
    jax.config.update("jax_platforms", "cpu")
    from chameleon_jax.convert import convert

    config = convert(F["from"].value, F.src, F.out, F.param_dtype, image_ids)
    m = config.model
    print(f"wrote {F.out}: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads / "
          f"{m.n_kv_heads} kv, qk_norm_groups {m.qk_norm_groups}, block_order {m.block_order}")
    from chameleon_jax.convert import release

    for line in release.describe(F.out):  # the VQ-GAN and tokenizer of a converted release
        print(line)


def _export(F):
    if F.ranks is not None and F.to != "meta":
        raise app.UsageError("--ranks applies to --to meta (HF's folder is not split by rank)")
    if F.image_ids is not None:
        raise app.UsageError("--image_ids applies to an import; an export takes loss.image_ids from the source")
    import jax

    jax.config.update("jax_platforms", "cpu")
    from chameleon_jax.convert.export import export

    dtype = F.param_dtype if F["param_dtype"].present else None
    source, result = export(F.to, F.src, F.out, ranks=F.ranks, dtype=dtype, with_vqgan=F.vqgan)
    m = source.config.model
    print(f"read {source.path}: {m.n_layers} layers, d_model {m.d_model}, qk_norm_groups {m.qk_norm_groups}, "
          f"block_order {m.block_order}")
    if F.to == "meta":
        print(f"wrote {F.out}: {result.ranks} rank(s) ({', '.join(result.files)}); largest rank "
              f"{result.rank_bytes / 2**20:.1f} MiB")
    else:
        print(f"wrote {F.out}: {result.tensors} tensors ({', '.join(result.files)})")
        for note in result.notes:
            print(f"note: {note}")


if __name__ == "__main__":
    app.run(main)
