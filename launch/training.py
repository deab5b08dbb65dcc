"""What the pod launchers (tpu_vm.py, gke.py) share about the training run they start: its flags after `--`,
the bucket workdir those must name, the training process's own environment, and the exit status that a
restart cannot fix.

The launchers run as scripts (`python launch/gke.py ...`), with launch/ on sys.path, and are imported as
`launch.gke` by the tests; they import this module either way.
"""
from __future__ import annotations

import argparse

# chameleon_jax.train exits 3 when the loss stays non-finite: a restart from the last checkpoint repeats it.
NON_FINITE_EXIT = 3


def train_flags(remainder: list[str]) -> list[str]:
    """The train flags from argparse's REMAINDER (everything after the launcher's own `--`)."""
    return remainder[1:] if remainder[:1] == ["--"] else list(remainder)


def workdir_of(train_args: list[str]) -> str:
    """The value of --workdir (either `--workdir X` or `--workdir=X`), '' if absent."""
    for i, a in enumerate(train_args):
        if a.startswith("--workdir="):
            return a.split("=", 1)[1]
        if a == "--workdir" and i + 1 < len(train_args):
            return train_args[i + 1]
    return ""


def check_train_flags(parser: argparse.ArgumentParser, train_args: list[str]) -> str:
    """The workdir, after checking that the flags name a config and a bucket workdir (parser.error otherwise)."""
    workdir = workdir_of(train_args)
    if not workdir or not any(a.startswith("--config") for a in train_args):
        parser.error("pass the train flags after --, at least --config experiments/X.py --workdir gs://BUCKET/run")
    if not workdir.startswith("gs://"):
        parser.error(f"--workdir {workdir} is not a bucket: every host writes its part of each checkpoint and a "
                     f"restart may land on other machines; use --workdir gs://BUCKET/run")
    return workdir


def add_environment_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile-cache", default="", help="JAX compilation cache (default WORKDIR/jax_cache; "
                                                            "'none' to disable)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")


def environment(args, workdir: str) -> dict[str, str]:
    """Variables for the training process itself (from add_environment_flags), beside the TPU runtime's."""
    env = {"PYTHONUNBUFFERED": "1"}
    if args.compile_cache != "none":
        # A restarted run loads the compiled step instead of compiling it again (minutes at 7B).
        env["JAX_COMPILATION_CACHE_DIR"] = args.compile_cache or f"{workdir.rstrip('/')}/jax_cache"
    for kv in args.env:
        key, _, value = kv.partition("=")
        env[key] = value
    return env
