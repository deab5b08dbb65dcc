"""The two answer sets of a pairwise judgement, gathered in one folder the judging server reads.

    a = Side(checkpoint="runs/x/checkpoints/500", decoding=Decoding(seed=0, text=SamplingParams(1.0)))
    b = Side(checkpoint="runs/x/checkpoints/500", decoding=Decoding(seed=1, text=SamplingParams(1.0)))
    pairing = prepare("/tmp/judge", "prompts.jsonl", a, b, sides_seed=0)

A side is a checkpoint answering the prompts (`chameleon_jax.generate`'s loader and batch decoder),
or a folder of earlier answers to the same prompts file (`python -m chameleon_jax.generate --prompts
FILE --out DIR`). Two sides from one checkpoint are loaded once and decoded twice (another seed or
temperature: a second sample). OUT then holds

    pairing.json            the paired prompts (id = line number, text, input images, who is on the left),
                            what A and B are, the lines skipped and why
    A/<id>/, B/<id>/        each side's answer: output.txt, output.json (its parts in order), image_<n>.png
    inputs/<id>_<k>.<ext>   the prompts' input images, so the page never reads outside OUT
    judgements.jsonl        the judge's preferences (chameleon_jax/judge/server.py appends them)
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

from etils import epath

from chameleon_jax.evals import pairwise
from chameleon_jax.generate.answer import Decoding

PAIRING = "pairing.json"


@dataclasses.dataclass(frozen=True)
class Side:
    """Where one side's answers come from: `checkpoint` decoded with `decoding`, or the folder `answers`."""

    checkpoint: str | None = None
    answers: str | None = None
    decoding: Decoding = Decoding()

    def __post_init__(self):
        if (self.checkpoint is None) == (self.answers is None):
            raise ValueError("a side is a checkpoint or a folder of answers: give exactly one of checkpoint= "
                             "and answers=")

    def describe(self) -> str:
        if self.answers is not None:
            return f"answers in {self.answers}"
        d = self.decoding
        return (f"{self.checkpoint} (seed {d.seed}, temperature {d.text.temperature:g}, "
                f"image temperature {d.image.temperature:g}, guidance {d.guidance})")


def prepare(out: str, prompts: str, a: Side, b: Side, *, sides_seed: int = 0, mode: str = "mixed",
            mesh=(-1, 1, 1), batch_size: int = 8, tokenizer: str | None = None, vqgan: str | None = None,
            vqgan_config=None, compiler_options: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Answers (or copies) both sides' responses to every line of the JSONL `prompts` into OUT, pairs
    them, draws the sides, and writes OUT/pairing.json; returns it."""
    from chameleon_jax.generate import batch

    out = epath.Path(out)
    requests, skipped = batch.read_prompts(prompts, mode)
    if not requests:
        raise ValueError(f"{prompts}: no prompt could be read ({len(skipped)} line(s) skipped: "
                         f"{skipped[:3]}); see docs/generation.md for the JSONL format")
    loaded = {}
    for name, side in (("A", a), ("B", b)):
        folder = out / name
        if side.answers is not None:
            _copy_answers(side.answers, folder, [r.label for r in requests])
            log(f"{name}: copied the answers in {side.answers}")
            continue
        if side.checkpoint not in loaded:
            import jax

            from chameleon_jax.generate.answer import load

            # A mesh without -1 takes the first devices it needs (as generate.answer does).
            devices = jax.devices()[:math.prod(mesh)] if -1 not in mesh else None
            loaded = {side.checkpoint: load(side.checkpoint, mesh=mesh, devices=devices, tokenizer=tokenizer,
                                            vqgan=vqgan, vqgan_config=vqgan_config)}  # one model in memory at a time
        summary = batch.run(loaded[side.checkpoint], requests, str(folder), side.decoding, batch_size=batch_size,
                            compiler_options=compiler_options)
        log(f"{name}: {summary['answers']} answer(s), {summary['images']} image(s) from {side.describe()}")
    answered = {name: _recorded_prompts(out / name, [r.label for r in requests]) for name in pairwise.CHECKPOINTS}
    ids, unpaired = pairwise.pair_answers([(r.label, r.prompt) for r in requests], answered["A"], answered["B"])
    left = pairwise.assign_sides(ids, sides_seed)
    by_id = {r.label: r for r in requests}
    prompts_out = []
    for pid in ids:
        inputs = []
        for k, image in enumerate(by_id[pid].images, start=1):
            src = epath.Path(image)
            name = f"{pid}_{k}{src.suffix.lower()}"
            (out / "inputs").mkdir(parents=True, exist_ok=True)
            (out / "inputs" / name).write_bytes(src.read_bytes())
            inputs.append(name)
        prompts_out.append({"id": pid, "prompt": by_id[pid].prompt, "inputs": inputs, "left": left[pid]})
    pairing = {"prompts_file": str(prompts), "sides_seed": sides_seed, "a": a.describe(), "b": b.describe(),
               "prompts": prompts_out, "skipped": sorted([list(s) for s in skipped + unpaired], key=lambda s: s[0])}
    (out / PAIRING).write_text(json.dumps(pairing, indent=1))
    return pairing


def read_pairing(out: str) -> dict:
    path = epath.Path(out) / PAIRING
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: answer the prompts first (python -m chameleon_jax.judge "
                                "--prompts FILE.jsonl --checkpoint A --out DIR)")
    return json.loads(path.read_text())


def answer_parts(out: str, side: str, prompt_id) -> list[dict]:
    """One answer's parts in the order generated: {"text": ...} or {"image": file name, "size": [w, h]}."""
    record = json.loads((epath.Path(out) / side / str(prompt_id) / "output.json").read_text())
    return [{"text": p["text"]} if "text" in p else {"image": p["image"], "size": p.get("size")}
            for p in record["segments"]]


def _recorded_prompts(folder: epath.Path, labels) -> dict:
    """{label: the prompt its output.json records} for the answers present and readable in `folder`."""
    found = {}
    for label in labels:
        path = folder / str(label) / "output.json"
        try:
            record = json.loads(path.read_text())
            if isinstance(record["segments"], list) and isinstance(record["prompt"], str):
                found[label] = record["prompt"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            continue  # no answer (a line the generator skipped, or a damaged folder): pair_answers says so
    return found


def _copy_answers(src: str, dst: epath.Path, labels) -> None:
    for label in labels:
        folder = epath.Path(src) / str(label)
        if not folder.is_dir():
            continue
        (dst / str(label)).mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            if f.is_file():
                (dst / str(label) / f.name).write_bytes(f.read_bytes())
