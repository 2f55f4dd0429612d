"""OmegaConf resolvers the configs use: ``${package_file:PACKAGE,FILE,EXTRA}`` (a file an installed package ships),
``${stdlib:}`` (the running Python's standard library folder), ``${fraction_of:N,F}`` (int(N * F), e.g. a step)."""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

from omegaconf import OmegaConf


class MissingPackage(ValueError):
    """A config names a file of a package that is not installed; the message says how to install it."""


def package_file(package: str, name: str, extra: str) -> str:
    """The path of ``name`` in the installed ``package``'s folder; MissingPackage naming the extra to install."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingPackage(f'{package} is not installed: pip install -e ".[{extra}]"')
    path = Path(spec.origin).parent / name
    if not path.is_file():
        raise MissingPackage(f'{package} has no {name}: reinstall it with pip install -e ".[{extra}]"')
    return str(path)


def stdlib() -> str:
    """The standard library's folder (it also holds site-packages: leave that out with ``data.exclude``)."""
    return sysconfig.get_paths()["stdlib"]


def fraction_of(total: int, fraction: float) -> int:
    return int(total * fraction)


def register() -> None:
    for name, resolver in (("package_file", package_file), ("stdlib", stdlib), ("fraction_of", fraction_of)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
