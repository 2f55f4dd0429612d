"""The source's shape: the whole run config is a parameter only at the composition root, and no two modules name one
concept twice (a plural, a prefix or a suffix apart)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ("trainer", "parallel")
# The composition root: the programs (their CLIs and process), the build and the preflight read the whole config
# and hand each part its own nodes.
COMPOSITION_ROOT = (
    "trainer/cli/",
    "trainer/__main__.py",
    "trainer/process.py",
    "trainer/build.py",
    "trainer/preflight/",
)
WHOLE_CONFIG = ("RunConfig", "DictConfig")


def modules() -> list[Path]:
    return sorted(path for package in LIBRARY for path in (ROOT / package).rglob("*.py"))


def whole_config_parameters(source: str) -> list[tuple[int, str, str]]:
    """(line, function, parameter) of each parameter annotated with the whole run config."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                annotation = ast.unparse(arg.annotation) if arg is not None and arg.annotation is not None else ""
                if arg is not None and any(name in annotation for name in WHOLE_CONFIG):
                    found.append((node.lineno, getattr(node, "name", "lambda"), arg.arg))
    return found


def test_the_walk_finds_a_whole_config_parameter():
    source = "def f(a: int, cfg: RunConfig) -> None: ...\nclass C:\n    def m(self, *, d: 'DictConfig'): ..."
    assert whole_config_parameters(source) == [(1, "f", "cfg"), (3, "m", "d")]
    assert whole_config_parameters("def f(distill: DistillConfig, dims: ParallelDims): ...") == []


def test_only_the_composition_root_takes_the_whole_run_config():
    offenders = []
    for path in modules():
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(COMPOSITION_ROOT):
            continue
        for line, function, parameter in whole_config_parameters(path.read_text()):
            offenders.append(f"{relative}:{line} {function}({parameter})")
    assert not offenders, "the whole run config outside the composition root:\n" + "\n".join(offenders)


def concept(path: Path) -> str:
    """A module's concept name: its file's (a package's: its folder's), singular."""
    name = path.parent.name if path.name in ("__init__.py", "__main__.py") else path.stem
    return name.removesuffix("s") if len(name) > 3 else name


def twins(paths: list[Path]) -> list[tuple[str, str]]:
    """Pairs of modules of one concept name (``export``/``exports``, ``cache``/``distill/cache``), and, in one
    package, pairs whose names differ by a word (``preflight``/``preflight_parallel``). A command of ``trainer/cli``
    shares the name of the package it runs (``cli/cache.py`` runs ``trainer/cache``)."""
    library = [p for p in paths if "cli" not in p.relative_to(ROOT).parts and p.name != "__main__.py"]
    found = []
    for i, a in enumerate(library):
        for b in library[i + 1 :]:
            same_package = a.parent == b.parent and "__init__.py" not in (a.name, b.name)
            x, y = concept(a), concept(b)
            worded = same_package and any(p.startswith(q + "_") or p.endswith("_" + q) for p, q in ((x, y), (y, x)))
            if x == y or worded:
                found.append((a.relative_to(ROOT).as_posix(), b.relative_to(ROOT).as_posix()))
    return found


def test_the_twin_check_finds_twins(tmp_path):
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        files = ["t/export.py", "t/exports.py", "t/cache.py", "t/d/cache.py", "t/pre.py", "t/pre_par.py", "t/ok.py"]
        for name in files:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).touch()
        found = twins(sorted(tmp_path / name for name in files))
        assert sorted(found) == [
            ("t/cache.py", "t/d/cache.py"),
            ("t/export.py", "t/exports.py"),
            ("t/pre.py", "t/pre_par.py"),
        ]
    finally:
        ROOT = saved


def test_no_two_modules_name_one_concept():
    assert not twins(modules())


@pytest.mark.parametrize("command", ["cache", "export", "data", "train"])
def test_each_command_runs_a_package_of_its_name(command):
    """``python -m trainer.X`` is the ``__main__`` of package ``trainer/X``, which calls ``trainer/cli/X.py``."""
    entry = ROOT / "trainer" / ("__main__.py" if command == "train" else f"{command}/__main__.py")
    assert (ROOT / "trainer" / "cli" / f"{command}.py").is_file()
    assert f"from trainer.cli.{command} import main" in entry.read_text()
