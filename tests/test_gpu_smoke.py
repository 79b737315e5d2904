"""docker/gpu_smoke.py, the image's end-to-end check: here in its CPU mode (the stand-in server for
SGLang, megatron-core's local layers for Transformer Engine), every step but the GPU-only ones; on a
GPU machine with SGLang (the image), the real thing (gpu-marked)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "docker" / "gpu_smoke.py"
CHECKS = ["model", "server", "actor", "generate", "logprobs-before", "train", "sync", "logprobs"]
sys.path.insert(0, str(REPO / "docker"))
import gpu_smoke


def _run(tmp_path, *args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--work", str(tmp_path / "work"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path, check=False)


def _lines(out: str) -> dict[str, str]:
    """{check: the rest of its line} of the script's per-check lines."""
    found = {}
    for line in out.splitlines():
        m = re.match(r"gpu-smoke: (\S+)\s+(ok|FAILED) +(.*)", line)
        if m:
            found[m.group(1)] = f"{m.group(2)} {m.group(3)}"
    return found


def _gap(line: str) -> float:
    return float(re.search(r"max \|log-prob difference\| (\S+)", line).group(1))


@pytest.mark.slow
def test_cpu_mode_runs_every_check(tmp_path):
    """Every check in order, each ok: the stand-in server's log-probs equal the fp32 actor's before and
    after the step (as the independent HF model in the server computes them), the step moved them by
    far more than that, and the synced version is what the server answers with."""
    done = _run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = _lines(done.stdout)
    assert list(lines) == CHECKS and all(v.startswith("ok") for v in lines.values()), done.stdout
    assert "all checks passed" in done.stdout
    for name in ("logprobs-before", "logprobs"):
        assert _gap(lines[name]) <= gpu_smoke.TOLERANCE["fp32"], lines[name]
    moved = float(re.search(r"moved up to (\S+)", lines["train"]).group(1))
    assert moved > gpu_smoke.MIN_MOVE * gpu_smoke.TOLERANCE["fp32"]
    assert re.search(r"^\d+ tensors, .*weights_v000001; the server answers with version 1$", lines["sync"][3:])


@pytest.mark.slow
def test_a_server_on_other_weights_fails_the_logprob_check(tmp_path):
    """A server that serves random weights instead of the checkpoint (SGLang's --load-format dummy, as
    an extra server flag) disagrees with the actor: the run stops at logprobs-before, exit 1."""
    done = _run(tmp_path, "--server-arg=--load-format", "--server-arg=dummy")
    lines = _lines(done.stdout)
    assert done.returncode == 1, done.stdout
    assert list(lines) == CHECKS[:5] and lines["logprobs-before"].startswith("FAILED"), done.stdout
    assert _gap(lines["logprobs-before"]) > 10 * gpu_smoke.TOLERANCE["fp32"]
    assert "failed at check 'logprobs-before'" in done.stderr


def test_a_server_that_cannot_start_is_named_with_its_log(tmp_path):
    done = _run(tmp_path, "--server-arg=--no-such-flag", "--server-timeout", "120", timeout=300)
    lines = _lines(done.stdout)
    assert done.returncode == 1
    assert list(lines) == ["model", "server"] and lines["server"].startswith("FAILED"), done.stdout
    assert "exited with code 2" in lines["server"]
    assert "unrecognized arguments: --no-such-flag" in done.stderr  # the server's own log tail
    assert done.stderr.strip().splitlines()[-1] == "gpu-smoke: failed at check 'server'"


@pytest.mark.parametrize("capability, fp8, expected", [
    ((8, 0), "auto", None),  # A100: no FP8 tensor cores
    ((8, 9), "auto", "hybrid"),  # L40S / Ada
    ((9, 0), "auto", "hybrid"),  # H100 / H200
    ((9, 0), "off", None),
    ((8, 6), "on", "compute capability 8.6 has no FP8"),
])
def test_fp8_follows_the_gpus_compute_capability(monkeypatch, capability, fp8, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if expected is not None and " " in expected:
        with pytest.raises(gpu_smoke.CheckFailed, match=expected):
            gpu_smoke.choose_setup("cuda", fp8, "delayed")
        return
    setup = gpu_smoke.choose_setup("cuda", fp8, "delayed")
    assert (setup.dtype, setup.impl, setup.fp8, setup.tolerance) == ("bf16", "te", expected, 0.1)
    cpu = gpu_smoke.choose_setup("cpu", "auto", "delayed")
    assert (cpu.dtype, cpu.impl, cpu.fp8, cpu.tolerance) == ("fp32", "local", None, 1e-4)


def test_smoke_sh_runs_it_when_a_gpu_is_visible():
    smoke = (REPO / "docker" / "smoke.sh").read_text()
    block = re.search(r'if \[ "\$\{GPU\}" = 1 \]; then\n(.*?)\nfi\n', smoke, flags=re.DOTALL)
    assert block and 'gpu_smoke.py" --device cuda --sglang-python "${SGLANG_PYTHON}"' in block.group(1)
    assert smoke.rstrip().endswith('echo "smoke: ok"')
    subprocess.run(["bash", "-n", str(REPO / "docker" / "smoke.sh")], check=True)


@pytest.mark.gpu
def test_gpu_mode_with_sglang(tmp_path):
    """The real thing: SGLang (SGLANG_PYTHON, default the image's /opt/sglang/bin/python), TE layers
    (+FP8 from compute capability 8.9), bf16 tolerance."""
    sglang_python = os.environ.get("SGLANG_PYTHON", gpu_smoke.SGLANG_PYTHON)
    if not Path(sglang_python).is_file() or subprocess.run(
            [sglang_python, "-c", "import sglang"], capture_output=True, check=False).returncode != 0:
        pytest.skip(f"{sglang_python} cannot import sglang")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--work", str(tmp_path / "work"),
                           "--sglang-python", sglang_python], capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = _lines(done.stdout)
    assert list(lines) == CHECKS and all(v.startswith("ok") for v in lines.values()), done.stdout
    assert _gap(lines["logprobs"]) <= gpu_smoke.TOLERANCE["bf16"]


@pytest.mark.slow
def test_gpu_server_command_is_one_sglang_accepts(tmp_path):
    """The GPU mode's server command, parsed by SGLang 0.5.23's own launch_server parser (in a child
    process: importing sglang patches transformers): the trainer's flags plus bf16 and a GPU share."""
    import json

    setup = gpu_smoke.Setup("cuda", "bf16", "te", "hybrid", "delayed")
    args = gpu_smoke.parse_args(["--device", "cuda", "--sglang-python", "/venvs/sglang/bin/python"])
    command = gpu_smoke.server_command(args, setup, tmp_path / "model", 31234)
    assert command[:3] == ["/venvs/sglang/bin/python", "-m", "sglang.launch_server"]
    done = subprocess.run([sys.executable, str(REPO / "tests" / "sglang_schema.py")], input=json.dumps(
        {"server_argv": command[3:]}), capture_output=True, text=True, timeout=600, check=False)
    report = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("REPORT "))[7:])
    assert report["server_args"] == {
        "model_path": str(tmp_path / "model"), "host": "127.0.0.1", "port": 31234, "tp_size": 1, "dp_size": 1,
        "mem_fraction_static": 0.3, "random_seed": 0, "dtype": "bfloat16", "load_format": "auto",
        "enable_deterministic_inference": True,
    }
