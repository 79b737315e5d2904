"""scripts/gpu-check, the one-command GPU proof: its bundle (built with pip here, as `make test` does),
its dry run, the installer, the step runner and its results files, and a CPU smoke run of the steps.

The bundle's contents are checked against this project's own declarations (pyproject.toml and each
bundled wheel's METADATA) and the versions this venv's tests run with; the runner against steps
whose outcome the test fixes (a pass, a timeout, a crash, a failure); the junit reader against a
test file written here."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_bundle  # noqa: E402
import gpu_check  # noqa: E402

BUNDLE = REPO / "gpu-bundle"


def _name(requirement: str) -> str:
    return gpu_bundle.normalize(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))


@pytest.fixture(scope="module")
def bundle():
    """`make gpu-bundle` (PyPI; a no-op when the folder is complete) and its folder."""
    out = subprocess.run(["make", "gpu-bundle"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return BUNDLE


def _gpu_check(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(REPO / "scripts" / "gpu-check"), *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# the bundle and the dry run
# --------------------------------------------------------------------------------------------------


def test_make_gpu_bundle_then_dry_run(bundle):
    again = subprocess.run(["make", "gpu-bundle"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "complete, nothing downloaded" in again.stdout  # cached: a second build fetches nothing
    out = _gpu_check("--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    for step in gpu_check.STEPS:
        assert re.search(rf"^  {re.escape(step.name)}\s+{step.budget_s} s ", out.stdout, re.M), (step.name, out.stdout)
    for w in gpu_bundle.BUNDLE:
        assert re.search(rf"bundle: {re.escape(w.dist)}\s+{re.escape(w.version)}\s+\S+\.whl", out.stdout), w
    size = float(re.search(r"source tree: ([\d.]+) MiB \(limit 64 MiB\)", out.stdout).group(1))
    assert size < 64
    # what the lent machine receives: the bundle plus git's tracked and unignored files
    assert gpu_bundle.folder_bytes(bundle) + gpu_bundle.tree_bytes() < 64 * 2**20


def test_the_plan_fits_one_ten_minute_call():
    assert sum(s.budget_s for s in gpu_check.STEPS) <= 600 - 20  # the issue asks under 12 minutes
    assert [s.name for s in gpu_check.STEPS][0] == "install"


def test_dry_run_refuses_an_incomplete_or_wrong_bundle(bundle, tmp_path):
    partial = tmp_path / "bundle"
    partial.mkdir()
    for path in bundle.glob("*.whl"):
        if not path.name.startswith("pebble-"):
            shutil.copy(path, partial)
    out = _gpu_check("--dry-run", "--bundle", str(partial))
    assert out.returncode == 1
    assert "no wheel of pebble (expected pebble==5.2.3" in out.stderr
    (partial / "pebble-5.0.0-py3-none-any.whl").write_bytes(b"")
    out = _gpu_check("--dry-run", "--bundle", str(partial))
    assert out.returncode == 1 and "pebble-5.0.0-py3-none-any.whl is pebble 5.0.0, expected 5.2.3" in out.stderr


def test_dry_run_refuses_a_bundle_over_the_size_limit(bundle, monkeypatch, capsys):
    monkeypatch.setattr(gpu_bundle, "SIZE_LIMIT", gpu_bundle.folder_bytes(bundle))  # the tree no longer fits
    assert gpu_check.main(["--dry-run"]) == 1
    assert "over the" in capsys.readouterr().err


def test_bundle_holds_what_the_project_needs_beyond_a_torch_image(bundle):
    """pyproject.toml's dependencies and every bundled wheel's own requirements are either bundled or
    in the GPU image; the bundled versions are the ones this venv's tests pass with."""
    bundled = {gpu_bundle.normalize(w.dist) for w in gpu_bundle.BUNDLE}
    provided = {gpu_bundle.normalize(n) for n in gpu_bundle.DEVICE_PROVIDES}
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {_name(r) for r in declared} - bundled - provided == set()
    for version, path in gpu_bundle.wheel_files(bundle).values():
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            requires = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
        # what a Python 3.12 Linux machine installs: environment markers evaluated, no extras
        needed = {gpu_bundle.normalize(r.name) for r in map(Requirement, requires)
                  if r.marker is None or r.marker.evaluate({"extra": "", "python_version": "3.12", "sys_platform": "linux"})}
        assert needed - bundled - provided == set(), path.name
    for w in gpu_bundle.BUNDLE:
        assert importlib.metadata.version(w.dist) == w.version, w.dist
        assert gpu_check.accepted(w.version, w.accept)


def test_version_acceptance():
    assert gpu_check.accepted("0.19.2", "==0.19.2") and not gpu_check.accepted("0.19.1", "==0.19.2")
    assert gpu_check.accepted("5.10.0", ">=5.0") and not gpu_check.accepted("4.9.9", ">=5.0")
    assert gpu_check.accepted("24.2", ">=24.2") and not gpu_check.accepted("24.1", ">=24.2")
    assert not gpu_check.accepted(None, ">=1")
    assert gpu_check.release("2.11.0+cu130") == (2, 11, 0)


# --------------------------------------------------------------------------------------------------
# the installer
# --------------------------------------------------------------------------------------------------


def test_install_missing_installs_only_what_the_python_lacks(bundle, tmp_path):
    """A bare venv lacks pebble and antlr4: both are installed from the bundle into the site folder;
    this venv has them, so nothing is installed for it."""
    wheels = [w for w in gpu_bundle.BUNDLE if w.dist in ("pebble", "antlr4-python3-runtime")]
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("VIRTUAL_ENV", None)
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "bare")], check=True, timeout=300)
    bare = str(tmp_path / "bare" / "bin" / "python")
    rows = gpu_check.install_missing([bare], bundle, site, env, wheels)
    assert [(r["package"], r["found"], r["action"], r["now"], r["import"]) for r in rows] == [
        ("antlr4-python3-runtime", "missing", "installed", "4.13.2", "ok"), ("pebble", "missing", "installed", "5.2.3", "ok")]
    assert (site / "pebble").is_dir() and (site / "antlr4").is_dir()
    rows = gpu_check.install_missing([sys.executable], bundle, tmp_path / "unused", env, wheels)
    assert {r["action"] for r in rows} == {"kept"} and not (tmp_path / "unused").exists()


def test_install_missing_names_a_wheel_absent_from_the_bundle(tmp_path):
    wheel = gpu_bundle.Wheel("no-such-package-xyz", "1.0", "no_such_package_xyz", "==1.0")
    with pytest.raises(RuntimeError, match=r"no wheel for no-such-package-xyz \(run `make gpu-bundle`"):
        gpu_check.install_missing([sys.executable], tmp_path, tmp_path / "site", dict(os.environ), [wheel])


# --------------------------------------------------------------------------------------------------
# the runner and its results
# --------------------------------------------------------------------------------------------------


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_results_survive_a_timeout_a_crash_and_a_failure(tmp_path):
    out, work, pidfile = tmp_path / "out", tmp_path / "work", tmp_path / "grandchild.pid"
    seen = {}

    def passes(ctx):
        rc, tail = ctx.run([sys.executable, "-c", "print('hello from step one')"])
        ctx.record["summary"] = tail.strip().splitlines()[-1]
        return rc == 0

    def hangs(ctx):  # a child that starts a grandchild and sleeps: both must go at the deadline
        ctx.record["summary"] = "partial finding"
        code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '120']); "
                "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(120)")
        ctx.run([sys.executable, "-c", code, str(pidfile)])
        return True

    def crashes(ctx):
        seen["after timeout"] = [(s["name"], s["status"]) for s in _results(out)["steps"]]
        raise KeyError("boom")

    def fails(ctx):
        seen["after crash"] = [(s["name"], s["status"]) for s in _results(out)["steps"]]
        return False

    steps = [gpu_check.Step("one", 60, "passes", passes), gpu_check.Step("two", 3, "hangs", hangs),
             gpu_check.Step("three", 60, "crashes", crashes), gpu_check.Step("four", 60, "fails", fails)]
    start = time.monotonic()
    rc = gpu_check.main([str(out), "--device", "cpu", "--work", str(work)], steps=steps)
    assert rc == 1 and time.monotonic() - start < 40
    assert seen["after timeout"] == [("one", "passed"), ("two", "timeout")]
    assert seen["after crash"] == [("one", "passed"), ("two", "timeout"), ("three", "error")]
    doc = _results(out)
    assert [(s["name"], s["status"]) for s in doc["steps"]] == [("one", "passed"), ("two", "timeout"), ("three", "error"),
                                                               ("four", "failed")]
    assert doc["steps"][0]["summary"] == "hello from step one"
    assert doc["steps"][1]["summary"] == "partial finding" and 3 <= doc["steps"][1]["seconds"] < 20
    assert "KeyError: 'boom'" in doc["steps"][2]["notes"][0]
    assert "finished" in doc and sorted(p.name for p in out.iterdir()) == ["gpu-check.log", "results.json", "results.md"]
    grandchild = int(pidfile.read_text())
    status = Path(f"/proc/{grandchild}/status")
    assert not status.exists() or "zombie" in status.read_text()  # the step's whole process group was killed
    md = (out / "results.md").read_text()
    assert "| two | timeout | " in md and "| three | error | " in md and "hello from step one" in (out / "gpu-check.log").read_text()


def test_install_failure_stops_the_run_and_says_so(tmp_path):
    steps = [gpu_check.Step("install", 30, "fails", lambda ctx: False),
             gpu_check.Step("later", 30, "never", lambda ctx: pytest.fail("ran after a failed install"))]
    assert gpu_check.main([str(tmp_path), "--device", "cpu", "--work", str(tmp_path / "w")], steps=steps) == 1
    md = (tmp_path / "results.md").read_text()
    assert [s["name"] for s in _results(tmp_path)["steps"]] == ["install"] and "| later | not run |" in md


def test_pytest_steps_count_from_junit(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text("import pytest\n"
                     "def test_ok():\n    pass\n"
                     "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
                     "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n")
    args = gpu_check.parse_args([str(tmp_path / "out"), "--device", "cpu"])
    ctx = gpu_check.Context(args=args, out=tmp_path, work=tmp_path, env=dict(os.environ), deadline=time.monotonic() + 120)
    assert gpu_check.run_pytest(ctx, "sample", [str(tests), "--rootdir", str(tmp_path)], per_test_s=60) is False
    assert ctx.record["counts"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "passed": 1}
    [failure] = ctx.record["failures"]
    assert "test_bad (failure)" in failure and "one is not two" in failure


def test_a_pytest_step_cut_short_keeps_the_finished_tests(tmp_path):
    tests = tmp_path / "test_slow.py"
    tests.write_text("import time\ndef test_quick():\n    pass\ndef test_hangs():\n    time.sleep(120)\n")
    args = gpu_check.parse_args([str(tmp_path / "out"), "--device", "cpu"])
    ctx = gpu_check.Context(args=args, out=tmp_path, work=tmp_path, env=dict(os.environ), deadline=time.monotonic() + 20)
    with pytest.raises(gpu_check.StepTimeout):
        gpu_check.run_pytest(ctx, "slow", [str(tests), "--rootdir", str(tmp_path)], per_test_s=300)
    assert ctx.record["counts"] == {"tests": 1, "failures": 0, "errors": 0, "skipped": 0, "passed": 1}
    assert ctx.record["summary"].startswith("cut short after 1 tests")


def test_unknown_step_and_missing_outdir_are_refused():
    out = _gpu_check("--only", "demo", "warp-drive")
    assert out.returncode == 2 and "--only warp-drive: not a step; the steps are install, gpu-tests" in out.stderr
    out = _gpu_check()
    assert out.returncode == 2 and "OUTDIR is required" in out.stderr


# --------------------------------------------------------------------------------------------------
# the peak table bench/actor_throughput.py reads MFU against
# --------------------------------------------------------------------------------------------------


def test_throughput_peaks_come_from_the_plan_table():
    from megatron_nft.plan import GPUS

    spec = importlib.util.spec_from_file_location("actor_throughput_peaks", REPO / "bench" / "actor_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    assert bench.bf16_peak("NVIDIA H200") == GPUS["h200"].bf16_tflops
    assert bench.bf16_peak("NVIDIA GH200 480GB") == GPUS["h200"].bf16_tflops
    assert bench.bf16_peak("NVIDIA H100 80GB HBM3") == GPUS["h100-80gb"].bf16_tflops
    assert bench.bf16_peak("NVIDIA A100-SXM4-80GB") == GPUS["a100-80gb"].bf16_tflops
    assert bench.bf16_peak("NVIDIA H100 PCIe") is None and bench.bf16_peak("Tesla T4") is None


# --------------------------------------------------------------------------------------------------
# the steps themselves, on CPU at tiny sizes
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cpu_smoke_run_of_every_step(bundle, tmp_path):
    """Every step's command and its reading of the output, on CPU (CUDA hidden), tiny sizes."""
    out, work = tmp_path / "out", tmp_path / "work"
    run = _gpu_check(str(out), "--device", "cpu", "--work", str(work), "--budget-scale", "6", timeout=3000)
    doc = _results(out)
    statuses = {s["name"]: s["status"] for s in doc["steps"]}
    assert statuses == {s.name: "passed" for s in gpu_check.STEPS}, (statuses, run.stdout[-3000:], run.stderr[-3000:])
    assert run.returncode == 0
    steps = {s["name"]: s for s in doc["steps"]}
    assert doc["mode"] == "cpu" and "cuda_available False" in doc["machine"]
    assert {r["action"] for r in steps["install"]["tables"]["packages"]} == {"kept"}
    assert steps["gpu-tests"]["counts"]["passed"] == 2
    # the tables are the benchmarks' own rows
    raw = [json.loads(l) for l in (work / "throughput.jsonl").read_text().splitlines()]
    table = steps["throughput"]["tables"]["train step"]
    assert [r["variant"] for r in table] == ["fp32", "fp32+full"] and [r["tokens/s"] for r in table] == [
        round(r["tokens_per_s"]) for r in raw]
    [lp] = steps["logprobs"]["tables"]["fused vs naive"]
    assert lp["T"] == 64 and 0 < lp["memory fused/naive"] < 1 and lp["max |dlogprob|"] < 1e-4
    flex = steps["flex"]
    assert flex["metrics"]["lengths"] == 10 and flex["tables"]["per micro-batch length"][0]["compiles"] >= 1
    assert flex["tables"]["per micro-batch length"][0]["max_abs_diff_vs_dense"] < 1e-4
    for name, world in (("demo", 1), ("demo-2ranks", 2)):
        [metrics] = [m for m in steps[name]["metrics"].values() if isinstance(m, dict)]
        assert metrics["world_size"] == world and metrics["backend"] == "gloo" and metrics["device"] == "cpu"
        assert 0 <= metrics["accuracy_before"] <= 1 and 0 <= metrics["accuracy_after"] <= 1
    assert steps["transports"]["counts"]["passed"] >= 1


@pytest.mark.gpu
def test_gpu_check_flex_step_on_cuda(tmp_path):
    """The kit's install and FlexAttention steps on a CUDA machine (the full run is `make gpu-check`)."""
    out = _gpu_check(str(tmp_path), "--only", "flex", "--work", str(tmp_path / "work"), timeout=600)
    steps = {s["name"]: s for s in _results(tmp_path)["steps"]}
    assert steps["install"]["status"] == "passed" and steps["flex"]["status"] == "passed", out.stdout + out.stderr
    assert steps["flex"]["metrics"]["compiles_total"] >= 1
