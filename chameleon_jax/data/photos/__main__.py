"""python -m chameleon_jax.data.photos --out DIR [--crops_per_photo 8] [--seed 0]

Writes the packaged photographs as DIR/train, DIR/heldout and DIR/manifest.json; see
chameleon_jax.data.photos for the split.
"""
from absl import app, flags

flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("crops_per_photo", 8, "Random square crops written per training photo (besides the whole photo).")
flags.DEFINE_integer("seed", 0, "Seed of the crops.")
flags.DEFINE_integer("min_crop", 128, "Smallest crop side in source pixels (the training resolution keeps crops "
                     "from being upsampled).")


def main(argv):
    del argv
    from chameleon_jax.data import photos

    F = flags.FLAGS
    manifest = photos.write_photo_folder(F.out, crops_per_photo=F.crops_per_photo, seed=F.seed, min_crop=F.min_crop)
    counts = {s: sum(f["split"] == s for f in manifest["files"]) for s in ("train", "heldout")}
    print(f"wrote {counts['train']} training images ({len(photos.TRAIN)} photos and their crops) to {F.out}/train, "
          f"{counts['heldout']} held-out photos to {F.out}/heldout")


if __name__ == "__main__":
    app.run(main)
