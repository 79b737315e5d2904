"""The image's install logic, run here as far as a machine without Docker allows.

- docker/requirements.lock pins what `make test` ran (the test environment's versions) and agrees with
  pyproject.toml; docker/lock_filter.py gives way to the base image's own pins, naming each.
- The SGLang venv's pip step of the Dockerfile, taken from the Dockerfile itself, is resolved by pip
  (`--dry-run`, metadata only) under a constraints file like NGC's (torch pinned to the image's own
  build, which SGLang rejects): as the Dockerfile runs it, it resolves; without its fix it cannot.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "Dockerfile").read_text()
LOCK = REPO / "docker" / "requirements.lock"
sys.path.insert(0, str(REPO / "docker"))
from lock_filter import filter_lock, pins  # noqa: E402

# NGC PyTorch 25.10's pins as its constraints file writes them: its own torch build, not on PyPI
NGC_LIKE = "torch==2.9.0a0+145a3a7bda.nv25.10\ntorchvision==0.24.0a0+094e7af5\nnumpy==1.26.4\n"


def test_lock_pins_the_tested_versions_and_agrees_with_pyproject():
    locked = {name: line.split("==", 1)[1] for name, line in pins(LOCK.read_text().splitlines()).items()}
    not_installed_here = {"wandb"}  # run.wandb_project's logger; the CPU tests use a stand-in
    for name, version in locked.items():
        if name in not_installed_here:
            continue
        assert md.version(name) == version, f"{name}: lock {version}, test environment {md.version(name)}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"] + project["optional-dependencies"]["launch"]:
        name, sep, version = req.partition("==")
        if sep:
            assert locked[name.split("[")[0]] == version, req
    # torch and what NGC builds against it come from the base image, never from the lock
    assert not {"torch", "transformer-engine", "apex", "flash-attn"} & set(locked)


def test_lock_filter_gives_way_to_the_base_images_pins(tmp_path, capsys):
    lock = ["transformers==5.24.0", "tqdm==4.70.1  # comment", "math-verify[antlr4-13-2]==0.9.0", "# a comment"]
    constraints = ["torch==2.9.0a0+nv25.10", "Transformers==4.57.1", "tqdm==4.70.1", "math_verify==0.9.0"]
    keep, notes = filter_lock(lock, constraints)
    assert keep == ["tqdm==4.70.1", "math-verify[antlr4-13-2]==0.9.0"]
    assert notes == ["lock_filter: transformers==5.24.0 left out: the base image pins Transformers==4.57.1"]
    # the command line: requirements on stdout, notes and errors one line each on stderr
    (tmp_path / "lock").write_text("\n".join(lock))
    (tmp_path / "c").write_text("\n".join(constraints))
    script = str(REPO / "docker" / "lock_filter.py")
    done = subprocess.run([sys.executable, script, str(tmp_path / "lock"), str(tmp_path / "c")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split() == keep and "transformers==5.24.0 left out" in done.stderr
    done = subprocess.run([sys.executable, script, str(tmp_path / "lock"), str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0 and "missing: No such file" in done.stderr


def test_dockerfile_installs_through_the_lock_and_runs_the_smoke_test():
    from launch.tasks import SGLANG_PYTHON

    assert re.search(r"^FROM \$\{BASE_IMAGE\}\nARG BASE_IMAGE$", DOCKERFILE, flags=re.M)  # usable after FROM
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\S+$", DOCKERFILE, flags=re.M)
    assert "lock_filter.py /opt/megatron-nft/docker/requirements.lock" in DOCKERFILE
    assert "pip install -r /tmp/trainer-requirements.txt" in DOCKERFILE
    assert "base-constraints" not in DOCKERFILE  # NGC's own file is the one source of the base's pins
    # every pip of the SGLang venv runs without NGC's constraints
    sglang_pips = re.findall(r".*/opt/sglang/bin/pip.*", DOCKERFILE)
    assert sglang_pips and all("env -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null" in line or "pip list" in line
                               for line in sglang_pips), sglang_pips
    assert f"{Path(SGLANG_PYTHON).parent.parent}" in DOCKERFILE  # the SGLang venv the launcher runs
    assert "RUN bash /opt/megatron-nft/docker/smoke.sh" in DOCKERFILE
    smoke = (REPO / "docker" / "smoke.sh").read_text()
    for check in ("megatron-nft --help", "import transformer_engine.pytorch", "import sglang",
                  "torch.cuda.nccl.version()", "pkill"):
        assert check in smoke
    subprocess.run(["bash", "-n", str(REPO / "docker" / "smoke.sh")], check=True)


def test_base_image_is_pinned_by_digest_and_recorded():
    """The default base names one image (tag + sha256 digest, the tag kept for readers), the comment
    above it says where the digest came from, and the build records the base it ran on."""
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, flags=re.MULTILINE).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3@sha256:[0-9a-f]{64}", default), default
    comment = DOCKERFILE[: DOCKERFILE.index("ARG BASE_IMAGE=")].rsplit("\n\n", 1)[-1]
    assert "public sources" in comment and "imagetools inspect" in comment
    assert 'echo "${BASE_IMAGE}" > /opt/megatron-nft/base-image.txt' in DOCKERFILE


def _sglang_install_command(pip: str) -> str:
    """The Dockerfile's SGLang install line as a shell command, with its SGLANG_PIP definition, the
    venv's pip at `pip`, and `install --dry-run --report` (resolution only, nothing installed)."""
    definition = re.search(r'SGLANG_PIP="([^"]+)"', DOCKERFILE).group(1)
    install = re.search(r'\$\{SGLANG_PIP\} install ("sglang==\$\{SGLANG_VERSION\}")', DOCKERFILE).group(1)
    version = re.search(r"^ARG SGLANG_VERSION=(\S+)$", DOCKERFILE, flags=re.M).group(1)
    return (f'SGLANG_VERSION={version}; SGLANG_PIP="{definition.replace("/opt/sglang/bin/pip", pip)}"; '
            f"${{SGLANG_PIP}} install --dry-run --ignore-installed --quiet --report $REPORT {install}")


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_sglang_venv_resolves_under_ngc_constraints(tmp_path):
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable from this machine")
    venv = tmp_path / "sglang"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = tmp_path / "constraint.txt"
    constraints.write_text(NGC_LIKE)
    pip_conf = tmp_path / "pip.conf"  # NGC's other route: the global pip configuration
    pip_conf.write_text(f"[global]\nconstraint = {constraints}\n")
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "SSL_CERT_FILE")}
    base["HOME"] = str(tmp_path)

    def resolve(command: str, report: Path, **env) -> subprocess.Popen:
        return subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**base, "REPORT": str(report), **env})

    fixed = _sglang_install_command(str(venv / "bin" / "pip"))
    unfixed = fixed.replace("env -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null ", "")
    assert unfixed != fixed
    # both resolutions at once (minutes of PyPI metadata each, network-bound), each with its own report:
    # as NGC's image sets it (PIP_CONSTRAINT), the old command cannot resolve (SGLang needs its own
    # torch); the Dockerfile's command, under the constraint set both ways NGC may set it, resolves
    old = resolve(unfixed, tmp_path / "old.json", PIP_CONSTRAINT=str(constraints))
    new = resolve(fixed, tmp_path / "report.json", PIP_CONSTRAINT=str(constraints), PIP_CONFIG_FILE=str(pip_conf))
    _, old_err = old.communicate(timeout=1200)
    _, new_err = new.communicate(timeout=1200)
    assert old.returncode != 0 and "ResolutionImpossible" in old_err, old_err[-2000:]
    assert new.returncode == 0, new_err[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
    assert chosen["sglang"] == re.search(r"^ARG SGLANG_VERSION=(\S+)$", DOCKERFILE, flags=re.M).group(1)
    sglang = next(item["metadata"] for item in report["install"] if item["metadata"]["name"].lower() == "sglang")
    (torch_pin,) = [r.split("==", 1)[1] for r in sglang["requires_dist"] if re.match(r"torch\s*==", r)]
    assert chosen["torch"] == torch_pin.strip()  # SGLang's own torch, not the image's build
    # the NCCL wheel the NCCL step replaces is part of what SGLang brings
    assert any(re.fullmatch(r"nvidia-nccl-cu\d+", name) for name in chosen), sorted(chosen)


def test_every_run_step_is_valid_shell():
    """Each RUN instruction (continuation lines joined, as Docker joins them) parses under sh -n."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    steps = [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]
    assert len(steps) >= 5
    for step in steps:
        done = subprocess.run(["sh", "-n"], input=step, capture_output=True, text=True)
        assert done.returncode == 0, (step, done.stderr)
