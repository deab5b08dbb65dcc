"""python -m chameleon_jax.generate --workdir RUN --prompt TEXT --out DIR [--image FILE ...] [--mode ...]

Generates text and images with a trained Chameleon checkpoint and writes them to --out (output.txt,
output.json, image_<n>.png); see chameleon_jax.generate.answer.
"""
from absl import app, flags
from ml_collections import config_flags

from chameleon_jax.generate.answer import MODES
from chameleon_jax.generate.decoding import GUIDANCE_STREAMS

flags.DEFINE_string("workdir", None, "A training run (its latest checkpoint), e.g. runs/smoke/train.")
flags.DEFINE_string("checkpoint", None, "A step folder (DIR/checkpoints/<step>) or a params export.")
flags.DEFINE_string("prompt", None, "Text; `<image>` marks where each --image goes.", required=True)
flags.DEFINE_multi_string("image", [], "Input image file (repeatable).")
flags.DEFINE_string("out", None, "Output folder: output.txt, output.json, image_<n>.png.", required=True)
flags.DEFINE_enum("mode", "mixed", MODES, "text only; an image answer (the prompt ends with begin-image); or "
                  "both, in any order.")
flags.DEFINE_integer("max_new_tokens", 0, "Default: 64 text tokens plus one image.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_float("temperature", 0.0, "Text temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Text top-k (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Text nucleus mass.")
flags.DEFINE_float("repetition_penalty", 1.0, "Text repetition penalty.")
flags.DEFINE_float("image_temperature", 0.0, "Image-code temperature; 0 = greedy.")
flags.DEFINE_float("image_top_p", 1.0, "Image-code nucleus mass.")
flags.DEFINE_enum("guidance", "none", sorted(GUIDANCE_STREAMS), "Classifier-free guidance streams for images.")
flags.DEFINE_float("text_scale", 3.0, "Guidance scale of the text condition.")
flags.DEFINE_float("image_scale", 1.2, "Guidance scale of the image condition.")
flags.DEFINE_bool("stop_at_end_of_turn", False, "Also stop at end-of-turn (chat/SFT models).")
flags.DEFINE_string("tokenizer", None, "sentencepiece .model or official .json (default: from the run's config).")
flags.DEFINE_string("vqgan", None, "A finished VQ-GAN run or its export (default: from the run's config).")
flags.DEFINE_alias("vqgan_workdir", "vqgan")
config_flags.DEFINE_config_file("vqgan_config", None, "The VQ-GAN's experiment config; only for an export "
                                "without config.json.")
flags.register_multi_flags_validator(["workdir", "checkpoint"], lambda f: bool(f["workdir"]) != bool(f["checkpoint"]),
                                    "give exactly one of --workdir RUN or --checkpoint PATH")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from chameleon_jax.generate.answer import answer
    from chameleon_jax.sampling import SamplingParams

    F = flags.FLAGS
    lines = answer(
        F.workdir or F.checkpoint, F.prompt, F.out, images=F.image, mode=F.mode, max_new_tokens=F.max_new_tokens,
        seed=F.seed, text=SamplingParams(F.temperature, F.top_k, F.top_p, F.repetition_penalty),
        image=SamplingParams(F.image_temperature, 0, F.image_top_p), guidance=F.guidance,
        text_scale=F.text_scale, image_scale=F.image_scale, stop_at_end_of_turn=F.stop_at_end_of_turn,
        tokenizer=F.tokenizer, vqgan=F.vqgan, vqgan_config=F.vqgan_config)
    n_images = sum(line.startswith("[image_") for line in lines)
    print("\n".join(lines))
    print(f"wrote {F.out}/output.txt" + (f" and {n_images} image(s)" if n_images else ""))


if __name__ == "__main__":
    from chameleon_jax import cpu

    cpu.use_huge_pages()  # before anything allocates; see chameleon_jax/cpu.py
    app.run(main)
