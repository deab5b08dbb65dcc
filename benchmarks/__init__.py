"""Speed benchmarks that print tables; run each from the repository root, e.g.
`.venv/bin/python benchmarks/bench_train_step.py` or `.venv/bin/python -m benchmarks.profile_train_step`."""
