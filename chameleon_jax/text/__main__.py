"""python -m chameleon_jax.text train --input a.txt,b.jsonl|pydoc --model_prefix out/spm [--vocab_size 4000]

Trains a sentencepiece BPE model with the unified vocabulary's reserved ids; see chameleon_jax.text.
"""
from absl import app, flags

flags.DEFINE_list("input", None, "Text/JSONL files, or `pydoc`.", required=True)
flags.DEFINE_string("model_prefix", None, "Output prefix; writes PREFIX.model and PREFIX.vocab.", required=True)
flags.DEFINE_integer("vocab_size", 4000, "Sentencepiece vocabulary size (including the 7 reserved ids).")
flags.DEFINE_integer("image_codes", 1024, "VQ-GAN codebook size (only to report the unified vocab size).")


def main(argv):
    if argv[1:] != ["train"]:
        raise app.UsageError("usage: python -m chameleon_jax.text train --input a.txt,b.jsonl|pydoc "
                             "--model_prefix out/spm --vocab_size 4000")
    from chameleon_jax import text

    F = flags.FLAGS
    path = text.train_sentencepiece(text.corpus_lines(F.input), F.model_prefix, F.vocab_size)
    tok = text.SentencePieceText(path, F.image_codes)
    print(f"wrote {path}: {tok.vocab.size - tok.vocab.text_start} text pieces; unified vocab "
          f"{tok.vocab.name} of size {tok.vocab.size} with image_codes={F.image_codes}")


if __name__ == "__main__":
    app.run(main)
