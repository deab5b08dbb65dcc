"""Pairwise human judging of long-form mixed-modal answers (the paper's headline evaluation, §5).

    python -m chameleon_jax.judge --prompts P.jsonl --checkpoint A [--checkpoint_b B] --out DIR

    responses.py  both sides' answers in one folder: a checkpoint decoded (chameleon_jax.generate) or a
                  folder of earlier answers; the pairing and the drawn sides in OUT/pairing.json
    page.py       the blind side-by-side page of one prompt, and the rates page (all text escaped)
    server.py     http.server on 127.0.0.1: pages, images by side, judgements appended to OUT/judgements.jsonl
    __main__.py   the program
The pure part (pairing, sides, the record format, rates with Wilson intervals) is chameleon_jax.evals.pairwise.
"""
