"""Captioning and VQA scores: CIDEr-D (pycocoevalcap's scorer) and VQA answer accuracy.

    corpus, per_item = cider(["a red circle"], [["a red circle", "one red disc"]])
    acc, per_item = vqa_accuracy(["Two"], [["2", "two", "3"]])      # exact match after normalisation
    score, per_item = vqa_score(["2"], [["2"] * 3 + ["3"] * 7])     # the VQA benchmark's human-consensus score

Both metrics return the corpus figure and a float64 array with one value per item, so a caller can put a
confidence interval on the corpus figure (`chameleon_jax.evals.stats`).
"""
import re
import unicodedata

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer

# ---------------------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------------------


def caption_tokens(text: str) -> str:
    """Our stand-in for the COCO toolkit's Java PTBTokenizer: lowercase, every Unicode punctuation
    character becomes a space, words are split on whitespace and joined by one space.

    The PTB tokenizer also lowercases and then drops punctuation tokens; where the two differ is clitics
    ("man's" is "man 's" there, "man s" here). Candidates and references go through the same rule, so the
    n-gram statistics CIDEr compares are consistent; absolute figures may differ slightly from numbers
    computed with the Java tokenizer.
    """
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return " ".join(text.split())


def cider(predictions: list[str], references: list[list[str]]) -> tuple[float, np.ndarray]:
    """CIDEr-D (Vedantam et al. 2015, as in pycocoevalcap: n=1..4, sigma=6, clipped, x10) over a corpus.

    Returns (corpus score, per-item scores); the corpus score is the mean of the per-item ones. The idf
    weights come from the references of this corpus, so the score of one item depends on the others: a
    corpus of one item scores 0 (every n-gram's idf is log(1/1)). Scores lie in [0, 10].
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists; give one "
                         "reference list per prediction")
    if not predictions:
        raise ValueError("cider needs at least one prediction")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"item {i}: references must be a non-empty list of strings, got {refs!r}")
    scorer = CiderScorer(n=4, sigma=6.0)
    for prediction, refs in zip(predictions, references):
        scorer += (caption_tokens(prediction), [caption_tokens(r) for r in refs])
    corpus, per_item = scorer.compute_score()
    return float(corpus), np.asarray(per_item, np.float64)


# ---------------------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------------------

# The VQA evaluation's number map (vqaEval.py manualMap) and articles.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")   # "1,000" -> "1000"
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")  # "2.5" keeps its point
_APOSTROPHES = re.compile(r"['\u2019`]")


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation, in the form we keep:

    1. lowercase; newlines and tabs are spaces;
    2. a comma between digits is deleted ("1,000" -> "1000"); a point between digits stays ("2.5");
    3. apostrophes are deleted, so "don't" and "dont" match (this replaces vqaEval's contraction table);
    4. every other punctuation or symbol character becomes a space (vqaEval deletes some of them instead,
       depending on the rest of the string, and keeps a few such as "%" and "$": "50%" is "50" here);
    5. number words zero..ten and "none" become digits; the articles a/an/the are dropped;
    6. words are joined by single spaces.

    vqaEval normalises the references only when the human answers disagree; we always normalise both
    sides, the same way.
    """
    text = answer.lower().replace("\n", " ").replace("\t", " ")
    text = _DIGIT_COMMA.sub("", text)
    text = _DECIMAL_POINT.sub("\0", text)  # protect decimal points from the punctuation rule
    text = _APOSTROPHES.sub("", text)
    text = "".join(" " if unicodedata.category(ch).startswith(("P", "S")) and ch != "\0" else ch for ch in text)
    text = text.replace("\0", ".")
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def _check_pairs(predictions, answers):
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists; give one answer "
                         "list per prediction")
    if not predictions:
        raise ValueError("need at least one prediction")
    for i, ans in enumerate(answers):
        if isinstance(ans, str) or not ans:
            raise ValueError(f"item {i}: answers must be a non-empty list of strings, got {ans!r}")


def vqa_accuracy(predictions: list[str], answers: list[list[str]]) -> tuple[float, np.ndarray]:
    """Exact match: an item scores 1 when its normalised prediction equals any of its normalised answers.

    Returns (mean accuracy in [0, 1], per-item 0/1 values).
    """
    _check_pairs(predictions, answers)
    per_item = np.array([float(normalize_answer(p) in {normalize_answer(a) for a in ans})
                         for p, ans in zip(predictions, answers)], np.float64)
    return float(per_item.mean()), per_item


def vqa_score(predictions: list[str], answers: list[list[str]]) -> tuple[float, np.ndarray]:
    """The VQA benchmark's consensus score, for items with at least 3 human answers (VQA v2 has 10).

    As vqaEval.py computes it: for each human answer i, min(#matches among the other answers / 3, 1);
    the item's score is the mean over i. (With 10 answers this is min(#matches/3, 1) averaged over the
    10 leave-one-out subsets.) Items with fewer than 3 answers get NaN per item and are left out of the
    corpus mean, which is NaN when no item qualifies.
    """
    _check_pairs(predictions, answers)
    per_item = np.full(len(predictions), np.nan)
    for k, (p, ans) in enumerate(zip(predictions, answers)):
        if len(ans) < 3:
            continue
        pred = normalize_answer(p)
        hits = np.array([normalize_answer(a) == pred for a in ans])
        others = hits.sum() - hits  # matches among the answers other than i
        per_item[k] = np.minimum(others / 3.0, 1.0).mean()
    scored = per_item[~np.isnan(per_item)]
    return (float(scored.mean()) if scored.size else float("nan")), per_item
