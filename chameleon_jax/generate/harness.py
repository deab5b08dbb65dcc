"""lm-evaluation-harness on a stored checkpoint: the harness's `LM` API backed by our params on a mesh.

    summary = evaluate_tasks("runs/tiny/train", ["my_mc", "my_qa"], include_path="tasks/")
    summary["results"]["my_mc"]["acc,none"]

    lm = ChameleonLM(load(path, mesh=(1, 1, 2)), batch_size=8)    # the adapter alone
    lm.loglikelihood(instances)                                  # [(logprob, is_greedy), ...]

Requests, as the harness defines them (lm_eval.api.model.LM):
- loglikelihood (context, continuation): log p(continuation | <s> context), summed over the continuation's
  tokens; is_greedy when each of them is the argmax. The pair is tokenized whole and split where the
  context's tokens end (trailing spaces of the context move to the continuation), as the harness's own
  models do; an empty context conditions on <s> alone.
- loglikelihood_rolling (document,): log p(document | <s>) over windows of at most `max_length` input
  tokens (the harness's rule, `get_rolling_token_windows` with context 1): the first window is <s> plus
  the first max_length-1 tokens and predicts the first max_length; each later window predicts the next
  max_length tokens conditioned only on the token before them, except the last, which is filled to a full
  max_length of context on the left and scores only its new tokens. Every token is predicted exactly once.
- generate_until (context, {"until": [...], "max_gen_toks": n}): greedy text from <s> context (images
  and specials are never emitted: the modality grammar's text mode, image output off), stopped at </s>
  or after max_gen_toks tokens, then cut at the first stop string. Sampling settings are ignored.

Batching: rows are sorted by length and scored `batch_size` at a time (rounded up to a multiple of
data x fsdp, short batches padded with empty rows), each batch padded to a bucket length: powers of two
from 32 up to max_length. So a run compiles at most one scoring program per bucket, and one decoding
program per (prompt bucket, max_gen_toks); `compiled_programs` counts them. Rows are sharded over
('data','fsdp') as the eval step shards its batches; logits stay on the devices, only sums come back.

Offline: task data must be local files (YAML configs with `dataset_path: json` and
`dataset_kwargs: {data_files: ...}`); HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set before the harness
loads anything, and a task that names a Hub dataset or a missing file is refused with the fix.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Sequence

import numpy as np

try:
    from lm_eval.api.model import LM
except ImportError as e:  # an optional extra: the rest of chameleon_jax runs without it
    raise ImportError("lm-evaluation-harness is not installed: pip install -e '.[eval]' (lm-eval 0.4.x)") from e

from chameleon_jax.generate.answer import Loaded, load

log = logging.getLogger(__name__)

MIN_BUCKET = 32
# Builders of the `datasets` library that read local files named by dataset_kwargs.data_files.
LOCAL_BUILDERS = ("json", "csv", "text", "parquet", "arrow")


def length_buckets(max_length: int) -> list[int]:
    """Row lengths a batch is padded to: powers of two from MIN_BUCKET, capped by (and ending at) max_length."""
    out, n = [], MIN_BUCKET
    while n < max_length:
        out.append(n)
        n *= 2
    return out + [max_length]


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= n)


class ChameleonLM(LM):
    """The harness's model API over a checkpoint loaded by `generate.answer.load` (params on its mesh)."""

    def __init__(self, loaded: Loaded, *, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, compiler_options: dict | None = None, progress: bool = True):
        super().__init__()
        self.loaded = loaded
        self.vocab = loaded.vocab
        self.max_length = int(max_length or loaded.config.train.seq_len)
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}: need at least 2 tokens of context window")
        self.max_gen_toks = max_gen_toks
        self.rows = -(-max(1, batch_size) // loaded.row_multiple) * loaded.row_multiple
        self.buckets = length_buckets(self.max_length)
        self.compiler_options = compiler_options
        self.progress = progress
        self.requests_scored = 0      # rows through the scoring program (rolling windows count one each)
        self.seconds = 0.0            # wall time inside scoring and decoding calls, compilation included
        self._score = self._build_score()
        self._generators: dict[int, object] = {}
        self._warned_sampling = False

    # ------------------------------------------------------------------ tokens
    def _encode(self, text: str) -> list[int]:
        return self.loaded.tokenizer.encode(text).tolist() if text else []

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(<s> + context ids, continuation ids): the whole string tokenized, split after the context's tokens."""
        spaces = len(context) - len(context.rstrip())
        if spaces:  # the harness's convention: word-boundary spaces belong to the continuation
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self._encode(context)
        whole = self._encode(context + continuation)
        return [self.vocab.bos] + ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ scoring
    def _build_score(self):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P

        from chameleon_jax import model as model_lib
        from chameleon_jax.model import sharding as shd

        graphdef = self.loaded.graphdef

        def score(params, tokens, targets, segment_ids, positions, scored):
            logits = model_lib.bind(graphdef, params).logits(tokens, segment_ids, positions)  # [B, L, V] f32
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
            greedy = jnp.argmax(logits, axis=-1) == targets
            scored = scored.astype(bool)
            return jnp.sum(jnp.where(scored, logp, 0.0), axis=1), jnp.all(greedy | ~scored, axis=1)

        mesh = self.loaded.mesh
        rows = NamedSharding(mesh, shd.BATCH_SPEC)
        params_sh = jax.tree.map(lambda x: x.sharding, self.loaded.params)
        self._row_sharding = rows
        return jax.jit(score, in_shardings=(params_sh,) + (rows,) * 5,
                       out_shardings=NamedSharding(mesh, P()), compiler_options=self.compiler_options)

    def _to_devices(self, arrays: list[np.ndarray]) -> list:
        import jax

        if jax.process_count() == 1:
            return jax.device_put(arrays, self._row_sharding)
        # Every process holds every request: each takes its rows' shards from the same global array.
        return [jax.make_array_from_callback(a.shape, self._row_sharding, lambda idx, a=a: a[idx]) for a in arrays]

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "loglikelihood"
                     ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per (context ids, continuation ids); context non-empty."""
        import jax
        from tqdm import tqdm

        from chameleon_jax.model import sharding as shd

        out: list = [(0.0, True)] * len(pairs)  # an empty continuation: probability 1, trivially greedy
        rows, where = [], []
        for k, (ctx, cont) in enumerate(pairs):
            if not ctx:
                raise ValueError("a scored pair needs at least one context token (<s>)")
            if not cont:
                continue
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length}; "
                                 "raise --max_length (the model's context window)")
            # Inputs predict the next token; the context is cut on the left to fit max_length inputs.
            whole = (ctx + cont)[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], len(cont)))
            where.append(k)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        start = time.perf_counter()
        with jax.set_mesh(self.loaded.mesh), shd.activation_rules(self.loaded.rules):
            for first in tqdm(range(0, len(order), self.rows), desc=desc, unit="batch", disable=not self.progress):
                chunk = order[first:first + self.rows]
                length = _bucket(len(rows[chunk[0]][0]), self.buckets)
                tokens = np.full((self.rows, length), self.vocab.pad, np.int32)
                targets = np.zeros_like(tokens)
                segment_ids, positions, scored = np.zeros_like(tokens), np.zeros_like(tokens), np.zeros_like(tokens)
                for r, i in enumerate(chunk):
                    inp, tgt, n_cont = rows[i]
                    n = len(inp)
                    tokens[r, :n], targets[r, :n], segment_ids[r, :n] = inp, tgt, 1
                    positions[r, :n] = np.arange(n)
                    scored[r, n - n_cont:n] = 1
                logp, greedy = jax.device_get(self._score(self.loaded.params, *self._to_devices(
                    [tokens, targets, segment_ids, positions, scored])))
                for r, i in enumerate(chunk):
                    out[where[i]] = (float(logp[r]), bool(greedy[r]))
        self.seconds += time.perf_counter() - start
        self.requests_scored += len(rows)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.score_tokens([self._pair(*req.args) for req in requests])

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """The (context, predicted) windows of one document: the harness's rule (module docstring)."""
        from lm_eval import utils

        return [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
            token_list=self._encode(text), prefix_token=self.vocab.bos, max_seq_len=self.max_length,
            context_len=1)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, req in enumerate(requests):
            for w in self.rolling_windows(req.args[0]):
                windows.append(w)
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self.score_tokens(windows, desc="loglikelihood_rolling")):
            totals[k] += logp
        return totals

    # ------------------------------------------------------------------ generation
    def _generator(self, max_new_tokens: int):
        """One compiled greedy text decoder per budget (the Generator of generate/decoding.py)."""
        from chameleon_jax.generate.decoding import GenerationConfig, Generator

        if max_new_tokens not in self._generators:
            loaded = self.loaded
            self._generators[max_new_tokens] = Generator(
                loaded.graphdef, loaded.model_cfg, self.vocab,
                GenerationConfig(max_new_tokens=max_new_tokens, image_output=False), mesh=loaded.mesh,
                rules=loaded.rules, compiler_options=self.compiler_options)
        return self._generators[max_new_tokens]

    def _continuation_text(self, prompt: list[int], generated: np.ndarray) -> str:
        """The generated text as it continues the prompt's text (a leading word space kept)."""
        decode = self.loaded.tokenizer.decode
        head, full = decode(prompt), decode(list(prompt) + generated.tolist())
        return full[len(head):] if full.startswith(head) else decode(generated.tolist())

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        jobs = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks)))
            if (kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0) and not self._warned_sampling:
                log.warning("generate_until decodes greedily; the task's sampling settings are ignored")
                self._warned_sampling = True
            if budget >= self.max_length:
                raise ValueError(f"max_gen_toks={budget} leaves no room for context in max_length={self.max_length}; "
                                 "raise --max_length or lower the task's generation_kwargs.max_gen_toks")
            prompt = ([self.vocab.bos] + self._encode(context))[-(self.max_length - budget):]
            jobs.append((prompt, until, budget))
        out: list = [None] * len(jobs)
        start = time.perf_counter()
        # One batch holds one budget (one compiled decoder), longest prompts first.
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i][2], -len(jobs[i][0])))
        batches = []
        for i in order:
            if batches and len(batches[-1]) < self.rows and jobs[batches[-1][0]][2] == jobs[i][2]:
                batches[-1].append(i)
            else:
                batches.append([i])
        for chunk in tqdm(batches, desc="generate_until", unit="batch", disable=not self.progress):
            budget = jobs[chunk[0]][2]
            length = _bucket(len(jobs[chunk[0]][0]), self.buckets)
            tokens = np.full((self.rows, length), self.vocab.pad, np.int32)
            segment_ids = np.zeros_like(tokens)
            for r in range(self.rows):  # spare rows repeat the first prompt; their answers are dropped
                prompt = jobs[chunk[r] if r < len(chunk) else chunk[0]][0]
                tokens[r, length - len(prompt):], segment_ids[r, length - len(prompt):] = prompt, 1
            result = self._generator(budget)(self.loaded.params, tokens, segment_ids)
            for r, i in enumerate(chunk):
                prompt, until, _ = jobs[i]
                text = self._continuation_text(prompt, result.row(r))
                cut = min((text.find(s) for s in until if s and s in text), default=len(text))
                out[i] = text[:cut]
        self.seconds += time.perf_counter() - start
        return out

    # ------------------------------------------------------------------ accounting
    @property
    def compiled_programs(self) -> int:
        """Programs compiled so far: scoring shapes plus decoding shapes (jit's per-function cache of
        compiled executables, `_cache_size`, which JAX's own tests use to count recompilations)."""
        return self._score._cache_size() + sum(g._fn._cache_size() for g in self._generators.values())


def go_offline() -> None:
    """Nothing the harness loads may reach the network: the Hub clients' offline switches, set before (or,
    when already imported, inside) `datasets` and `huggingface_hub`."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def task_manager(include_path: str | Sequence[str]):
    """The harness's task index over the given folders of YAML configs only (the ~15k built-in tasks
    read their data from the Hub, and indexing them takes ~16 s)."""
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"--include_path {p} is not a folder; give the folder of your task YAML files")
    return TaskManager(include_path=[str(p) for p in paths], include_defaults=False)


def check_tasks(manager, tasks: Sequence[str]) -> None:
    """Refuses, before the model loads, a task name the index lacks or a task whose data is not local."""
    known = manager.all_tasks
    for name in tasks:
        if name not in known:
            raise ValueError(f"unknown task {name!r}: the task folders ({manager.include_path}) define "
                             f"{sorted(known) or 'no tasks'}; fix --tasks or add a YAML with `task: {name}` "
                             "under --include_path")
        entry = manager.task_index[name]
        cfg = entry.cfg or {}
        source = cfg.get("dataset_path")
        if source is None:
            continue
        if source not in LOCAL_BUILDERS and not os.path.isdir(source):
            raise ValueError(f"task {name!r} ({entry.yaml_path}) reads dataset_path={source!r} from the Hugging "
                             "Face Hub, and evaluation runs offline; give the data as local files: "
                             "`dataset_path: json` and `dataset_kwargs: {data_files: {test: /path/test.jsonl}}`")
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if source in LOCAL_BUILDERS and not files:
            raise ValueError(f"task {name!r} ({entry.yaml_path}) has dataset_path={source!r} but no "
                             "dataset_kwargs.data_files; name its local files there")
        for f in _file_list(files):
            if "://" not in f and not os.path.exists(f):
                raise FileNotFoundError(f"task {name!r} ({entry.yaml_path}): data file {f} does not exist "
                                        f"(relative paths are read from the working directory {os.getcwd()}); "
                                        "fix dataset_kwargs.data_files or write the file")


def _file_list(files) -> list[str]:
    if files is None:
        return []
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in _file_list(v)]
    return [str(f) for f in files]


def run_tasks(lm: ChameleonLM, tasks: Sequence[str], include_path, *, limit: float | None = None,
              num_fewshot: int | None = None, samples: bool = False, bootstrap_iters: int = 1000,
              seed: int = 0) -> dict:
    """The harness's evaluation of `tasks` on our adapter, offline: its output dict ("results", and
    "samples" if asked).

    This is `lm_eval.simple_evaluate` without its torch seeding and environment report (torch's
    collect_env, ~10 s of subprocesses): the same task loading, few-shot rule (a task that pins
    num_fewshot: 0 keeps it; otherwise `num_fewshot`, else the task's own, else 0) and seeds."""
    import random

    go_offline()
    from lm_eval import evaluator
    from lm_eval.defaults import DEFAULT_OTHER_SEED

    manager = task_manager(include_path)
    check_tasks(manager, tasks)
    random.seed(seed)
    np.random.seed(DEFAULT_OTHER_SEED)
    loaded_tasks = manager.load(list(tasks))
    for task in loaded_tasks["tasks"].values():
        pinned = task.get_config("num_fewshot")
        if num_fewshot is not None and pinned != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif pinned is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    return evaluator.evaluate(lm=lm, task_dict=loaded_tasks, limit=limit, bootstrap_iters=bootstrap_iters,
                              log_samples=samples)


def evaluate_tasks(path: str, tasks: Sequence[str], include_path, *, mesh=(-1, 1, 1), limit: float | None = None,
                   batch_size: int = 8, max_length: int | None = None, num_fewshot: int | None = None,
                   tokenizer: str | None = None, vqgan: str | None = None, output: str | None = None,
                   samples: bool = False, compiler_options: dict | None = None) -> dict:
    """What `python -m chameleon_jax.eval --harness lm-eval` runs: the checkpoint at `path` (workdir, step
    folder or export) restored onto a (data, fsdp, tensor) mesh (-1 fills the devices), scored on the
    named tasks; returns (and writes to `output`) {"results": {task: {metric: value}}, "checkpoint", "mesh",
    "adapter": {requests, compiled programs, seconds}} (+ "samples" per task when asked)."""
    import json

    import jax
    from etils import epath

    go_offline()
    check_tasks(task_manager(include_path), tasks)  # before the minutes a large checkpoint takes to restore
    mesh = tuple(int(x) for x in mesh)
    devices = None if -1 in mesh else jax.devices()[:math.prod(mesh)]
    lm = ChameleonLM(load(path, mesh=mesh, devices=devices, tokenizer=tokenizer, vqgan=vqgan),
                     batch_size=batch_size, max_length=max_length, compiler_options=compiler_options)
    start = time.perf_counter()
    raw = run_tasks(lm, tasks, include_path, limit=limit, num_fewshot=num_fewshot, samples=samples)
    summary = {
        "results": {t: {k: v for k, v in r.items() if k != "alias"} for t, r in raw["results"].items()},
        "n_samples": raw.get("n-samples", {}),
        "checkpoint": str(lm.loaded.step_dir),
        "mesh": dict(lm.loaded.mesh.shape),
        "adapter": {"rows_scored": lm.requests_scored, "compiled_programs": lm.compiled_programs,
                    "model_seconds": round(lm.seconds, 3), "wall_seconds": round(time.perf_counter() - start, 3),
                    "batch_size": lm.rows, "max_length": lm.max_length, "buckets": lm.buckets},
    }
    if samples:
        summary["samples"] = {t: [{"doc_id": s["doc_id"], "target": s["target"], "arguments": s["arguments"],
                                   "resps": s["resps"], "filtered_resps": s["filtered_resps"],
                                   **{m: s[m] for m in s if m in r}}
                                  for s in raw["samples"][t]] for t, r in raw["results"].items()
                              if t in raw.get("samples", {})}
    if output and jax.process_index() == 0:  # every process computed the same summary; one writes it
        epath.Path(output).write_text(json.dumps(summary, indent=2, default=str))
    return summary
