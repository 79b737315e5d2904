"""Lock file lines the base image's own pip constraints allow, for `pip install -r` at build time.

    python docker/lock_filter.py docker/requirements.lock CONSTRAINTS_FILE > /tmp/trainer-requirements.txt

NVIDIA's PyTorch image pins every package it ships in a constraints file that applies to every pip in
the image; a lock pin of another version would make the build's resolver give up. Such a line is left
out (the image's version wins) and named on stderr with both versions, so the build log states which
of the CPU-tested versions the image does not run.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def _name(requirement: str) -> str:
    return re.split(r"[\[=<>!~ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pins(lines: list[str]) -> dict[str, str]:
    """name -> the whole requirement line, for the `name==version` lines of a requirements file."""
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            out[_name(line)] = line
    return out


def filter_lock(lock: list[str], constraints: list[str]) -> tuple[list[str], list[str]]:
    """(lock lines to install, notes about the lines left out)."""
    constrained = pins(constraints)
    keep, notes = [], []
    for name, line in pins(lock).items():
        base = constrained.get(name)
        if base is not None and base.split("==", 1)[1].strip() != line.split("==", 1)[1].strip():
            notes.append(f"lock_filter: {line} left out: the base image pins {base}")
        else:
            keep.append(line)
    return keep, notes


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python docker/lock_filter.py LOCK_FILE CONSTRAINTS_FILE", file=sys.stderr)
        return 2
    try:
        lock = Path(argv[0]).read_text().splitlines()
        constraints = Path(argv[1]).read_text().splitlines()
    except OSError as e:
        print(f"lock_filter: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    keep, notes = filter_lock(lock, constraints)
    for note in notes:
        print(note, file=sys.stderr)
    print("\n".join(keep))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
