"""Hand-written mutants over the loss, packing, optimizer, sampling/guidance and checkpoint code: does
the fast test set notice each one? Not part of the default suite (pytest collects only test_*.py).

    python tests/mutation/run.py                 # every mutant against the current tree
    python tests/mutation/run.py --only clip     # mutants whose name contains "clip"
    python tests/mutation/run.py --rev 715cbb0   # against the code and tests of a past commit

Each mutant is applied to a fresh copy of the repository in a temporary directory (never the working
tree), and its tests run there with PYTHONPATH pointing at the copy. A mutant is killed when a test fails;
it survives when they all pass. A mutant whose original snippet is absent from the tree is reported
"n/a" (the code moved since that commit). The unmutated copy runs first: a failing baseline voids the
mutants that use those tests. Prints one line per mutant and the score; exits 1 if any mutant survives.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COPIED = ("chameleon_jax", "tests", "experiments", "launch", "benchmarks", "setup.cfg", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str        # file, relative to the repository root ("a|b": the first that exists, for old trees)
    original: str    # exact snippet, must occur once
    mutated: str
    tests: tuple     # pytest node ids / files, relative to the root
    equivalent: str = ""  # why no test can notice it (then it is expected to survive)


LOSS = ("tests/test_loss.py", "tests/test_model.py::test_z_loss_matches_hand_computation",
        "tests/test_model.py::test_fused_output_loss_matches_plain_value_and_gradient")
PACKING = ("tests/test_pipeline.py::test_packing_loses_nothing_duplicates_nothing_and_keeps_images_whole",
           "tests/test_pipeline.py::test_split_prefers_image_boundaries_and_skips_images_longer_than_seq_len",
           "tests/test_pretokenize.py::test_sft_conversations_train_on_answers_only_through_packing_and_the_train_step",
           "tests/test_pretokenize.py::test_every_input_kind_becomes_records_and_bad_items_are_skipped_with_reasons",
           "tests/test_records.py")
OPTIMIZER = ("tests/test_optimizer.py",)
SAMPLING = ("tests/test_generate.py::test_sampler_matches_distribution_and_filters",
            "tests/test_generate.py::test_modality_constraints_never_violated",
            "tests/test_generate.py::test_begin_image_forbidden_without_room")
GUIDANCE = ("tests/test_generate.py::test_guidance_at_unit_scales_equals_unguided",
            "tests/test_generate.py::test_guided_image_codes_follow_the_spec_formula_over_independent_streams[three]")
STEP = ("tests/test_grad_accum.py",)
DROPOUT = ("tests/test_production_path.py::test_dropout_keeps_one_minus_p_rescales_and_is_keyed",
           "tests/test_production_path.py::test_dropout_in_the_train_step_repeats_per_step_and_is_off_in_eval")
CHECKPOINT = ("tests/test_runner.py::test_eval_restores_params_only_on_one_device_and_exports",
              "tests/test_runner.py::test_a_non_finite_state_is_never_saved")

MUTANTS = [
    # ---- loss ----
    Mutant("loss: targets ignore the loss mask", "chameleon_jax/model/loss.py|chameleon_jax/train/loss.py",
           "weights = (seg == next_seg) & (next_seg != 0) & (next_mask != 0)",
           "weights = (seg == next_seg) & (next_seg != 0)", LOSS),
    Mutant("loss: targets cross segment boundaries", "chameleon_jax/model/loss.py|chameleon_jax/train/loss.py",
           "weights = (seg == next_seg) & (next_seg != 0) & (next_mask != 0)",
           "weights = (next_seg != 0) & (next_mask != 0)", LOSS),
    Mutant("loss: z-loss on lse, not lse^2", "chameleon_jax/model/loss.py|chameleon_jax/train/loss.py",
           "z = jnp.square(lse)", "z = jnp.abs(lse)", LOSS),
    Mutant("loss: mean over every position, not the targets", "chameleon_jax/model/loss.py|chameleon_jax/train/loss.py",
           "count = jnp.maximum(weights.sum(), 1.0)\n    z = jnp.square(lse)",
           "count = jnp.asarray(weights.size, jnp.float32)\n    z = jnp.square(lse)", LOSS),
    Mutant("loss: fused backward drops the z-loss term", "chameleon_jax/model/loss.py|chameleon_jax/train/loss.py",
           "scale = weights[:, s:e] * (1.0 + 2.0 * z_loss_weight * lse_c)", "scale = weights[:, s:e]", LOSS),
    Mutant("loss: image tokens counted as text", "chameleon_jax/model/loss.py|chameleon_jax/train/loss.py",
           "return (ids >= start) & (ids < stop)", "return (ids > start) & (ids < stop)", LOSS),
    # ---- packing and records ----
    Mutant("packing drops the records' loss masks", "chameleon_jax/data/packing.py",
           '"loss_mask": np.asarray(packed["loss_mask"], np.int32) * (segment_ids > 0),',
           '"loss_mask": (segment_ids > 0).astype(np.int32),', PACKING),
    Mutant("packing: padding may carry loss", "chameleon_jax/data/packing.py",
           '"loss_mask": np.asarray(packed["loss_mask"], np.int32) * (segment_ids > 0),',
           '"loss_mask": np.asarray(packed["loss_mask"], np.int32),', PACKING,
           equivalent="FirstFitPackIterDataset already pads loss_mask with padding_struct 0; the product only "
                      "guards against a future packer without that padding"),
    Mutant("packing: split at the first image boundary", "chameleon_jax/data/packing.py",
           "stop = at_images[-1] if at_images else window_end", "stop = at_images[0] if at_images else window_end",
           PACKING),
    Mutant("packing: positions do not restart per segment", "chameleon_jax/data/packing.py",
           '"positions": np.asarray(packed["tokens_positions"], np.int32),',
           '"positions": np.arange(len(segment_ids), dtype=np.int32),', PACKING),
    Mutant("sft: the closing </s> never trains", "chameleon_jax/data/records.py",
           'mask.append(np.array([bool(turns) and turns[-1].role == "assistant"], np.uint8))',
           'mask.append(np.array([False], np.uint8))', PACKING),
    Mutant("sft: loss on user turns", "chameleon_jax/data/records.py",
           'mask.append(np.full(len(ids), turn.role == "assistant", np.uint8))',
           'mask.append(np.full(len(ids), True, np.uint8))', PACKING),
    # ---- optimizer ----
    Mutant("optimizer: gradient clipping removed", "chameleon_jax/train/optimizer.py",
           "optax.clip_by_global_norm(float(opt_cfg.clip_norm)),", "optax.identity(),", OPTIMIZER),
    Mutant("optimizer: eps ignored", "chameleon_jax/train/optimizer.py",
           "eps=float(opt_cfg.eps),", "eps=1e-8,", OPTIMIZER),
    Mutant("optimizer: b1 and b2 swapped", "chameleon_jax/train/optimizer.py",
           "b1=float(opt_cfg.b1), b2=float(opt_cfg.b2)", "b1=float(opt_cfg.b2), b2=float(opt_cfg.b1)", OPTIMIZER),
    Mutant("optimizer: weight decay on norms too", "chameleon_jax/train/optimizer.py",
           'return not any("norm" in n for n in names)', "return True", OPTIMIZER),
    Mutant("optimizer: warm-up one step short", "chameleon_jax/train/optimizer.py",
           "warm = optax.linear_schedule(0.0, peak, max(warmup, 1))",
           "warm = optax.linear_schedule(0.0, peak, max(warmup - 1, 1))", OPTIMIZER),
    # ---- train step ----
    Mutant("step: microbatch gradients not token-weighted", "chameleon_jax/train/step.py",
           "acc_grads = jax.tree.map(lambda a, g: a + g * n, acc_grads, grads)",
           "acc_grads = jax.tree.map(lambda a, g: a + g, acc_grads, grads)", STEP),
    Mutant("dropout not rescaled by 1/(1-p)", "chameleon_jax/model/transformer.py",
           "return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)",
           "return jnp.where(keep, x, 0).astype(x.dtype)", DROPOUT),
    Mutant("dropout: the same mask every step", "chameleon_jax/train/step.py",
           'key = jax.random.fold_in(state["rng"], state["step"])', 'key = state["rng"]', DROPOUT),
    # ---- sampling ----
    Mutant("sampling: top-p keeps one token fewer", "chameleon_jax/sampling.py",
           "keep = (before < top_p[:, None]) & (rank < k[:, None])",
           "keep = (before + probs < top_p[:, None]) & (rank < k[:, None])", SAMPLING),
    Mutant("sampling: temperature ignored", "chameleon_jax/sampling.py",
           "x = logits / jnp.where(hot, temperature, 1.0)[:, None]", "x = logits", SAMPLING),
    Mutant("sampling: top-k keeps one more", "chameleon_jax/sampling.py",
           "k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)",
           "k = jnp.where(top_k > 0, jnp.minimum(top_k + 1, v), v)", SAMPLING),
    # ---- guidance ----
    Mutant("guidance: text and image scales swapped", "chameleon_jax/sampling.py",
           "return u + image_scale * (i - u) + text_scale * (f - i)",
           "return u + text_scale * (i - u) + image_scale * (f - i)", GUIDANCE),
    Mutant("guidance: the image-only stream left unfiltered", "chameleon_jax/generate/decoding.py|chameleon_jax/generate.py",
           "return real & (vocab.is_image(tokens) | (tokens == bos) | (tokens == boi) | (tokens == eoi))",
           "return real", GUIDANCE),
    Mutant("guidance: two-stream form pulls from the wrong side", "chameleon_jax/sampling.py",
           "return u + text_scale * (f - u)", "return f + text_scale * (f - u)", GUIDANCE),
    # ---- checkpoint ----
    Mutant("checkpoint: a workdir resolves to its oldest step", "chameleon_jax/checkpoint.py",
           "return steps[-1][1]", "return steps[0][1]", CHECKPOINT),
    Mutant("checkpoint: keep_every ignored", "chameleon_jax/checkpoint.py",
           "if keep_every:", "if False:", ("tests/test_runner.py::test_reference_run_learns_and_logs_everything",)),
]


def _materialise(rev: str | None, dest: Path) -> None:
    if rev is None:
        for name in COPIED:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.exists():
                shutil.copy2(src, dest / name)
    else:  # the tree of a past commit, read from git without touching the working tree
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, *[n for n in COPIED]],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def _pytest(root: Path, tests, timeout: int) -> tuple[int, str]:
    present = [t for t in tests if (root / t.split("::")[0]).exists()]
    if not present:
        return 5, "no such tests in this tree"
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", *present]
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    return out.returncode, (out.stdout + out.stderr)[-400:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", help="run against this commit's code and tests instead of the working tree")
    parser.add_argument("--only", default="", help="run the mutants whose name contains this text")
    parser.add_argument("--skip", default="", help="leave out the mutants whose name contains this text")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only in m.name and not (args.skip and args.skip in m.name)]
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        pristine = Path(tmp) / "pristine"
        pristine.mkdir()
        _materialise(args.rev, pristine)
        if args.rev:  # the tests as they were: every test in the files the current selection names
            mutants = [dataclasses.replace(m, tests=tuple(sorted({t.split("::")[0] for t in m.tests})))
                       for m in mutants]
        baseline = {}
        for tests in sorted({m.tests for m in mutants}):
            baseline[tests] = _pytest(pristine, tests, args.timeout)[0]
            print(f"baseline rc={baseline[tests]}: {' '.join(tests)}", flush=True)
        results = {"killed": 0, "survived": 0, "n/a": 0}
        survivors = []
        for m in mutants:
            start = time.time()
            path = next((p for p in m.path.split("|") if (pristine / p).exists()), m.path.split("|")[0])
            text = (pristine / path).read_text() if (pristine / path).exists() else ""
            if baseline[m.tests] == 5 and text.count(m.original) == 1:  # no test for it in this tree
                results["survived"] += 1
                survivors.append(m.name)
                print(f"survived  {m.name}  (no test file in this tree)", flush=True)
                continue
            if text.count(m.original) != 1 or baseline[m.tests] not in (0,):
                why = "snippet absent" if text.count(m.original) != 1 else f"baseline rc={baseline[m.tests]}"
                results["n/a"] += 1
                print(f"n/a       {m.name}  ({why})", flush=True)
                continue
            work = Path(tmp) / "mutant"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(pristine, work)
            (work / path).write_text(text.replace(m.original, m.mutated))
            rc, tail = _pytest(work, m.tests, args.timeout)
            verdict = "killed" if rc not in (0, 5) else "survived"
            results[verdict] += 1
            note = f"  [equivalent: {m.equivalent}]" if m.equivalent and verdict == "survived" else ""
            print(f"{verdict:9s} {m.name}  ({time.time() - start:.0f} s){note}", flush=True)
            if verdict == "survived" and not m.equivalent:
                survivors.append(m.name)
        scored = results["killed"] + results["survived"]
        equivalent = sum(1 for m in mutants if m.equivalent)
        print(f"\nmutation score: {results['killed']}/{scored} killed"
              f" ({results['killed'] / max(scored - equivalent, 1):.0%} of the non-equivalent ones);"
              f" {results['n/a']} n/a; unexplained survivors: {survivors or 'none'}")
        return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
