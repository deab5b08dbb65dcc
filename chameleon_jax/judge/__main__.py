"""python -m chameleon_jax.judge --prompts P.jsonl --checkpoint A [--checkpoint_b B | --answers_b DIR] --out OUT

Pairwise human judging of two answer sets (the paper's headline evaluation): answers every prompt of
P.jsonl (the format of `python -m chameleon_jax.generate --prompts`) from checkpoint A and from B,
then serves a page on 127.0.0.1 that shows each prompt with its two answers side by side, left and
right drawn at random per prompt (--sides_seed, recorded), and records a preference (left, right,
tie; buttons or keys) per prompt to OUT/judgements.jsonl. Ctrl-C stops it and prints A's win, tie and
loss rates with 95% Wilson intervals (also in OUT/rates.json); --report_only prints them again.

Side B: --checkpoint_b, or --answers_b (a folder of `python -m chameleon_jax.generate --prompts` answers
to the same file), or neither: a second sample of --checkpoint with --seed_b / --temperature_b.
Side A can be a folder of answers too (--answers). Running again with the same --out serves the
answers already there and resumes at the first unjudged prompt. See docs/evaluation.md.
"""
from absl import app, flags

from chameleon_jax.generate.answer import MODES
from chameleon_jax.generate.decoding import GUIDANCE_STREAMS

flags.DEFINE_string("prompts", None, 'A JSONL file, one {"prompt": ..., "images": [...], "mode": ...} per line; '
                    "bad lines are skipped and counted.")
flags.DEFINE_string("checkpoint", None, "Side A: a training run, a step folder or a params export.")
flags.DEFINE_string("answers", None, "Side A as a folder of earlier answers to --prompts (instead of --checkpoint).")
flags.DEFINE_string("checkpoint_b", None, "Side B: another checkpoint (default: a second sample of --checkpoint).")
flags.DEFINE_string("answers_b", None, "Side B as a folder of earlier answers to --prompts.")
flags.DEFINE_string("out", None, "Folder for both sides' answers, pairing.json, judgements.jsonl and rates.json.",
                    required=True)
flags.DEFINE_integer("port", 0, "Port on 127.0.0.1 (0: a free one, printed).")
flags.DEFINE_bool("serve", True, "Serve the judging page after answering (--noserve: answer and stop).")
flags.DEFINE_bool("report_only", False, "Print the rates of the judgements in --out and stop.")
flags.DEFINE_integer("sides_seed", 0, "Seed of the left/right draw (balanced: half the prompts show A on the left).")
flags.DEFINE_enum("mode", "mixed", MODES, "The answer mode of JSONL lines without one.")
flags.DEFINE_string("mesh", "-1,1,1", "data,fsdp,tensor sizes (-1 fills the devices), as for generate.")
flags.DEFINE_integer("batch_size", 8, "Prompts decoded together (per mode).")
flags.DEFINE_integer("max_new_tokens", 0, "Default: 64 text tokens plus one image.")
flags.DEFINE_integer("seed", 0, "Sampling seed of side A (and of B for --checkpoint_b).")
flags.DEFINE_integer("seed_b", None, "Sampling seed of a second sample of --checkpoint (default: --seed + 1).")
flags.DEFINE_float("temperature", 0.0, "Text temperature; 0 = greedy.")
flags.DEFINE_float("temperature_b", None, "Text temperature of side B (default: --temperature).")
flags.DEFINE_float("top_p", 1.0, "Text nucleus mass.")
flags.DEFINE_float("image_temperature", 0.0, "Image-code temperature; 0 = greedy.")
flags.DEFINE_enum("guidance", "none", sorted(GUIDANCE_STREAMS), "Classifier-free guidance streams for images.")
flags.DEFINE_bool("stop_at_end_of_turn", False, "Also stop at end-of-turn (chat/SFT models).")
flags.DEFINE_string("tokenizer", None, "Tokenizer (default: from the checkpoint's config or release).")
flags.DEFINE_string("vqgan", None, "VQ-GAN run or export (default: from the checkpoint's config or release).")
flags.register_multi_flags_validator(["checkpoint", "answers"], lambda f: f["checkpoint"] is None or f["answers"] is None,
                                    "give at most one of --checkpoint and --answers for side A")
flags.register_multi_flags_validator(["checkpoint_b", "answers_b"],
                                    lambda f: f["checkpoint_b"] is None or f["answers_b"] is None,
                                    "give at most one of --checkpoint_b and --answers_b for side B")


def _sides(F):
    """Sides A and B from the flags; a second sample of one checkpoint must be able to differ."""
    from chameleon_jax.generate.answer import Decoding
    from chameleon_jax.judge.responses import Side
    from chameleon_jax.sampling import SamplingParams

    if F.checkpoint is None and F.answers is None:
        raise app.UsageError("side A: give --checkpoint PATH (or --answers DIR of earlier answers)")

    def decoding(seed, temperature):
        return Decoding(F.max_new_tokens, seed, SamplingParams(temperature, 0, F.top_p),
                        SamplingParams(F.image_temperature), F.guidance, stop_at_end_of_turn=F.stop_at_end_of_turn)

    a = Side(F.checkpoint, F.answers, decoding(F.seed, F.temperature))
    temperature_b = F.temperature if F.temperature_b is None else F.temperature_b
    if F.checkpoint_b or F.answers_b:
        return a, Side(F.checkpoint_b, F.answers_b, decoding(F.seed, temperature_b))
    if F.checkpoint is None:
        raise app.UsageError("side B: give --checkpoint_b or --answers_b (a second sample needs --checkpoint)")
    seed_b = F.seed + 1 if F.seed_b is None else F.seed_b
    if F.temperature == temperature_b == F.image_temperature == 0:
        raise app.UsageError("two greedy answers of one checkpoint are the same answer: give --temperature (or "
                             "--temperature_b, --image_temperature) > 0, or --checkpoint_b / --answers_b")
    return a, Side(F.checkpoint, None, decoding(seed_b, temperature_b))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from etils import epath

    from chameleon_jax.judge import responses, server

    F = flags.FLAGS
    prepared = (epath.Path(F.out) / responses.PAIRING).exists()
    if F.report_only:
        if not prepared:
            raise app.UsageError(f"--report_only: {F.out} holds no judging (no {responses.PAIRING}); give the --out "
                                 "of an earlier run")
        session = server.Session(F.out)
        print(server.write_rates(session))
        session.close()
        return
    if prepared:
        print(f"serving the answers already in {F.out} (a new --out answers again)", flush=True)
    else:
        if F.prompts is None:
            raise app.UsageError("give --prompts FILE.jsonl (the prompts to answer)")
        a, b = _sides(F)
        mesh = tuple(int(x) for x in F.mesh.split(","))
        if len(mesh) != 3:
            raise app.UsageError(f"--mesh={F.mesh}: give data,fsdp,tensor sizes, e.g. --mesh=1,1,1")
        pairing = responses.prepare(F.out, F.prompts, a, b, sides_seed=F.sides_seed, mode=F.mode, mesh=mesh,
                                    batch_size=F.batch_size, tokenizer=F.tokenizer, vqgan=F.vqgan,
                                    log=lambda line: print(line, flush=True))
        for pid, why in pairing["skipped"]:
            print(f"skipped line {pid}: {why}", flush=True)
        print(f"wrote {F.out}/pairing.json: {len(pairing['prompts'])} prompt(s) paired, "
              f"{len(pairing['skipped'])} skipped", flush=True)
    if F.serve:
        server.run(F.out, F.port, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    from chameleon_jax import cpu

    cpu.use_huge_pages()  # before anything allocates; see chameleon_jax/cpu.py
    app.run(main)
