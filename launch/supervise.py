"""Keeps one rollout server on its node for as long as the job runs, and never ends the job itself.

    python -m launch.supervise --restarts 3 --delay 10 --port 30000 -- python -m sglang.launch_server ...

Why its srun must not end: NeMo-Run 0.11.1's batch script (slurm.sh.j2, monitor_group_job) starts every
srun of a job group in the background and polls their pids; as soon as one has exited, it waits
monitor_group_job_wait_time (60 s) and `kill -9`s every other srun, ending the job with the first
one's exit code. A rollout server's srun that exits, even after the last restart, would end the
trainers too. So this supervisor:

  - runs the server command, and when it exits starts it again after --delay seconds, at most
    --restarts times (a GPU fault or an out-of-memory should not cost the node);
  - then gives the server up but not the job: it stays alive and answers every HTTP request on the
    server's port with 503 and the reason (GIVEN_UP). The trainers' client sees a failing server,
    drops it and re-sends its prompts to the others; its /health never answers 200 again, so the
    trainers never take it back, and launch.wait_for_servers reports it at once;
  - ends when told to (SIGTERM or SIGINT: Slurm is ending the step; the server gets SIGTERM first,
    SIGKILL after --grace seconds) or when its parent dies (the step's shell or slurmstepd, even by
    SIGKILL: parent_death), and its server dies with it;
  - ignores Slurm's time-limit warning (SIGUSR1, #SBATCH --signal), as does the server it starts (an
    ignored signal stays ignored across exec): the warning is the trainers', servers serve to the end.

Only the trainer's srun ends a job, then: when it exits, NeMo-Run's monitor stops the servers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from megatron_nft.parent_death import die_with_parent, preexec_die_with_parent

# The start of every answer of a given-up server (launch.wait_for_servers looks for it).
GIVEN_UP = "rollout server gave up"
WARNING_SIGNAL = signal.SIGUSR1  # launch.tasks.STOP_SIGNAL


def log(message: str) -> None:
    print(f"supervise[{os.getpid()}] {time.strftime('%H:%M:%S')}: {message}", file=sys.stderr, flush=True)


class Supervisor:
    def __init__(self, command: list[str], *, restarts: int, delay_s: float, grace_s: float, host: str, port: int):
        self.command, self.restarts, self.delay_s, self.grace_s = command, restarts, delay_s, grace_s
        self.host, self.port = host, port
        self.child: subprocess.Popen | None = None
        self.stop_signal = 0  # the signal that asked us to stop (0: none yet)

    def request_stop(self, signum, _frame=None) -> None:
        self.stop_signal = signum
        child = self.child
        if child is not None and child.poll() is None:
            _signal_group(child.pid, signal.SIGTERM)
            # SIGKILL the server's group if it is still there after the grace period
            timer = threading.Timer(self.grace_s, _signal_group, (child.pid, signal.SIGKILL))
            timer.daemon = True
            timer.start()

    def run(self) -> int:
        """Returns the exit status once told to stop: 128 + the signal's number."""
        used = 0
        while not self.stop_signal:
            log(f"starting the server (start {used + 1} of {self.restarts + 1}): {' '.join(self.command)}")
            try:
                # preexec_fn: no other thread runs yet while servers are started (the stop timer comes after)
                self.child = subprocess.Popen(self.command, start_new_session=True,
                                              preexec_fn=preexec_die_with_parent)  # noqa: PLW1509
            except OSError as e:  # not even started (a wrong path): as final as any exit
                code, self.child = f"could not start ({e})", None
            else:
                if self.stop_signal:  # asked to stop while it was being started
                    self.request_stop(self.stop_signal)
                code = f"exited with code {self.child.wait()}"
                _signal_group(self.child.pid, signal.SIGKILL)  # workers it left behind
            if self.stop_signal:
                break
            if used >= self.restarts:
                self.give_up(f"{GIVEN_UP}: the server {code}, {self.restarts} restart(s) used")
                break
            used += 1
            log(f"the server {code}; restart {used} of {self.restarts} in {self.delay_s:g} s")
            self._sleep(self.delay_s)
        return 128 + self.stop_signal

    def give_up(self, reason: str) -> None:
        """Answers 503 with `reason` on the server's port until told to stop."""
        log(f"{reason}; serving 503 on port {self.port} until the job ends")
        try:
            server = ThreadingHTTPServer((self.host, self.port), _given_up_handler(reason))
        except OSError as e:  # the port is still held (a worker of the server?): nothing answers then
            log(f"cannot serve port {self.port} ({e}); staying alive without it")
            server = None
        if server is not None:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True, name="given-up").start()
        while not self.stop_signal:
            time.sleep(0.2)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop_signal and time.monotonic() < end:
            time.sleep(min(0.2, max(end - time.monotonic(), 0.0)))


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _given_up_handler(reason: str):
    body = json.dumps({"error": reason}).encode()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args):  # the trainers poll: keep the node's log readable
            pass

    return Handler


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every command of the project
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("python -m launch.supervise: error: the server command goes after `--`", file=sys.stderr)
        return 2
    split = argv.index("--")
    p = _Parser(prog="python -m launch.supervise", description=__doc__.split("\n")[0])
    p.add_argument("--restarts", type=int, required=True, help="restarts before giving the server up")
    p.add_argument("--delay", type=float, default=10.0, help="seconds before a restart (default: %(default)s)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds from SIGTERM to SIGKILL (default: %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="address the given-up answer binds (default: %(default)s)")
    p.add_argument("--port", type=int, required=True, help="the server's port")
    args = p.parse_args(argv[:split])
    for name in ("restarts", "delay", "grace"):
        if not getattr(args, name) >= 0:
            p.error(f"--{name} {getattr(args, name)}: must be >= 0")
    die_with_parent()
    signal.signal(WARNING_SIGNAL, signal.SIG_IGN)  # inherited by the server
    supervisor = Supervisor(argv[split + 1:], restarts=args.restarts, delay_s=args.delay, grace_s=args.grace,
                            host=args.host, port=args.port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, supervisor.request_stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
