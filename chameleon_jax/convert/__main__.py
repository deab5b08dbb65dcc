"""Converts a HF transformers or Meta Chameleon checkpoint into our params + config.

  python -m chameleon_jax.convert --from hf --src HF_DIR --out OUT_DIR
  python -m chameleon_jax.convert --from meta --src META_MODEL_DIR --out OUT_DIR
"""

from __future__ import annotations

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m chameleon_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, choices=("hf", "meta"),
                        help="hf: a save_pretrained directory of ChameleonForConditionalGeneration "
                             "(safetensors); meta: the official release folder (params.json, "
                             "consolidated*.pth)")
    parser.add_argument("--src", required=True, help="directory to read")
    parser.add_argument("--out", required=True, help="directory to write (state/, config.json)")
    parser.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of the written params (float32 = training master weights)")
    parser.add_argument("--image-ids", default=None, metavar="START:STOP",
                        help="image-code id range written to loss.image_ids (default: HF's "
                             "vocabulary_map, else Chameleon's 4:8196)")
    args = parser.parse_args(argv)
    image_ids = None if args.image_ids is None else tuple(int(i) for i in args.image_ids.split(":"))

    import jax

    # Conversion is host-side numpy work; keep accelerators free for a job running beside it.
    jax.config.update("jax_platforms", "cpu")
    from chameleon_jax.convert import convert

    config = convert(args.source, args.src, args.out, args.param_dtype, image_ids)
    m = config.model
    print(f"wrote {args.out}: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads / "
          f"{m.n_kv_heads} kv, qk_norm_groups {m.qk_norm_groups}, block_order {m.block_order}")


if __name__ == "__main__":
    main()
