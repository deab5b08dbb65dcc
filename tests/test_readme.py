"""The README and docs/ name only things that exist.

What README.md is checked for (the rules a writer must follow):
- **Modules.** `python -m X` must be runnable: X is found by importlib (a package needs a `__main__`).
  A backticked `chameleon_jax.a.b[.attr]` must be a module, or a module followed by attributes it has;
  `from X import a, b` / `import X` lines in code blocks likewise.
- **Paths.** Any path under the repository's own folders (chameleon_jax/, experiments/, docs/, launch/,
  benchmarks/, tests/) must exist; an `experiments/x.py:variant` suffix is dropped. Paths elsewhere
  (runs/, data/, /tmp/, gs://) are outputs or the user's and are not checked.
- **The Layout tree.** Every entry of the tree under "## Layout" exists, and every top-level module and
  package of chameleon_jax appears in it.
- **Config fields.** `--config.a.b=v` on a command line must exist in the experiment config that the
  same command loads with `--config experiments/X.py[:variant]` (ml_collections refuses unknown fields);
  without one, in some config. A backticked dotted name whose first part is a top-level block of a
  config (`model.remat`, `train.microbatches`, `config.data.kind`; a `config.` prefix is dropped, a
  `=value` suffix too) must exist in base_config() or in some experiments/ config or variant.
  Consequence for writers: name a module whose last part collides with a config block (train, eval,
  checkpoint, data, ...) with its full `chameleon_jax.` prefix.
- **Flags.** Every `--flag` on a `python -m chameleon_jax...`, `launch/...` or `benchmarks/...` command
  line is defined somewhere in the code (a quoted "flag" or "--flag" in a .py of those folders).
- **Links.** Every relative link in README.md and docs/**/*.md resolves, anchors included (GitHub's
  heading slugs).
The pages under docs/ are held to the same rules for modules, paths, config fields and flags (the Layout
and length rules are the README's alone).

The checker is a set of pure functions over text, so `test_checker_catches_*` below prove each rule
can fail.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
OWN_DIRS = ("chameleon_jax", "experiments", "docs", "launch", "benchmarks", "tests")

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
PATH = re.compile(r"(?<![\w/.:~-])((?:%s)/[\w./-]*)" % "|".join(OWN_DIRS))
PY_M = re.compile(r"python3?\s+-m\s+([\w.]+)")
OVERRIDE = re.compile(r"--config\.([\w.]+)=")
CONFIG_FILE = re.compile(r"--config[= ](experiments/\w+\.py)(?::(\w+))?")
DOTTED = re.compile(r"^(?:config\.)?([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)(?:=.*)?$")
FROM_IMPORT = re.compile(r"^\s*from\s+(chameleon_jax(?:\.\w+)*)\s+import\s+([\w, ]+)", re.M)
IMPORT = re.compile(r"^\s*import\s+(chameleon_jax(?:\.\w+)*)", re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--([a-zA-Z][\w-]*)")
FILE_SUFFIXES = (".py", ".md", ".json", ".jsonl", ".png", ".txt", ".model", ".yaml", ".cfg", ".toml")


# ---------------------------------------------------------------------------------------------------------------
# text helpers

def code_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def prose(text: str) -> str:
    return FENCE.sub("", text)


def command_lines(text: str) -> list[str]:
    """Logical shell lines of the code blocks (backslash continuations joined, comments dropped)."""
    lines = []
    for block in code_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def inline_spans(text: str) -> list[str]:
    return [s.strip() for s in INLINE.findall(prose(text))]


# ---------------------------------------------------------------------------------------------------------------
# modules

@contextmanager
def _from_repository_root():
    """`python -m benchmarks.x` run from the repository root finds the root's packages: so do we."""
    added = str(ROOT) not in sys.path
    if added:
        sys.path.insert(0, str(ROOT))
    try:
        yield
    finally:
        if added:
            sys.path.remove(str(ROOT))


def module_exists(name: str) -> bool:
    try:
        with _from_repository_root():
            return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def runnable_module(name: str) -> bool:
    """What `python -m name` needs: a module, or a package with a __main__."""
    try:
        with _from_repository_root():
            spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:
        return module_exists(name + ".__main__")
    return True


def dotted_name_exists(name: str) -> bool:
    """`a.b.c` is a module, or its longest module prefix has the remaining attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        mod = ".".join(parts[:cut])
        if module_exists(mod):
            if cut == len(parts):
                return True
            obj = importlib.import_module(mod)
            for attr in parts[cut:]:
                if hasattr(obj, attr):
                    obj = getattr(obj, attr)
                elif module_exists(f"{getattr(obj, '__name__', '')}.{attr}"):
                    obj = importlib.import_module(f"{obj.__name__}.{attr}")
                else:
                    return False
            return True
    return False


def missing_modules(text: str) -> list[str]:
    bad = []
    for line in command_lines(text) + inline_spans(text):
        for mod in PY_M.findall(line):
            if not runnable_module(mod):
                bad.append(f"python -m {mod}")
    for span in inline_spans(text):
        for name in re.findall(r"\bchameleon_jax(?:\.\w+)+", span):
            if not dotted_name_exists(name):
                bad.append(name)
    for block in code_blocks(text):
        for mod, names in FROM_IMPORT.findall(block):
            for n in (part.split()[0] for part in names.split(",") if part.strip()):
                if not dotted_name_exists(f"{mod}.{n}"):
                    bad.append(f"from {mod} import {n}")
        for mod in IMPORT.findall(block):
            if not module_exists(mod):
                bad.append(f"import {mod}")
    return sorted(set(bad))


# ---------------------------------------------------------------------------------------------------------------
# paths

def _placeholder(path: str) -> bool:
    """experiments/X.py, gs://BUCKET/...: a name the reader fills in."""
    return any(re.fullmatch(r"[A-Z][A-Z_]*", part.split(".")[0]) for part in path.split("/"))


@lru_cache(maxsize=None)
def repository_file_names() -> frozenset:
    skip = {".git", ".venv", "__pycache__", "chameleon_jax.egg-info", "node_modules", "runs", "data"}
    names = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip]
        names.update(files)
    return frozenset(names)


def missing_paths(text: str, root: Path = ROOT) -> list[str]:
    bad = []
    for raw in PATH.findall(text):
        path = raw.split(":")[0].rstrip(".,;)")
        if "*" in path or "<" in path or _placeholder(path):
            continue
        if not (root / path).exists():
            bad.append(path)
    for span in inline_spans(text):  # a bare `name.py` / `name.md` must be somewhere in the repository
        if re.fullmatch(r"[\w.-]+\.(py|md)", span) and span not in repository_file_names():
            bad.append(span)
    return sorted(set(bad))


def layout_tree(text: str) -> list[str]:
    """Paths named by the tree in the '## Layout' section: `name/` opens a folder, indentation nests."""
    section = re.search(r"^## Layout\b.*?(?=^## |\Z)", text, re.S | re.M)
    if not section:
        return []
    blocks = code_blocks(section.group(0))
    if not blocks:
        return []
    paths, stack = [], []
    for line in blocks[0].splitlines():
        if not line.strip():
            continue
        indent = (len(line) - len(line.lstrip(" "))) // 2
        name = re.split(r"\s{2,}", line.strip())[0]
        stack = stack[:indent]
        paths.append("/".join(stack + [name.rstrip("/")]))
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
    return paths


def layout_problems(text: str, root: Path = ROOT) -> list[str]:
    tree = layout_tree(text)
    problems = [f"Layout names {p}, which does not exist" for p in tree if not (root / p).exists()]
    listed = set(tree)
    for child in sorted((root / "chameleon_jax").iterdir()):
        if child.name.startswith(("_", ".")) or child.name.endswith(".egg-info"):
            continue
        if (child.is_dir() and (child / "__init__.py").exists()) or child.suffix == ".py":
            if f"chameleon_jax/{child.name}" not in listed:
                problems.append(f"Layout leaves out chameleon_jax/{child.name}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# config fields

def _load_experiment(path: str, variant: str | None):
    spec = importlib.util.spec_from_file_location(f"_exp_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@lru_cache(maxsize=None)
def experiment_config(path: str, variant: str | None = None):
    return _load_experiment(path, variant)


@lru_cache(maxsize=None)
def all_configs() -> tuple:
    from chameleon_jax.config import base_config
    configs = [base_config()]
    for path in sorted((ROOT / "experiments").glob("*.py")):
        rel = str(path.relative_to(ROOT))
        variants = set(re.findall(r"""arg\s*==\s*["'](\w+)["']""", path.read_text()))
        for variant in [None, *sorted(variants)]:
            configs.append(experiment_config(rel, variant))
    return tuple(configs)


def has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        try:
            if part not in node:
                return False
            node = node[part]
        except TypeError:  # a leaf (number, string, tuple) has no fields
            return False
    return True


def top_level_blocks() -> set[str]:
    return {k for c in all_configs() for k in c.keys()}


def missing_config_fields(text: str) -> list[str]:
    bad = []
    for line in command_lines(text) + inline_spans(text):
        named = CONFIG_FILE.search(line)
        for field in OVERRIDE.findall(line):
            field = field.rstrip(".")
            if all(len(part) == 1 for part in field.split(".")):  # `--config.a.b=value`: the pattern itself
                continue
            if named and (ROOT / named.group(1)).exists():
                ok = has_field(experiment_config(named.group(1), named.group(2)), field)
                where = f" in {named.group(1)}" + (f":{named.group(2)}" if named.group(2) else "")
            else:
                ok = any(has_field(c, field) for c in all_configs())
                where = ""
            if not ok:
                bad.append(f"--config.{field}{where}")
    blocks = top_level_blocks()
    for span in inline_spans(text):
        if span.startswith("--"):
            continue
        m = DOTTED.match(span)
        if not m or m.group(1).endswith(FILE_SUFFIXES):
            continue
        field = m.group(1)
        if field.split(".")[0] in blocks and not any(has_field(c, field) for c in all_configs()):
            bad.append(field)
    return sorted(set(bad))


# ---------------------------------------------------------------------------------------------------------------
# flags

QUOTED = re.compile(r"""["']-{0,2}([a-zA-Z][\w-]*)["']""")
INTERNAL_IMPORT = re.compile(
    r"^\s*(?:from\s+((?:chameleon_jax|benchmarks)(?:\.\w+)*)\s+import|import\s+((?:chameleon_jax|benchmarks)(?:\.\w+)*))", re.M)


def _program_file(target: str) -> Path | None:
    """The file that runs for `python -m chameleon_jax.x` or `python launch/x.py`."""
    if target.endswith(".py"):
        return ROOT / target if (ROOT / target).exists() else None
    try:
        with _from_repository_root():
            spec = importlib.util.find_spec(target)
            if spec and spec.submodule_search_locations is not None:
                spec = importlib.util.find_spec(target + ".__main__")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin else None


@lru_cache(maxsize=None)
def program_flags(target: str) -> frozenset:
    """Quoted names in the program's file and in the chameleon_jax modules it imports: its flag
    definitions, wherever a program keeps them."""
    main = _program_file(target)
    if main is None:
        return frozenset()
    sources = [main.read_text()]
    for a, b in INTERNAL_IMPORT.findall(sources[0]):
        path = _program_file(a or b)
        if path is not None:
            sources.append(path.read_text())
    return frozenset(n for src in sources for n in QUOTED.findall(src))


def _flags_of(words: list[str]) -> list[str]:
    return [FLAG.match(w).group(1) for w in words if FLAG.match(w) and not w.startswith("--config")]


def _defined(name: str, known: frozenset) -> bool:
    return any(n in known for n in (name, name.replace("-", "_"), name.replace("_", "-")))


def undefined_flags(text: str) -> list[str]:
    """Each command's flags against the program that reads them. `launch/x.py ... -- rest`: the flags
    before `--` are the launcher's; the rest is a command of its own, or train flags (TPU VM, GKE)."""
    bad = []
    for line in command_lines(text):
        try:
            words = shlex.split(line)
        except ValueError:
            words = line.split()
        while words:
            cut = words.index("--") if "--" in words else len(words)
            head, words = words[:cut], words[cut + 1:]
            program = None
            for i, w in enumerate(head):
                if w == "-m" and i + 1 < len(head) and head[i + 1].startswith(("chameleon_jax", "benchmarks")):
                    program, args = head[i + 1], head[i + 2:]
                    break
                if re.fullmatch(r"(launch|benchmarks)/\w+\.py", w):
                    program, args = w, head[i + 1:]
                    break
            if program is None:
                break
            known = program_flags(program)
            bad += [f"{program} --{n}" for n in _flags_of(args) if not _defined(n, known)]
            if words and program.startswith("launch/") and not any(w == "-m" for w in words):
                known = program_flags("chameleon_jax.train")
                bad += [f"chameleon_jax.train --{n}" for n in _flags_of(words) if not _defined(n, known)]
                break
    return sorted(set(bad))


# ---------------------------------------------------------------------------------------------------------------
# links

def github_slug(heading: str) -> str:
    heading = re.sub(r"`", "", heading.strip().lower())
    heading = re.sub(r"[^\w\- ]", "", heading)
    return heading.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    slugs, seen = set(), {}
    for line in prose(path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(target)
    return bad


# ---------------------------------------------------------------------------------------------------------------
# the tests

def readme() -> str:
    return README.read_text()


def test_readme_names_only_modules_that_exist():
    assert missing_modules(readme()) == []


def test_readme_names_only_paths_that_exist():
    assert missing_paths(readme()) == []


def test_readme_layout_matches_the_package():
    assert layout_problems(readme()) == []


def test_readme_names_only_config_fields_that_exist():
    assert missing_config_fields(readme()) == []


def test_readme_commands_use_only_defined_flags():
    assert undefined_flags(readme()) == []


DOCS = sorted((ROOT / "docs").rglob("*.md"))


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_only_things_that_exist(doc):
    """The same rules for the pages under docs/ (their commands are copied as often as the README's)."""
    text = doc.read_text()
    assert {"modules": missing_modules(text), "paths": missing_paths(text),
            "config fields": missing_config_fields(text), "flags": undefined_flags(text)} == {
        "modules": [], "paths": [], "config fields": [], "flags": []}


def test_readme_stays_a_front_door():
    """The README is for a first-time user; dated results and history live in docs/."""
    assert len(readme().splitlines()) <= 360


# The checker itself: each rule reports what a stale README would name.

STALE = """
## Layout

```
chameleon_jax/
  model/        the transformer
  nothing.py    a module that is not there
```

Run `python -m chameleon_jax.no_such_program` after reading `chameleon-spec.md` and
`experiments/vqgan_shapes.py`; `chameleon_jax.vqgan.no_such_function` is gone, and so are
`model.no_such_field` and `train.no_such_field`. See [the notes](docs/no_such_page.md) and
[a heading](README.md#no-such-heading).

```bash
python -m chameleon_jax.train --config experiments/tiny.py --workdir runs/x --config.smoke.seed=1 --no_such_flag
```
"""


def test_checker_catches_missing_modules():
    assert missing_modules(STALE) == ["chameleon_jax.no_such_program", "chameleon_jax.vqgan.no_such_function",
                                      "python -m chameleon_jax.no_such_program"]


def test_checker_catches_missing_paths_and_layout_entries():
    assert missing_paths(STALE) == ["chameleon-spec.md", "docs/no_such_page.md", "experiments/vqgan_shapes.py"]
    problems = layout_problems(STALE)
    assert "Layout names chameleon_jax/nothing.py, which does not exist" in problems
    assert "Layout leaves out chameleon_jax/vqgan" in problems
    assert "Layout names chameleon_jax/model, which does not exist" not in problems


def test_checker_catches_missing_config_fields():
    # smoke.seed exists in experiments/smoke.py but not in the tiny config this command loads
    assert missing_config_fields(STALE) == ["--config.smoke.seed in experiments/tiny.py",
                                            "model.no_such_field", "train.no_such_field"]


def test_checker_catches_undefined_flags():
    assert undefined_flags(STALE) == ["chameleon_jax.train --no_such_flag"]
    launcher = "```\npython launch/local.py --processes 2 --no_such_option -- python -m chameleon_jax.eval --workdir x --nope\n```"
    assert undefined_flags(launcher) == ["chameleon_jax.eval --nope", "launch/local.py --no_such_option"]
    pod = "```\npython launch/gke.py --name x --image y -- --config experiments/tiny.py --workdir w --bad_train_flag\n```"
    assert undefined_flags(pod) == ["chameleon_jax.train --bad_train_flag"]


def test_checker_catches_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(STALE + "\n## A real heading\n[ok](#a-real-heading) [ok too](page.md)\n")
    assert broken_links(page) == ["docs/no_such_page.md", "README.md#no-such-heading"]
