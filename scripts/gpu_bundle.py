"""The wheels a stock CUDA machine lacks to run this project, and their folder (`make gpu-bundle`).

    python scripts/gpu_bundle.py build [--dir gpu-bundle]    # download what is missing (cached)
    python scripts/gpu_bundle.py check [--dir gpu-bundle]    # every wheel present, at its version

The target is a machine with Python 3.12 and torch preinstalled and no network (the lent H200: torch
2.11 + CUDA 13, transformers 5.17): it gets megatron-core and the small pure-Python dependencies that
such an image does not have, downloaded here for CPython 3.12 manylinux x86-64 with `--no-deps`, so
that nothing pulls torch, NVIDIA libraries, Transformer Engine or SGLang along. scripts/gpu_check.py
installs from this folder only what the machine turns out to miss.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "gpu-bundle"
SIZE_LIMIT = 64 * 2**20  # what the lent machine accepts: working tree + carried folders

# pip matches a manylinux tag exactly: megatron-core 0.19.2 is tagged manylinux_2_24/2_28, the rest
# are py3-none-any.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PYTHON_VERSION = "3.12"


@dataclass(frozen=True)
class Wheel:
    dist: str  # the distribution name, as pip and importlib.metadata know it
    version: str  # the version bundled: the one this project's CPU tests run with
    module: str  # importing it proves the package works
    accept: str  # the machine's own copy is kept when its version satisfies this ("==X" or ">=X")


# megatron-core and what pyproject.toml's dependencies pull that a stock torch image lacks (math-verify
# with its antlr4 4.13.2 extra, pebble, omegaconf). packaging is megatron-core's own need (>= 24.2),
# bundled in case the image's copy is older. Everything else the project needs (torch, numpy, psutil,
# transformers, tokenizers, safetensors, pyarrow, pyyaml, tqdm, matplotlib, tensorboard, sympy,
# aiohttp, pytest, pytest-timeout) is in such an image: DEVICE_PROVIDES, checked by a test against
# pyproject.toml and each bundled wheel's own requirements.
BUNDLE = (
    Wheel("megatron-core", "0.19.2", "megatron.core", "==0.19.2"),
    Wheel("math-verify", "0.9.0", "math_verify", "==0.9.0"),
    Wheel("latex2sympy2_extended", "1.11.0", "latex2sympy2_extended", "==1.11.0"),
    Wheel("antlr4-python3-runtime", "4.13.2", "antlr4", "==4.13.2"),
    Wheel("omegaconf", "2.4.0", "omegaconf", ">=2.3"),
    Wheel("pebble", "5.2.3", "pebble", ">=5.0"),
    Wheel("packaging", "26.4", "packaging", ">=24.2"),
)

# What the lent H200's image ('cuda', package list of 2026-11-17) already holds, of what this project
# and the bundled wheels require.
DEVICE_PROVIDES = frozenset({
    "torch", "numpy", "psutil", "transformers", "tokenizers", "safetensors", "pyarrow", "pyyaml", "tqdm",
    "matplotlib", "tensorboard", "sympy", "aiohttp", "pytest", "pytest-timeout", "packaging",
})


def normalize(name: str) -> str:
    """PEP 503 name normalisation ("Pebble", "latex2sympy2-extended" -> "pebble", "latex2sympy2_extended")."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_files(folder: Path) -> dict[str, tuple[str, Path]]:
    """{normalised dist name: (version, path)} of the .whl files in `folder` (a wheel's file name is
    `{dist}-{version}-{tags}.whl`, dist with underscores)."""
    found = {}
    for path in sorted(folder.glob("*.whl")) if folder.is_dir() else ():
        dist, version = path.name.split("-")[:2]
        found[normalize(dist)] = (version, path)
    return found


def check(folder: Path, bundle=BUNDLE) -> list[str]:
    """One line per problem: a wheel missing, at another version, or a stray second version."""
    found = wheel_files(folder)
    problems = []
    for w in bundle:
        got = found.get(normalize(w.dist))
        if got is None:
            problems.append(f"{folder}: no wheel of {w.dist} (expected {w.dist}=={w.version}; run `make gpu-bundle`)")
        elif got[0] != w.version:
            problems.append(f"{folder}: {got[1].name} is {w.dist} {got[0]}, expected {w.version}")
    counts = Counter(normalize(p.name.split("-")[0]) for p in (folder.glob("*.whl") if folder.is_dir() else ()))
    problems += [f"{folder}: {n} wheels of {name} (pip refuses two versions)" for name, n in counts.items() if n > 1]
    return problems


def build(folder: Path, bundle=BUNDLE, python: str = sys.executable) -> list[Wheel]:
    """Downloads the wheels not yet in `folder`; returns those it fetched (none when complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    found = wheel_files(folder)
    todo = [w for w in bundle if found.get(normalize(w.dist), (None,))[0] != w.version]
    for w in todo:  # a wheel at another version would make the folder ambiguous
        stale = found.get(normalize(w.dist))
        if stale is not None:
            stale[1].unlink()
    if todo:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        cmd = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--implementation",
               "cp", "--python-version", PYTHON_VERSION, *platforms, "--dest", str(folder),
               *(f"{w.dist}=={w.version}" for w in todo)]
        subprocess.run(cmd, check=True)
    return todo


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what travels to the lent machine without being named: git's tracked files and the
    untracked ones it does not ignore."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True,
                         check=True).stdout
    total = 0
    for name in out.decode().split("\0"):
        path = repo / name
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["build", "check"])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the bundle folder (default: gpu-bundle/)")
    args = ap.parse_args(argv)
    if args.action == "build":
        fetched = build(args.dir)
        print(f"{args.dir}: " + (f"downloaded {', '.join(w.dist for w in fetched)}" if fetched else "complete, nothing downloaded"))
    problems = check(args.dir)
    for line in problems:
        print(line, file=sys.stderr)
    size = folder_bytes(args.dir) + tree_bytes()
    print(f"{args.dir}: {len(BUNDLE)} wheels, {folder_bytes(args.dir) / 2**20:.1f} MiB; with the source tree "
          f"{size / 2**20:.1f} MiB of {SIZE_LIMIT / 2**20:.0f} MiB")
    if size >= SIZE_LIMIT:
        print(f"{args.dir}: bundle + source tree {size / 2**20:.1f} MiB, over the {SIZE_LIMIT / 2**20:.0f} MiB limit",
              file=sys.stderr)
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
