"""python -m chameleon_jax.data.corpora shapes|pydoc --out DIR [--count N] [--split train] [--seed 0]

Writes an offline corpus as JSONL documents; see chameleon_jax.data.corpora.
"""
from absl import app, flags

flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("count", 2000, "shapes: number of scenes.")
flags.DEFINE_string("split", "train", "shapes: which split's scenes to write.")
flags.DEFINE_integer("seed", 0, "shapes: dataset seed.")


def main(argv):
    if argv[1:] not in (["shapes"], ["pydoc"]):
        raise app.UsageError("usage: python -m chameleon_jax.data.corpora shapes|pydoc --out DIR [--count N]")
    from chameleon_jax.data import corpora

    F = flags.FLAGS
    if argv[1] == "shapes":
        path = corpora.write_shapes(F.out, F.count, F.split, F.seed)
    else:
        path = corpora.write_pydoc(F.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
