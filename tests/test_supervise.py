"""launch.supervise with real processes: restarts, giving a server up without exiting, the 503 it then
answers (and launch.wait_for_servers reads), stopping, Slurm's time-limit warning, and dying with its
parent. Server commands are small shell stand-ins: the supervisor only sees a process that exits or not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from launch.supervise import GIVEN_UP
from megatron_nft.runtime import free_port

REPO = Path(__file__).resolve().parent.parent
SUPERVISE = [sys.executable, "-m", "launch.supervise"]


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def until(condition, timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def answer(url: str, data: bytes | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, data=data, timeout=5) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def supervise(args: list[str], command: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*SUPERVISE, *args, "--", *command], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_server_that_keeps_exiting_is_restarted_then_given_up_and_the_supervisor_stays(tmp_path):
    from launch.wait_for_servers import main as wait_main

    port = free_port()
    starts = tmp_path / "starts"
    proc = supervise(["--restarts", "2", "--delay", "0", "--port", str(port), "--host", "127.0.0.1"],
                     ["sh", "-c", f"echo start >> {starts}; exit 3"])
    url = f"http://127.0.0.1:{port}"
    try:
        def given_up():
            assert proc.poll() is None, f"the supervisor exited ({proc.returncode}): {proc.stderr.read()}"
            try:
                return answer(url + "/health")[0] == 503
            except (urllib.error.URLError, OSError):
                return False

        until(given_up, what="the given-up answer")
        assert starts.read_text().count("start") == 3  # the first start and two restarts, no more
        # it stays: the job must not end with it (NeMo-Run's monitor would end every srun)
        time.sleep(1.0)
        assert proc.poll() is None and starts.read_text().count("start") == 3
        status, body = answer(url + "/health")
        assert status == 503 and body["error"] == f"{GIVEN_UP}: the server exited with code 3, 2 restart(s) used"
        assert answer(url + "/generate", data=b'{"input_ids": [[1]]}') == (503, body)  # clients drop it
        # Slurm's time-limit warning does not end it
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.3)
        assert proc.poll() is None
        # the trainers' wait reports it at once instead of waiting out its timeout
        begin = time.monotonic()
        assert wait_main([url, "--timeout", "600", "--poll", "0.1"]) == 1
        assert time.monotonic() - begin < 10
        # told to stop (the job is ending): it exits
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        log = proc.stderr.read()
        assert "restart 1 of 2" in log and "restart 2 of 2" in log and GIVEN_UP in log
    finally:
        stop(proc)


def test_a_restarted_server_serves_on_ignores_the_warning_and_stops_with_its_supervisor(tmp_path):
    starts, child_pid = tmp_path / "starts", tmp_path / "child.pid"
    # fails twice, then serves (sleeps) until stopped
    server = (f"echo start >> {starts}; [ $(wc -l < {starts}) -le 2 ] && exit 1; "
              f"echo $$ > {child_pid}; exec sleep 600")
    port = free_port()
    proc = supervise(["--restarts", "3", "--delay", "0", "--port", str(port), "--grace", "5"], ["sh", "-c", server])
    try:
        until(lambda: child_pid.exists() and child_pid.read_text().strip(), what="the third start")
        child = int(child_pid.read_text())
        # the warning reaches every process of the step (Slurm signals them all): both ignore it
        os.kill(proc.pid, signal.SIGUSR1)
        os.kill(child, signal.SIGUSR1)
        time.sleep(0.3)
        assert proc.poll() is None and alive(child)
        assert starts.read_text().count("start") == 3
        with pytest.raises(urllib.error.URLError):  # a serving server's port is its own: no 503 in its place
            answer(f"http://127.0.0.1:{port}/health")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        until(lambda: not alive(child), timeout_s=5, what="the server to stop")
        assert starts.read_text().count("start") == 3  # a stop is not a restart
    finally:
        stop(proc)


def test_the_supervisor_and_its_server_die_with_its_parent(tmp_path):
    """The parent (srun's task, slurmstepd) SIGKILLed: nothing is left on the node."""
    child_pid = tmp_path / "child.pid"
    parent_code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen({[*SUPERVISE, '--restarts', '1', '--port', str(free_port()), '--', 'sh', '-c', f'echo $$ > {child_pid}; exec sleep 600']!r}, cwd={str(REPO)!r})\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    supervisor = child = None
    try:
        supervisor = int(parent.stdout.readline())
        until(lambda: child_pid.exists() and child_pid.read_text().strip(), what="the server to start")
        child = int(child_pid.read_text())
        assert alive(supervisor) and alive(child)
        parent.kill()
        parent.wait()
        until(lambda: not alive(supervisor) and not alive(child), timeout_s=10, what="the supervisor and server to die")
    finally:
        stop(parent)
        for pid in (supervisor, child):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("args, message", [
    (["--restarts", "-1", "--port", "1", "--", "true"], "--restarts -1: must be >= 0"),
    (["--restarts", "x", "--port", "1", "--", "true"], "argument --restarts: invalid int value: 'x'"),
    (["--restarts", "1", "--", "true"], "the following arguments are required: --port"),
    (["--restarts", "1", "--port", "1"], "the server command goes after `--`"),
])
def test_bad_arguments_are_one_line(args, message):
    done = subprocess.run([*SUPERVISE, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
