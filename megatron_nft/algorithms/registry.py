"""The algorithm registry: every module of this package that defines an `Algorithm` instance at module
level contributes it, so adding an algorithm is one new module (plus its recipe fragment,
recipes/algo/<name>.yaml). The only place outside an algorithm's own module that knows names."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from megatron_nft.algorithms.base import Algorithm

DEFAULT = "nft"
# The paper's comparison table, in its order: the algorithms with paper recipes
# (recipes/paper/<model>-<name>.yaml) and bench/algorithms.py's default set.
PAPER_TABLE = ("nft", "rft", "grpo", "dr_grpo", "dapo", "infonca")
_INFRASTRUCTURE = {"base", "stats", "groups", "losses", "registry"}


def _discover() -> dict[str, Algorithm]:
    found: dict[str, Algorithm] = {}
    for module_info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module_info.name in _INFRASTRUCTURE:
            continue
        module = importlib.import_module(f"{__package__}.{module_info.name}")
        for value in vars(module).values():
            if isinstance(value, Algorithm):
                if value.name in found and found[value.name] is not value:
                    raise RuntimeError(f"two algorithms are named {value.name!r}: {found[value.name]!r} and {module.__name__}")
                found[value.name] = value
    missing = [n for n in (DEFAULT, *PAPER_TABLE) if n not in found]
    if missing:
        raise RuntimeError(f"megatron_nft.algorithms defines no algorithm named {', '.join(missing)}")
    order = list(PAPER_TABLE) + sorted(set(found) - set(PAPER_TABLE))
    return {name: found[name] for name in order}


_REGISTRY = _discover()


def names() -> tuple[str, ...]:
    """Every algorithm's name: the paper's table first, then the others by name."""
    return tuple(_REGISTRY)


def is_algorithm(name: object) -> bool:
    return isinstance(name, str) and name in _REGISTRY


def algorithm(name: str) -> Algorithm:
    """The algorithm called `name`; ValueError naming the allowed ones otherwise."""
    if not is_algorithm(name):
        raise ValueError(f"algorithm must be one of {', '.join(_REGISTRY)}; got {name!r}")
    return _REGISTRY[name]


def algorithms() -> tuple[Algorithm, ...]:
    return tuple(_REGISTRY.values())
