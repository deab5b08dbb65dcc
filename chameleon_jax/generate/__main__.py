"""python -m chameleon_jax.generate --workdir RUN (--prompt TEXT | --prompts FILE.jsonl) --out DIR [--mesh=1,1,1]

Generates text and images with a trained Chameleon checkpoint, on a (data, fsdp, tensor) mesh:
params sharded by the model's rules (as eval restores them), the batch and KV cache over data×fsdp,
heads over tensor. Text is printed as it is produced (one prompt: as HF's TextStreamer; several:
whole lines prefixed "[line] "). Answers go to --out: index.html (prompts, text and images in order)
and, per answer, output.txt, output.json and image_<n>.png (in OUT itself for --prompt, in OUT/<line>/
for --prompts). See docs/generation.md.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from chameleon_jax.generate.answer import MODES
from chameleon_jax.generate.decoding import GUIDANCE_STREAMS

flags.DEFINE_string("workdir", None, "A training run (its latest checkpoint), e.g. runs/smoke/train.")
flags.DEFINE_string("checkpoint", None, "A step folder (DIR/checkpoints/<step>) or a params export.")
flags.DEFINE_string("prompt", None, "Text; `<image>` marks where each --image goes.")
flags.DEFINE_string("prompts", None, 'A JSONL file, one {"prompt": ..., "images": [...], "mode": ...} per line '
                    "(images and mode optional); bad lines are skipped and counted.")
flags.DEFINE_multi_string("image", [], "Input image file for --prompt (repeatable).")
flags.DEFINE_string("out", None, "Output folder: index.html plus each answer's output.txt, output.json, "
                    "image_<n>.png.", required=True)
flags.DEFINE_enum("mode", "mixed", MODES, "text only; an image answer (the prompt ends with begin-image); or "
                  "both, in any order. The default for JSONL lines without a mode.")
flags.DEFINE_string("mesh", "-1,1,1", "data,fsdp,tensor sizes (-1 fills the devices), as for eval.")
flags.DEFINE_integer("batch_size", 8, "Prompts decoded together (per mode); padded up to a multiple of "
                     "data×fsdp.")
flags.DEFINE_bool("stream", True, "Print the text as it is produced.")
flags.DEFINE_integer("stream_every", 32, "Decode steps per hand-over of tokens to the printer (a host callback "
                     "inside the loop costs about as much as a tiny model's step).")
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
flags.DEFINE_string("tokenizer", None, "sentencepiece .model or official .json (default: from the run's config, "
                    "or the converted release it is or started from).")
flags.DEFINE_string("vqgan", None, "A finished VQ-GAN run or its export (default: from the run's config, or the "
                    "converted release it is or started from).")
flags.DEFINE_alias("vqgan_workdir", "vqgan")
config_flags.DEFINE_config_file("vqgan_config", None, "The VQ-GAN's experiment config; only for an export "
                                "without config.json.")
flags.register_multi_flags_validator(["workdir", "checkpoint"], lambda f: bool(f["workdir"]) != bool(f["checkpoint"]),
                                    "give exactly one of --workdir RUN or --checkpoint PATH")
flags.register_multi_flags_validator(["prompt", "prompts"], lambda f: (f["prompt"] is None) != (f["prompts"] is None),
                                    "give exactly one of --prompt TEXT or --prompts FILE.jsonl")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from chameleon_jax.generate import batch
    from chameleon_jax.generate.answer import Decoding, Request, load
    from chameleon_jax.sampling import SamplingParams

    F = flags.FLAGS
    mesh = tuple(int(x) for x in F.mesh.split(","))
    if len(mesh) != 3:
        raise app.UsageError(f"--mesh={F.mesh}: give data,fsdp,tensor sizes, e.g. --mesh=1,1,1 or --mesh=-1,1,1")
    if F.prompts:
        requests, skipped = batch.read_prompts(F.prompts, F.mode)
        for n, why in skipped:
            print(f"skipped line {n}: {why}", flush=True)
    else:
        requests, skipped = [Request(F.prompt, tuple(F.image), F.mode, label=1)], []
    loaded = load(F.workdir or F.checkpoint, mesh=mesh, tokenizer=F.tokenizer, vqgan=F.vqgan,
                  vqgan_config=F.vqgan_config)
    print(f"{len(requests)} prompt(s) on mesh {dict(loaded.mesh.shape)} from {loaded.step_dir}", flush=True)
    decoding = Decoding(F.max_new_tokens, F.seed, SamplingParams(F.temperature, F.top_k, F.top_p, F.repetition_penalty),
                        SamplingParams(F.image_temperature, 0, F.image_top_p), F.guidance, F.text_scale,
                        F.image_scale, F.stop_at_end_of_turn)
    summary = batch.run(loaded, requests, F.out, decoding, batch_size=F.batch_size,
                        stream=sys.stdout if F.stream else None, stream_every=F.stream_every, skipped=skipped,
                        flat=not F.prompts)
    if not F.stream:  # the answers' text and image files, as the stream would have shown them
        for e in summary["entries"]:
            lines = [p["text"] if "text" in p else f"[{p['image']}]" for p in e["parts"]]
            print("\n".join(lines if not F.prompts else (f"[{e['label']}] {x}" for x in lines)))
    late = [(n, why) for n, why in summary["skipped"] if (n, why) not in skipped]
    for n, why in late:
        print(f"skipped line {n}: {why}" if F.prompts else f"skipped: {why}")
    print(f"wrote {summary['page']}: {summary['answers']} answer(s), {summary['images']} image(s), "
          f"{len(summary['skipped'])} skipped")


if __name__ == "__main__":
    from chameleon_jax import cpu

    cpu.use_huge_pages()  # before anything allocates; see chameleon_jax/cpu.py
    app.run(main)
