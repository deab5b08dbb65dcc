"""python -m chameleon_jax.pretokenize --input A.jsonl,FOLDER,SHARDS/ --out DIR --tokenizer spm.model --vqgan RUN

Documents -> token shards + manifest.json; see chameleon_jax.pretokenize.
"""
from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_list("input", None, "JSONL files, image folders (IMG + IMG.txt), .tar shards or folders of them.",
                  required=True)
flags.DEFINE_string("out", None, "Output directory for shards and manifest.json.", required=True)
flags.DEFINE_string("tokenizer", None, "sentencepiece .model (from `python -m chameleon_jax.text train`) or the "
                    "official text_tokenizer.json (default: the one in --vqgan, when that is a converted release).")
flags.DEFINE_string("vqgan", None, "A finished VQ-GAN run (`python -m chameleon_jax.vqgan.train --workdir`), its "
                    "export, the export's state/ folder, or a converted Chameleon release (`python -m "
                    "chameleon_jax.convert --from meta`; its tokenizer is used too).")
flags.DEFINE_alias("vqgan_checkpoint", "vqgan")
config_flags.DEFINE_config_file("vqgan_config", None, "VQ-GAN experiment config: sizes random weights "
                                "(--vqgan_random_init), or an export without config.json.")
flags.DEFINE_bool("vqgan_random_init", False, "Use randomly initialised VQ-GAN params (smoke runs only).")
flags.DEFINE_integer("docs_per_shard", 1000, "Input documents per output shard (the resume unit).")
flags.DEFINE_integer("encode_batch", 16, "Images per jitted VQ-GAN call.")
flags.DEFINE_integer("seed", 0, "Seed of the image-first flip of pairs.")
flags.DEFINE_enum("pair_loss", "all", ["all", "target"], "Image–text pairs: loss on every token, or only on the "
                  "second modality given the first (captioning / text-to-image).")
flags.DEFINE_float("image_first_fraction", 0.5, "Share of image–text pairs written image first (the rest caption "
                   "first).")
flags.DEFINE_bool("allow_paths_outside_input", False, "Let image paths in a JSONL leave its folder (absolute, '..', "
                  "symlinks out); only for a trusted corpus, otherwise they are skipped.")
flags.DEFINE_integer("max_image_pixels", -1, "Skip images that decode to more pixels than this (-1: 64 x "
                     "resolution^2, at least 16.8 MP; 0: only Pillow's 89 MP bomb guard); JPEGs are decoded reduced "
                     "first, so this bounds PNG/WebP memory.")
flags.DEFINE_integer("seq_len", 0, "Skip documents holding an image longer than this (0 = no check).")
flags.DEFINE_integer("process_index", -1, "This host's index (default: jax.process_index()).")
flags.DEFINE_integer("process_count", -1, "Number of hosts (default: jax.process_count()).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    F = flags.FLAGS
    if bool(F.vqgan) == bool(F.vqgan_random_init):
        raise app.UsageError("pass --vqgan RUN (a trained VQ-GAN run or its export), or --vqgan_random_init "
                             "with --vqgan_config FILE for a smoke run")
    if F.tokenizer is None and not F.vqgan:
        raise app.UsageError("pass --tokenizer FILE (or --vqgan a converted release, which holds its tokenizer)")
    if F.vqgan_random_init and F.vqgan_config is None:
        raise app.UsageError("--vqgan_random_init needs --vqgan_config (e.g. experiments/vqgan_smoke.py): it "
                             "sizes the images and the image-code block")
    from chameleon_jax import cpu

    cpu.use_every_core(divides=(F.encode_batch,))  # encode batches are sharded over the cores
    from chameleon_jax import pretokenize

    m = pretokenize.pretokenize_corpus(
        F.input, F.out, tokenizer=F.tokenizer, vqgan=F.vqgan, vqgan_config=F.vqgan_config,
        encode_batch=F.encode_batch, seed=F.seed, max_image_pixels=F.max_image_pixels,
        process_index=None if F.process_index < 0 else F.process_index,
        process_count=None if F.process_count < 0 else F.process_count, docs_per_shard=F.docs_per_shard,
        seq_len=F.seq_len, pair_loss=F.pair_loss, image_first_fraction=F.image_first_fraction,
        allow_paths_outside_input=F.allow_paths_outside_input)
    print(f"{F.out}: {m['documents']} documents in {m['shards']} shards; tokens {m['tokens']}; "
          f"skipped {m['skipped_by_reason'] or 'none'} (details in {F.out}/manifest.json)")


if __name__ == "__main__":
    from chameleon_jax import cpu

    cpu.use_huge_pages()  # before anything allocates; see chameleon_jax/cpu.py
    app.run(main)
