"""The package's shape: what a pip install exposes, and the library's import graph."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "lipformer"


def _imports(path: Path, package: str) -> set[str]:
    """Every lipformer.* module a file imports, at module level or inside functions (lazy imports too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            found.update(f"{stem}.{a.name}" for a in node.names)
    return {m for m in found if m == "lipformer" or m.startswith("lipformer.")}


def _library_graph() -> dict[str, set[str]]:
    modules = {}
    for path in LIBRARY.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else ".".join(rel.parts[:-1])
        modules[name] = (path, package)
    graph = {}
    for name, (path, package) in modules.items():
        targets = set()
        for m in _imports(path, package):
            while m and m not in modules:  # `from .nn import X` names X, a member, not a module
                m = m.rpartition(".")[0]
            if m and m != name:
                targets.add(m)
        graph[name] = targets
    return graph


def test_library_has_no_import_cycles():
    graph = _library_graph()
    # a package's __init__ re-exporting its own submodules is not a cycle through the library
    edges = {a: {b for b in bs if not (a != "lipformer" and b.startswith(a + "."))} for a, bs in graph.items()}
    edges["lipformer"] = set()  # the top-level __init__ only re-exports (HF classes, registration)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert "lipformer.nn" in graph and "lipformer.poet" in graph  # the walk did see the library


def test_only_the_cli_imports_the_recipes():
    importers = []
    for path in LIBRARY.rglob("*.py"):
        package = ".".join(path.relative_to(ROOT).parts[:-1])
        if any(m == "lipformer.training" or m.startswith("lipformer.training.") for m in _imports(path, package)):
            importers.append(path.relative_to(ROOT).as_posix())
    assert importers == ["lipformer/cli.py"], importers


def test_wheel_has_no_top_level_training(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("lipformer-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert "training" not in tops and "lipformer" in tops
    names = zipfile.ZipFile(wheel).namelist()
    assert "lipformer/training/train.py" in names and "lipformer/training/configs/tiny.toml" in names


def test_fresh_venv_install_ignores_a_users_training_package(tmp_path):
    """pip install into a new venv, then run the CLI from a project that has its own `training/`."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bindir = venv / "bin"
    # the dependencies (torch, transformers, ...) come from this environment through a path entry,
    # which makes none of its .pth files (e.g. an editable lipformer) visible in the new one
    site = subprocess.run([str(bindir / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (wheel,) = wheels.glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bindir / "python"), "install", "--quiet",
                    "--no-deps", str(wheel)], check=True, capture_output=True)
    project = tmp_path / "user_project"
    (project / "training").mkdir(parents=True)
    (project / "training" / "__init__.py").write_text("raise ImportError('the user project training package')\n")
    corpus = tmp_path / "corpus"
    from lipformer.training.data import build_char_corpus
    build_char_corpus("the quick brown fox jumps over the lazy dog. " * 200, corpus)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(project)  # the user's folder first on sys.path, as in their own scripts
    help_run = subprocess.run([str(bindir / "lipformer"), "--help"], cwd=project, env=env, capture_output=True,
                              text=True, timeout=300)
    assert help_run.returncode == 0, help_run.stderr
    train = subprocess.run([str(bindir / "lipformer"), "train", "--preset", "tiny", "--out", str(tmp_path / "run"),
                            "--max-steps", "2", "data.dataset=char_dir", f"data.path={corpus}"],
                           cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "done:" in train.stdout
    check = subprocess.run([str(bindir / "python"), "-c", "import lipformer, lipformer.training.train as t; "
                            "print(lipformer.__file__); print(t.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert str(venv) in check.stdout and str(ROOT) not in check.stdout, check.stdout


def test_make_bench_runs_scripts_that_exist():
    """`make bench` names only scripts that exist and whose options parse (`--help` exits 0)."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    scripts = [w for w in recipe.split() if w.startswith("scripts/") and w.endswith(".py")]
    assert len(scripts) >= 4, recipe
    for script in scripts:
        assert (ROOT / script).is_file(), script
        done = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (script, done.stderr[-500:])
