"""Launching rollout servers as child processes: SGLang's (GPU) or the local HTTP server (CPU).

    cmd = sglang_command(model_path, port=30000, tp_size=2, mem_fraction_static=0.8)
    servers = launch_servers([cmd_0, cmd_1], log_dir, env_per_server=[{"CUDA_VISIBLE_DEVICES": "0,1"}, ...])

Each server gets its own log file (its output is what explains a failed start) and its own process
group, so that stopping it also stops the workers it spawned (SGLang's scheduler and detokenizer).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_nft.errors import ConfigError
from megatron_nft.parent_death import preexec_die_with_parent
from megatron_nft.runtime import free_port


def _flags(**values) -> list[str]:
    """`--name value` for each value that is not None (underscores become dashes)."""
    out: list[str] = []
    for name, value in values.items():
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


# SGLang uses a request's sampling_seed only with this flag (sampling_batch_info): without it, a
# resumed run would not re-draw the answers of the run it continues.
DETERMINISTIC_FLAG = "--enable-deterministic-inference"


def sglang_command(model_path: str, *, port: int, host: str = "127.0.0.1", tp_size: int = 1, dp_size: int = 1,
                   mem_fraction_static: float | None = None, dtype: str | None = None, load_format: str | None = None,
                   random_seed: int | None = None, deterministic: bool = True, extra_args: list[str] = (),
                   python: str = sys.executable) -> list[str]:
    """`python -m sglang.launch_server ...` for one server (flag names of sglang 0.5.23)."""
    for name, value in (("tp_size", tp_size), ("dp_size", dp_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if mem_fraction_static is not None and not 0 < mem_fraction_static < 1:
        raise ValueError(f"mem_fraction_static must be in (0, 1), got {mem_fraction_static!r}")
    flags = _flags(model_path=model_path, host=host, port=port, tp_size=tp_size, dp_size=dp_size if dp_size > 1 else None,
                   mem_fraction_static=mem_fraction_static, dtype=dtype, load_format=load_format, random_seed=random_seed)
    return [python, "-m", "sglang.launch_server", *flags, *([DETERMINISTIC_FLAG] if deterministic else []),
            *map(str, extra_args)]


def local_server_command(model_path: str, *, port: int, host: str = "127.0.0.1", load_format: str | None = None,
                         random_seed: int | None = None, threads: int | None = None, tp_size: int | None = None,
                         dp_size: int | None = None, deterministic: bool = True, extra_args: list[str] = (),
                         python: str = sys.executable) -> list[str]:
    """The local HTTP server (megatron_nft.rollout.http_server), with SGLang's flag names."""
    flags = _flags(model_path=model_path, host=host, port=port, load_format=load_format, random_seed=random_seed,
                   threads=threads, tp_size=tp_size, dp_size=dp_size)
    return [python, "-m", "megatron_nft.rollout.http_server", *flags, *([DETERMINISTIC_FLAG] if deterministic else []),
            *map(str, extra_args)]


def gpu_groups(num_servers: int, tp_size: int, *, trainer_gpus: int, server_gpus: list[int] = (),
               visible: str | None = None) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each server: consecutive groups of `tp_size` devices that the
    trainer does not use.

    Devices are counted as this process sees them (positions in CUDA_VISIBLE_DEVICES when it is
    set); the trainer's local ranks 0..trainer_gpus-1 use the first `trainer_gpus`. `server_gpus`
    (rollout.server_gpus) names the servers' devices; empty: the devices after the trainer's.
    """
    devices = (visible if visible is not None else os.environ.get("CUDA_VISIBLE_DEVICES", "")).split(",")
    devices = [d.strip() for d in devices if d.strip()]
    if not devices:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]
    need = num_servers * tp_size
    chosen = list(server_gpus) or list(range(trainer_gpus, trainer_gpus + need))
    shown = f"rollout.server_gpus={list(server_gpus)}" if server_gpus else f"the GPUs after the trainer's {trainer_gpus}"
    if len(chosen) != need:
        raise ConfigError(f"{shown}: {num_servers} server(s) x tp_size {tp_size} need {need} GPUs, {len(chosen)} given")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"{shown}: a GPU is listed twice")
    for gpu in chosen:
        if gpu < trainer_gpus:
            raise ConfigError(f"{shown}: GPU {gpu} is used by trainer local rank {gpu} ({trainer_gpus} trainer "
                              f"process(es) on this node use GPUs 0..{trainer_gpus - 1}); give the servers other GPUs")
        if not 0 <= gpu < len(devices):
            raise ConfigError(f"{shown}: GPU {gpu} does not exist ({len(devices)} visible: 0..{len(devices) - 1})")
    return [",".join(devices[g] for g in chosen[i * tp_size : (i + 1) * tp_size]) for i in range(num_servers)]


@dataclass
class ServerProcess:
    """A launched server: its URL, process and log file."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def check_alive(self) -> None:
        """Raises RuntimeError with the end of the log when the process has exited."""
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"rollout server {self.url} exited with code {code}; last log lines:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL if it has not exited after `timeout_s`."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server process (and its group) at once: a crash, as far as clients can tell."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def launch_server(cmd: list[str], url: str, log_path: str | Path, env: dict | None = None) -> ServerProcess:
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # Its own session (stop() signals the whole group); killed by the kernel if this process dies
        # (even by SIGKILL): call from the main thread, which lives as long as the servers should.
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                   start_new_session=True, preexec_fn=preexec_die_with_parent)
    return ServerProcess(url=url, process=process, log_path=log_path)


def launch_servers(commands: list[tuple[list[str], str]], log_dir: str | Path, envs: list[dict] | None = None) -> list[ServerProcess]:
    """Starts every (command, url) pair; on a failure to start, the ones already started are stopped."""
    started: list[ServerProcess] = []
    try:
        for i, (cmd, url) in enumerate(commands):
            started.append(launch_server(cmd, url, Path(log_dir) / f"server_{i}.log", envs[i] if envs else None))
    except BaseException:
        for s in started:
            s.stop()
        raise
    return started


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on this host."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports
