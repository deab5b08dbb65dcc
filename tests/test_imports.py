"""The import graph of chameleon_jax: layers flow one way, and only programs parse flags.

grimp reads every import statement (function-level ones included) without importing anything.
"""
import re
import subprocess
import sys

import grimp
import pytest

PACKAGE = "chameleon_jax"

# Top-level modules that are programs (`python -m chameleon_jax.X`) and define their flags under
# `if __name__ == "__main__"`. Every other program is a `__main__` module of a package.
PROGRAM_MODULES = {"chameleon_jax.eval"}

# Imports that define or parse command-line flags.
FLAG_IMPORTS = {
    "argparse": re.compile(r"\bargparse\b"),
    "absl": re.compile(r"from absl import .*\b(app|flags)\b|import absl\.(app|flags)\b"),
    "ml_collections": re.compile(r"\bconfig_flags\b"),
}

# Grain's worker processes read an absl flag and fail while flags are unparsed; the pipeline marks
# them parsed when it starts workers. It defines and reads no flag.
ALLOWED = {("chameleon_jax.data.pipeline", "from absl import flags")}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(PACKAGE, include_external_packages=True)


def _internal(graph):
    return sorted(m for m in graph.modules if m == PACKAGE or m.startswith(PACKAGE + "."))


def test_no_import_cycles(graph):
    cycles = set()
    for module in _internal(graph):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith(PACKAGE) and graph.chain_exists(imported, module):
                chain = graph.find_shortest_chain(importer=imported, imported=module)
                cycles.add(" -> ".join((module, *chain)))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


def _sibling_imports(graph, package: str) -> dict[tuple[str, str], str]:
    """(child A, child B) -> one import of A's code from B's, over the direct children of `package`.

    A child is a subpackage (with everything below it) or a module; the package's own __init__ is left out.
    """
    depth = package.count(".") + 1
    edges = {}
    for module in sorted(graph.find_descendants(package)):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if not imported.startswith(package + "."):
                continue
            a, b = module.split(".")[depth], imported.split(".")[depth]
            if a != b:
                edges.setdefault((a, b), f"{module} imports {imported}")
    return edges


def _strongly_connected(nodes, edges) -> list[list[str]]:
    """Groups of two or more nodes that reach each other (Tarjan's algorithm)."""
    successors = {n: sorted(b for a, b in edges if a == n) for n in nodes}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in successors[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return groups


def test_no_import_loops_between_packages(graph):
    # Module-level acyclicity is not enough: config.py importing train/profiling.py while train/runner.py
    # imports config.py is no module cycle, yet `config` and `train` then sit above each other. Within every
    # package, its subpackages and modules must form layers: no loop of imports among siblings.
    loops = []
    for package in _internal(graph):
        if not graph.find_children(package):
            continue
        edges = _sibling_imports(graph, package)
        nodes = {n for edge in edges for n in edge}
        for group in _strongly_connected(nodes, edges):
            witnesses = [f"    {edges[a, b]}" for a in group for b in group if (a, b) in edges]
            loops.append(f"{package}: {', '.join(group)} import each other in a loop\n" + "\n".join(witnesses))
    assert not loops, "packages that import each other (move the shared code down a layer):\n" + "\n".join(loops)


def _is_program(module: str) -> bool:
    return module.rsplit(".", 1)[-1] == "__main__" or module in PROGRAM_MODULES


def test_library_modules_do_not_parse_flags(graph):
    offenders = []
    for module in _internal(graph):
        if _is_program(module):
            continue
        for external, pattern in FLAG_IMPORTS.items():
            if external not in graph.modules or not graph.direct_import_exists(importer=module, imported=external):
                continue
            for detail in graph.get_import_details(importer=module, imported=external):
                line = detail["line_contents"].strip()
                if pattern.search(line) and (module, line) not in ALLOWED:
                    offenders.append(f"{module}:{detail['line_number']}: {line}")
    assert not offenders, ("library modules import flag parsing; move the program into a `__main__.py` "
                           "(flags, then one library call):\n" + "\n".join(offenders))


def test_program_modules_exist(graph):
    # A renamed program must not leave a stale entry that would exempt a future library module.
    assert PROGRAM_MODULES <= set(graph.modules)


def test_data_depends_only_on_the_vocabulary_and_storage(graph):
    # The data layer (sources, packing, the batch format) sits below the model and the trainer.
    allowed = {"chameleon_jax.vocab", "chameleon_jax.storage"}
    data = graph.find_descendants("chameleon_jax.data") | {"chameleon_jax.data"}
    outside = sorted(f"{m} -> {i}" for m in data for i in graph.find_modules_directly_imported_by(m)
                     if i.startswith(PACKAGE + ".") and i not in data and i not in allowed)
    assert not outside, "the data layer imports upward:\n" + "\n".join(outside)


def test_a_training_process_does_not_import_torch(tmp_path):
    # torch is installed here (the parity tests' peers); tensorboardX would import it in every training
    # process, seconds of start-up for nothing (train/metrics.py).
    code = ("import sys; from chameleon_jax.train import runner, metrics; w = metrics.MetricsWriter(sys.argv[1]); "
            "w.write(1, {'loss': 2.0}); w.close(); import importlib.util as u; "
            "print(u.find_spec('torch') is not None, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # the writer still writes
