"""lm-evaluation-harness on a stored checkpoint (`python -m chameleon_jax.eval --harness lm-eval`): a local
multiple-choice task and a local generation task scored through the program's library call, checked
against a direct computation that never touches the adapter: full-forward logits of the model, log-softmax
summed over each continuation's tokens, the argmax choice (acc, acc_norm), and greedy decoding by repeated
full forwards without a cache (exact_match). Also: a long document's rolling loglikelihood against the
windows summed directly (rows split over a 2-device data axis), a 2-device tensor-parallel mesh against
one device, and task errors that name their fix.

The checkpoint is the tiny export of tests/test_generate_program.py (a 2-layer 34B-shaped model, a
sentencepiece tokenizer of ~320 pieces, max_length = its train.seq_len = 64).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from numerics import chain_tol, cross_entropy_tol, gamma, transformer_lengths
from test_generate_program import FAST_COMPILE, WORDS, make_export

from chameleon_jax import model as model_lib
from chameleon_jax.generate import harness
from chameleon_jax.generate.answer import load

MAX_LENGTH = 64          # the export's train.seq_len: the adapter's default window
REF_ROWS = 24            # the reference forward's fixed shape (one compiled program): rows of
REF_WIDTH = MAX_LENGTH + 1  # up to 64 inputs plus the last target (whose own logits go unused)
GEN_TOKENS = 6
QUESTIONS = [" ".join(WORDS[i:i + 4 + i % 3]) for i in range(0, 36, 6)]               # 6 contexts
CHOICES = [[" ".join(WORDS[(i + 7 * j) % len(WORDS):][:1 + (i + j) % 3]) for j in range(3 + i % 2)]
           for i in range(6)]                                                     # 3-4 choices each
DOCUMENT = " ".join(WORDS * 3)                                                    # 4 windows of 64


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("harness"))


@pytest.fixture(scope="module")
def model(export):
    """The checkpoint on one device, and a full forward: right-padded rows of 65, no cache, no segment
    masking (causal attention keeps the padding after a row's tokens out of their logits)."""
    loaded = load(str(export), mesh=(1, 1, 1), devices=jax.devices()[:1])
    net = model_lib.bind(loaded.graphdef, loaded.params)
    forward = jax.jit(lambda tokens: net.logits(tokens, jnp.ones_like(tokens),
                                                jnp.broadcast_to(jnp.arange(REF_WIDTH), tokens.shape)),
                      compiler_options=FAST_COMPILE)

    def logits(rows):
        out = []
        for first in range(0, len(rows), REF_ROWS):
            tokens = np.full((REF_ROWS, REF_WIDTH), loaded.vocab.pad, np.int32)
            for r, row in enumerate(rows[first:first + REF_ROWS]):
                tokens[r, :len(row)] = row
            out.extend(np.asarray(forward(tokens))[:len(rows[first:first + REF_ROWS])])
        return out

    return loaded, logits


def _loglikelihood(logits, row, n_cont):
    """Sum of log-softmax at the continuation's n_cont tokens, the last of `row` (float64 on the host)."""
    lg = np.asarray(logits, np.float64)
    logp = lg - (np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lg.max(-1, keepdims=True))
    n = len(row)
    return float(sum(logp[t - 1, row[t]] for t in range(n - n_cont, n)))


def _ll_tol(loaded, logits_rows, n_tokens):
    """Two fp32 evaluations of a loglikelihood summed over n_tokens continuation tokens.

    Each logit is reached through the model's contractions (tests/numerics.py: Higham's gamma(n) along
    the longest path, at a 64-token context), so two evaluations in different orders (another padding,
    another mesh, the tensor split summing heads and ffn halves separately) differ by at most
    chain_tol(max|logit|). log p(t) = z_t - logsumexp(z) moves by at most twice that (logsumexp is
    1-Lipschitz in the max norm), plus the rounding of logsumexp itself (cross_entropy_tol); the sum over
    n tokens adds gamma(n) of its magnitude. An off-by-one in the continuation slice moves it by ~0.1."""
    lg = np.concatenate([np.asarray(r, np.float64).reshape(-1, np.shape(r)[-1]) for r in logits_rows])
    per_token = (2 * chain_tol(np.abs(lg).max(), transformer_lengths(loaded.model_cfg, MAX_LENGTH))
                 + cross_entropy_tol(lg, 1, sides=2))
    return n_tokens * per_token + gamma(n_tokens) * n_tokens * (np.abs(lg).max() + np.log(lg.shape[-1]))


def _pair_ids(tok, vocab, context, continuation):
    """<s> + the whole string's ids, and the continuation's token count (split after the context's ids)."""
    ctx = tok.encode(context).tolist()
    whole = tok.encode(context + continuation).tolist()
    return [vocab.bos] + whole, len(whole) - len(ctx)


def _greedy(loaded, logits_fn, prompt):
    """Greedy text tokens by repeated full forwards: argmax over the ids a text answer may hold."""
    vocab = loaded.vocab
    ids = np.arange(loaded.model_cfg.vocab_size)
    allowed = ((ids >= vocab.text_start) & (ids < vocab.size)) | (ids == vocab.eos)
    row = list(prompt)
    for _ in range(GEN_TOKENS):
        z = logits_fn([row])[0][len(row) - 1]
        nxt = int(np.argmax(np.where(allowed, z, -np.inf)))
        row.append(nxt)
        if nxt == vocab.eos:
            break
    decode = loaded.tokenizer.decode
    return decode(row)[len(decode(prompt)):]


@pytest.fixture(scope="module")
def reference(model):
    """Direct scores of every request, and task files whose gold answers make the expected metrics known:
    4 of 6 questions' gold is the direct argmax (acc = 4/6), 3 of 4 generations' gold is the direct greedy
    text (exact_match = 3/4)."""
    loaded, logits_fn = model
    tok, vocab = loaded.tokenizer, loaded.vocab
    mc = []
    for q, choices in zip(QUESTIONS, CHOICES):
        rows = [_pair_ids(tok, vocab, q, " " + c) for c in choices]
        lg = logits_fn([r for r, _ in rows])
        mc.append({"lls": [_loglikelihood(z, r, n) for z, (r, n) in zip(lg, rows)], "n": [n for _, n in rows],
                   "logits": [z[:len(r)] for z, (r, _) in zip(lg, rows)]})
    gen_prompts = QUESTIONS[:4]
    texts = [_greedy(loaded, logits_fn, [vocab.bos] + tok.encode(q).tolist()) for q in gen_prompts]
    # A stop string that really cuts: a character the first answer holds after its start.
    stop = next(ch for ch in texts[0][1:] if ch.strip())
    cut = [t[:t.find(stop)] if stop in t else t for t in texts]
    return {"mc": mc, "gen_prompts": gen_prompts, "gen_full": texts, "gen": cut, "stop": stop}


def _write_tasks(root, reference):
    root.mkdir(exist_ok=True)
    docs = []
    for i, (q, choices, m) in enumerate(zip(QUESTIONS, CHOICES, reference["mc"])):
        best = int(np.argmax(m["lls"]))
        docs.append({"question": q, "choices": choices, "label": best if i < 4 else (best + 1) % len(choices)})
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
""")
    answers = reference["gen"][:3] + ["not what it says"]
    (root / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                            for q, a in zip(reference["gen_prompts"], answers)))
    (root / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [{json.dumps(reference["stop"])}]
  max_gen_toks: {GEN_TOKENS}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
""")
    return docs


@pytest.fixture(scope="module")
def scored(export, reference, tmp_path_factory):
    tasks = tmp_path_factory.mktemp("tasks")
    docs = _write_tasks(tasks, reference)
    summary = harness.evaluate_tasks(str(export), ["tiny_mc", "tiny_gen"], str(tasks), mesh=(1, 1, 1), batch_size=8,
                                     samples=True, output=str(tasks / "results.json"),
                                     compiler_options=FAST_COMPILE)
    return summary, docs, tasks


def test_multiple_choice_scores_match_the_direct_computation(model, reference, scored):
    loaded, _ = model
    summary, docs, _ = scored
    samples = sorted(summary["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == 6
    acc, acc_norm = [], []
    for s, doc, m in zip(samples, docs, reference["mc"]):
        got = [r[0][0] for r in s["resps"]]
        for g, want, n, lg in zip(got, m["lls"], m["n"], m["logits"]):
            assert abs(g - want) <= _ll_tol(loaded, [lg], n), (got, m["lls"])
        acc.append(float(np.argmax(m["lls"]) == doc["label"]))
        lens = np.array([len(c) for c in doc["choices"]], float)  # the harness's acc_norm: per character
        acc_norm.append(float(np.argmax(np.array(m["lls"]) / lens) == doc["label"]))
    results = summary["results"]["tiny_mc"]
    assert np.mean(acc) == pytest.approx(4 / 6)
    assert results["acc,none"] == pytest.approx(np.mean(acc))
    assert results["acc_norm,none"] == pytest.approx(np.mean(acc_norm))


def test_generation_matches_greedy_full_forward_decoding(reference, scored):
    summary, _, tasks = scored
    samples = sorted(summary["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == reference["gen"]
    assert any(len(c) < len(f) for c, f in zip(reference["gen"], reference["gen_full"]))  # a stop string cut
    assert summary["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(3 / 4)
    written = json.loads((tasks / "results.json").read_text())
    assert written["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(3 / 4)
    # 18 scored rows at 8 per batch in one length bucket, one decoder: two compiled programs.
    assert summary["adapter"]["compiled_programs"] == 2, summary["adapter"]


@pytest.fixture(scope="module")
def two_device_lm(export):
    """The adapter on a (1, 1, 2) mesh: every kernel split over the tensor axis."""
    loaded = load(str(export), mesh=(1, 1, 2), devices=jax.devices()[:2])
    assert len(loaded.params["output"].sharding.device_set) == 2
    return harness.ChameleonLM(loaded, batch_size=8, compiler_options=FAST_COMPILE, progress=False)


@pytest.fixture(scope="module")
def data_parallel_lm(export):
    """The adapter on a (2, 1, 1) mesh with 2 rows per batch: each device scores one row."""
    loaded = load(str(export), mesh=(2, 1, 1), devices=jax.devices()[:2])
    return harness.ChameleonLM(loaded, batch_size=2, compiler_options=FAST_COMPILE, progress=False)


def test_rolling_loglikelihood_sums_the_windows(model, data_parallel_lm):
    """A 4-window document: the harness's rule (harness.py docstring) applied by hand to direct logits;
    the windows are scored two at a time, split over the data axis."""
    loaded, logits_fn = model
    tokens = loaded.tokenizer.encode(DOCUMENT).tolist()
    assert len(tokens) > 2 * MAX_LENGTH
    rows, counts = [[loaded.vocab.bos] + tokens[:MAX_LENGTH]], [MAX_LENGTH]   # <s> + 63 inputs -> 64 predicted
    done = MAX_LENGTH
    while done < len(tokens):
        end = min(done + MAX_LENGTH, len(tokens))
        rows.append(tokens[max(0, end - MAX_LENGTH - 1):end])  # a full window of context ending at `end`
        counts.append(end - done)
        done = end
    lg = logits_fn(rows)
    want = sum(_loglikelihood(z, r, n) for z, r, n in zip(lg, rows, counts))
    got, = data_parallel_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (DOCUMENT,), 0)])
    assert abs(got - want) <= _ll_tol(loaded, [z[:len(r)] for z, r in zip(lg, rows)], len(tokens)), (got, want)
    assert len(data_parallel_lm.rolling_windows(DOCUMENT)) == len(rows) >= 3


def test_two_devices_give_the_loglikelihoods_of_one(model, reference, scored, two_device_lm):
    loaded, _ = model
    summary, _, _ = scored
    instances, one_device, bounds = [], [], []
    for s, m in zip(sorted(summary["samples"]["tiny_mc"], key=lambda s: s["doc_id"]), reference["mc"]):
        for (context, continuation), r, n, lg in zip(s["arguments"], s["resps"], m["n"], m["logits"]):
            instances.append(Instance("loglikelihood", {}, (context, continuation), len(instances)))
            one_device.append(r[0][0])
            bounds.append(_ll_tol(loaded, [lg], n))
    two = [ll for ll, _ in two_device_lm.loglikelihood(instances)]
    diff = np.abs(np.array(two) - np.array(one_device))
    assert (diff <= np.array(bounds)).all(), (diff.max(), min(bounds))
    # A continuation with no tokens has probability 1 (nothing is scored for it).
    assert two_device_lm.loglikelihood([Instance("loglikelihood", {}, ("the red", ""), 0)]) == [(0.0, True)]


def test_an_unknown_task_names_the_tasks_at_hand(scored, export):
    _, _, tasks = scored
    with pytest.raises(ValueError, match=r"unknown task 'tiny_mcq'.*tiny_gen.*tiny_mc.*--include_path"):
        harness.evaluate_tasks(str(export), ["tiny_mcq"], str(tasks))


def test_missing_data_and_hub_datasets_are_refused_before_loading(tmp_path, export):
    (tmp_path / "lost.yaml").write_text("task: lost\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                        f"    test: {tmp_path / 'nowhere.jsonl'}\noutput_type: generate_until\n"
                                        "test_split: test\ndoc_to_text: q\ndoc_to_target: a\n")
    (tmp_path / "hub.yaml").write_text("task: hub\ndataset_path: allenai/ai2_arc\noutput_type: multiple_choice\n"
                                       "test_split: test\ndoc_to_text: q\ndoc_to_target: 0\ndoc_to_choice: [a]\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere.jsonl does not exist.*data_files"):
        harness.evaluate_tasks(str(export), ["lost"], str(tmp_path))
    with pytest.raises(ValueError, match=r"Hugging Face Hub.*dataset_path: json"):
        harness.evaluate_tasks(str(export), ["hub"], str(tmp_path))
