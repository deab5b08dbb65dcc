"""Pairwise preference judging of two answer sets (the paper's human evaluation, §5): the pure part.

    ids, skipped = pair_answers(prompts, answers_a, answers_b)   # prompts both sides answered
    left = assign_sides(ids, seed=0)                             # {id: "A" | "B"}: who is shown on the left
    record = judgement(id, "left", left[id], now())              # one line of judgements.jsonl
    records, bad = parse_records(text)                           # a truncated last line is counted, not fatal
    result = rates(latest(records).values())                     # A's win / tie / loss rates with 95% CIs
    print(report(result, "A: runs/x", "B: runs/y", total=len(ids)))

The judge sees "left" and "right" only; which checkpoint sat on which side is recorded with every
judgement, so the rates map back through the sides without trusting the page. Sides are balanced
(half the prompts show A on the left, an odd one out drawn at random) and then shuffled with a seed:
a judge who favours one side adds the same preference to A and B, which a per-prompt coin flip only
gives on average. The server and the answer folders are in `chameleon_jax/judge`.
"""
from __future__ import annotations

import dataclasses
import json
import random
from typing import Iterable, Mapping, Sequence

from chameleon_jax.evals.stats import wilson_interval

CHOICES = ("left", "right", "tie")
SIDES = ("left", "right")
CHECKPOINTS = ("A", "B")
OUTCOMES = ("win", "tie", "loss")   # from A's side


def other(side: str) -> str:
    """The checkpoint that is not `side` ("A" <-> "B")."""
    if side not in CHECKPOINTS:
        raise ValueError(f"side {side!r} is not one of {CHECKPOINTS}")
    return "B" if side == "A" else "A"


def pair_answers(prompts: Sequence[tuple[object, str]], answers_a: Mapping[object, str],
                 answers_b: Mapping[object, str]) -> tuple[list, list[tuple[object, str]]]:
    """The prompt ids (in prompt order) that both sides answered, and (id, why) for the rest.

    `prompts`: (id, prompt text); `answers_*`: id -> the prompt text recorded with that answer. An
    answer to another prompt text (a folder made from another prompts file) is refused, not paired."""
    paired, skipped = [], []
    for pid, text in prompts:
        missing = [name for name, answers in (("A", answers_a), ("B", answers_b)) if pid not in answers]
        if missing:
            skipped.append((pid, f"no readable answer from {' and '.join(missing)}"))
            continue
        stale = [name for name, answers in (("A", answers_a), ("B", answers_b)) if answers[pid] != text]
        if stale:
            recorded = (answers_a if stale[0] == "A" else answers_b)[pid]
            skipped.append((pid, f"the answer from {' and '.join(stale)} is to another prompt ({recorded!r}); "
                                 "answer this prompts file again"))
            continue
        paired.append(pid)
    return paired, skipped


def assign_sides(prompt_ids: Sequence, seed: int) -> dict:
    """{id: the checkpoint shown on the left}: half "A", half "B" (the odd one random), shuffled by `seed`."""
    rng = random.Random(seed)  # int seed: the same sides on every machine and Python version
    n = len(prompt_ids)
    lefts = ["A"] * (n // 2) + ["B"] * (n // 2) + ([rng.choice(CHECKPOINTS)] if n % 2 else [])
    rng.shuffle(lefts)
    return dict(zip(prompt_ids, lefts))


def winner(choice: str, left: str) -> str:
    """"A", "B" or "tie": the judge's `choice` of side, read through who was shown on the left."""
    if choice not in CHOICES:
        raise ValueError(f"choice {choice!r} is not one of {CHOICES}")
    if choice == "tie":
        return "tie"
    return left if choice == "left" else other(left)


def judgement(prompt_id, choice: str, left: str, time: str) -> dict:
    """One line of judgements.jsonl: what the judge chose, who was on each side, and the winner."""
    return {"prompt": prompt_id, "choice": choice, "left": left, "right": other(left),
            "winner": winner(choice, left), "time": time}


def parse_records(text: str) -> tuple[list[dict], list[int]]:
    """The judgements in a judgements.jsonl text, and the line numbers of lines that are not one
    (a server killed mid-write leaves at most a truncated last line; it is counted and left out)."""
    records, bad = [], []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            ok = (isinstance(r, dict) and "prompt" in r and r.get("choice") in CHOICES
                  and r.get("left") in CHECKPOINTS and r.get("winner") == winner(r["choice"], r["left"]))
        except json.JSONDecodeError:
            ok = False
        if ok:
            records.append(r)
        else:
            bad.append(n)
    return records, bad


def latest(records: Iterable[dict]) -> dict:
    """{prompt id: its last judgement}: a prompt judged again counts once, as last judged."""
    out = {}
    for r in records:
        out.pop(r["prompt"], None)  # re-insert, so the order is that of the latest judgements
        out[r["prompt"]] = r
    return out


def first_unjudged(prompt_ids: Sequence, records: Iterable[dict]):
    """The first prompt id without a judgement, or None when all are judged."""
    judged = {r["prompt"] for r in records}
    return next((pid for pid in prompt_ids if pid not in judged), None)


@dataclasses.dataclass(frozen=True)
class Rate:
    """count of n, as a rate with its Wilson interval at `confidence`."""

    count: int
    n: int
    low: float
    high: float
    confidence: float = 0.95

    @property
    def rate(self) -> float:
        return self.count / self.n if self.n else float("nan")


def rates(records: Iterable[dict], confidence: float = 0.95) -> dict[str, Rate]:
    """A's win, tie and loss rates over judgements (one per prompt: pass `latest(...).values()`).

    Each is a binomial proportion of the judged prompts with its own Wilson interval; the three
    intervals are marginal (each covers its rate at `confidence`), not a joint region."""
    winners = [r["winner"] for r in records]
    counts = {"win": winners.count("A"), "tie": winners.count("tie"), "loss": winners.count("B")}
    n = len(winners)
    return {k: Rate(c, n, *wilson_interval(c, n, confidence), confidence=confidence) for k, c in counts.items()}


def report(result: Mapping[str, Rate], name_a: str, name_b: str, total: int | None = None) -> str:
    """The rates as text, e.g.

        A: runs/x/checkpoints/500 (seed 0, temperature 1.0)
        B: runs/y/checkpoints/500 (seed 0, temperature 1.0)
        judged 12 of 20 prompts
        A wins   41.7%  (5/12)  95% CI [19.3%, 68.0%]
        ties     16.7%  (2/12)  95% CI [ 4.7%, 44.8%]
        A loses  41.7%  (5/12)  95% CI [19.3%, 68.0%]
    """
    n = next(iter(result.values())).n
    lines = [f"A: {name_a}", f"B: {name_b}", f"judged {n} of {total} prompts" if total is not None else
             f"judged {n} prompts"]
    for key, label in (("win", "A wins"), ("tie", "ties"), ("loss", "A loses")):
        r = result[key]
        rate = f"{100 * r.rate:5.1f}%" if n else "    -"
        lines.append(f"{label:<8} {rate}  ({r.count}/{n})  {round(100 * r.confidence)}% CI "
                     f"[{100 * r.low:4.1f}%, {100 * r.high:5.1f}%]")
    return "\n".join(lines)


def as_json(result: Mapping[str, Rate]) -> dict:
    """The rates as a JSON-ready dict: {outcome: {"count", "n", "rate", "low", "high", "confidence"}}."""
    return {k: {"count": r.count, "n": r.n, "rate": r.rate if r.n else None, "low": r.low, "high": r.high,
                "confidence": r.confidence} for k, r in result.items()}
