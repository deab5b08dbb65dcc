"""Printing text as the decoding loop produces it (in chunks of `stream_every` steps): the host side of `Generator(on_step=...)`.

    stream = TextStream(tokenizer.decode, vocab, labels=[0], out=sys.stdout)
    gen = Generator(graphdef, model_cfg, vocab, config, on_step=stream.put, stream_every=32)
    gen(params, prompts); stream.end()

One prompt (HF's `TextStreamer`, which only takes batch size 1): the text is printed as it grows, up to
its last space (a word's pieces can still merge with the next piece) or all of it at a newline.
Several prompts: interleaved words of different answers would be unreadable, so each answer's text is
printed a whole line at a time, prefixed with its label ("[3] ..."), as soon as the line ends.
An image prints as "<image>" where it opens; its codes are not text. Rows beyond `labels` (padding
added to fill the mesh) are not printed.
"""
from __future__ import annotations

import sys
import threading
from typing import Callable, Sequence, TextIO

import numpy as np

from chameleon_jax import vocab as vocab_lib


class _Row:
    def __init__(self):
        self.ids: list[int] = []   # the text run being decoded (since the last image)
        self.printed = 0           # characters of decode(ids) already handed out
        self.line = ""             # batch mode: the unfinished line
        self.in_image = False


class TextStream:
    """Collects each step's tokens [B] (in any order) and writes the answers' text to `out`."""

    def __init__(self, decode: Callable[[list[int]], str], vocab: vocab_lib.Vocab, labels: Sequence,
                 out: TextIO | None = None, labelled: bool | None = None, in_image: Sequence[bool] = ()):
        """labelled: print labelled lines (default: when there are several rows; a JSONL run always
        does, so each answer is named). in_image: rows whose prompt opened the image they answer with."""
        self.decode, self.vocab, self.labels = decode, vocab, list(labels)
        self.out = out if out is not None else sys.stdout
        self.labelled = len(self.labels) > 1 if labelled is None else labelled
        self.rows = [_Row() for _ in self.labels]
        for r, opened in enumerate(in_image):
            if opened:
                self._take(r, self.rows[r], vocab.begin_image)
        self._pending: dict[int, np.ndarray] = {}
        self._next = 0
        self._lock = threading.Lock()  # the callback may run on an XLA thread

    def put(self, step, tokens) -> None:
        """`Generator`'s on_step: the latest step and the tokens [B, T] generated so far (steps 0..step
        filled), or one step's tokens [B]."""
        tokens = np.asarray(tokens)
        with self._lock:
            if tokens.ndim == 2:
                for j in range(self._next, int(step) + 1):
                    self._pending[j] = tokens[:, j]
            else:
                self._pending[int(step)] = tokens
            while self._next in self._pending:
                tokens = self._pending.pop(self._next)
                self._next += 1
                for r, row in enumerate(self.rows):
                    self._take(r, row, int(tokens[r]))
            self.out.flush()

    def end(self) -> None:
        """Prints what is still held back (the last word, an unfinished line); call once decoding returns."""
        with self._lock:
            for r, row in enumerate(self.rows):
                self._emit(r, row, final=True)
                if self.labelled and row.line:
                    self.out.write(f"[{self.labels[r]}] {row.line}\n")
                    row.line = ""
            if not self.labelled:
                self.out.write("\n")
            self.out.flush()

    def _take(self, r: int, row: _Row, token: int) -> None:
        v = self.vocab
        if token == v.begin_image:
            self._emit(r, row, final=True)
            row.ids, row.printed, row.in_image = [], 0, True
            self._write(r, row, "<image>")
        elif token == v.end_image:
            row.in_image = False
        elif not (row.in_image or v.is_special(token) or v.is_image(token)):
            row.ids.append(token)
            self._emit(r, row, final=False)

    def _emit(self, r: int, row: _Row, final: bool) -> None:
        if not row.ids:
            return
        text = self.decode(row.ids)
        if final or text.endswith("\n"):
            cut = len(text)
        else:  # as TextStreamer: hold back the last word, whose pieces may still merge
            cut = text.rfind(" ") + 1
        if cut > row.printed:
            self._write(r, row, text[row.printed:cut])
            row.printed = cut

    def _write(self, r: int, row: _Row, text: str) -> None:
        if not self.labelled:
            self.out.write(text)
            return
        lines = (row.line + text).split("\n")
        for line in lines[:-1]:
            self.out.write(f"[{self.labels[r]}] {line}\n")
        row.line = lines[-1]
