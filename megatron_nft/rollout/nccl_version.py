"""The NCCL weight transport needs one NCCL release on both sides: checked before any server starts.

    check_nccl_alignment("/opt/sglang/bin/python")   # ConfigError naming both versions on a mismatch

NCCL refuses peers of another version, so a trainer and SGLang servers that load different
libnccl builds cannot form the broadcast group: the first weight sync would fail (or hang in the
rendezvous) after the servers have spent minutes loading. The image aligns the SGLang venv's NCCL
with the trainer's at build time and records in /opt/sglang/NCCL_MISMATCH when it cannot; this is
the run-time side of that, for whatever interpreter `rollout.sglang_python` names.
"""

from __future__ import annotations

import ast
import subprocess

from megatron_nft.errors import ConfigError

# torch reports the NCCL it loaded (what the image's build step and smoke test ask too)
VERSION_SCRIPT = "import torch; print(torch.cuda.nccl.version())"


def parse_nccl_version(text: str) -> tuple[int, int, int]:
    """torch.cuda.nccl.version()'s answer as printed: a tuple "(2, 21, 5)" (torch >= 1.13), or the
    older single integer NCCL_VERSION_CODE (major*10000 + minor*100 + patch since NCCL 2.9,
    major*1000 + minor*100 + patch before)."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise ValueError(f"expected a version such as (2, 21, 5), got {text.strip()[:80]!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        major = value // 10000 if value >= 10000 else value // 1000
        rest = value % 10000 if value >= 10000 else value % 1000
        return major, rest // 100, rest % 100
    if isinstance(value, tuple) and len(value) >= 2 and all(isinstance(v, int) for v in value):
        return tuple((*value, 0)[:3])
    raise ValueError(f"expected a version such as (2, 21, 5), got {text.strip()[:80]!r}")


def own_nccl_version() -> tuple[int, int, int]:
    import torch

    try:
        return parse_nccl_version(repr(tuple(torch.cuda.nccl.version())))
    except Exception as e:  # noqa: BLE001 - a torch built without NCCL
        raise ConfigError(f"rollout.weight_transport=nccl: this trainer's torch reports no NCCL ({type(e).__name__}: {e}); "
                          f"use rollout.weight_transport=disk") from None


def interpreter_nccl_version(python: str, timeout_s: float = 120.0) -> tuple[int, int, int]:
    """The NCCL version `python` (an interpreter with torch) loads; one-line ConfigError otherwise."""
    where = f"rollout.sglang_python={python}"
    try:
        done = subprocess.run([python, "-c", VERSION_SCRIPT], capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such interpreter") from None
    except PermissionError:
        raise ConfigError(f"{where}: not executable") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{where}: asking it for its NCCL version took over {timeout_s:g} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"{where}: cannot report its NCCL version (exit {done.returncode}: {last[:200]})")
    try:
        return parse_nccl_version(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "")
    except ValueError as e:
        raise ConfigError(f"{where}: its NCCL version: {e}") from None


def format_version(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def check_nccl_alignment(python: str, *, own: tuple[int, int, int] | None = None, timeout_s: float = 120.0) -> tuple[int, int, int]:
    """Raises ConfigError (one line: both versions and the fix) unless `python` loads this trainer's
    NCCL release; returns the shared version."""
    own = own if own is not None else own_nccl_version()
    theirs = interpreter_nccl_version(python, timeout_s)
    if theirs != own:
        raise ConfigError(
            f"rollout.weight_transport=nccl: the SGLang interpreter rollout.sglang_python={python} loads NCCL "
            f"{format_version(theirs)} and this trainer NCCL {format_version(own)}, and NCCL refuses peers of another "
            f"version; use rollout.weight_transport=disk, or run the servers from the image's aligned venv "
            f"(/opt/sglang/bin/python; /opt/sglang/NCCL_MISMATCH exists where the build could not align it)")
    return own
