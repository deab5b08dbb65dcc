"""Converts a HF transformers or Meta Chameleon checkpoint into our params + config.

  python -m chameleon_jax.convert --from hf --src HF_DIR --out OUT_DIR
  python -m chameleon_jax.convert --from meta --src META_MODEL_DIR --out OUT_DIR [--param_dtype bfloat16]
"""
from absl import app, flags

flags.DEFINE_enum("from", None, ["hf", "meta"], "hf: a save_pretrained directory of "
                  "ChameleonForConditionalGeneration (safetensors); meta: the official release folder "
                  "(params.json, consolidated*.pth).", required=True)
flags.DEFINE_string("src", None, "Directory to read.", required=True)
flags.DEFINE_string("out", None, "Directory to write (state/, config.json); local or gs://.", required=True)
flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                  "dtype of the written params (float32 = training master weights).")
flags.DEFINE_alias("param-dtype", "param_dtype")
flags.DEFINE_string("image_ids", None, "START:STOP image-code id range written to loss.image_ids (default: "
                    "HF's vocabulary_map, else Chameleon's 4:8196).")
flags.DEFINE_alias("image-ids", "image_ids")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    F = flags.FLAGS
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


if __name__ == "__main__":
    app.run(main)
