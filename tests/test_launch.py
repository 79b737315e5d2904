"""launch/ (NeMo-Run recipes, executors, dry runs), the trainer script it generates, and the Dockerfile.

Every named recipe is dry-run through NeMo-Run's real Slurm/local schedulers, and the generated sbatch
script is read back: node and GPU counts per heterogeneous group, the container, the environment
exported from NeMo-Run's host macros, and the commands. The shell parts are executed, not just read:
the sbatch exports are evaluated with stand-in hostnames, and the trainer script runs with stub
`python` / `torchrun` executables that record what they were called with. The slow test runs the demo
on two CPU ranks through LocalExecutor + torchrun.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch import experiment
from launch.__main__ import main, resolve
from launch.recipes import PAPER_ALGORITHMS, RECIPES
from launch.tasks import SGLANG_PYTHON

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def stdin_at_eof(monkeypatch):
    # NeMo-Run's GitArchivePackager shells out through invoke, which mirrors stdin: pytest's
    # captured stdin refuses to be read. An empty in-memory stream reads as EOF at once; a freshly
    # opened /dev/null would too, but invoke select()s on a real file's descriptor, which fails
    # above 1024 if earlier tests in this process left many open (as leaked actors once did).
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    yield


@pytest.fixture
def cluster(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "account: nft_research\npartition: batch\ncontainer_image: /lustre/images/megatron-nft.sqsh\n"
        "container_mounts: [/lustre/models:/models, /lustre/runs:/runs]\n"
        f"experiments_dir: {tmp_path / 'nemo'}\n"
    )
    return str(path)


def dry(name, cluster, *overrides):
    cfg = resolve(name, cluster, list(overrides))
    return cfg, experiment.dryrun(cfg)


def sbatch_script(text: str) -> str:
    start = text.index("#!/bin/bash")
    end = text.find("#----------------\n# trainer script")
    return text[start:end if end > 0 else None]


def sbatch_groups(script: str) -> list[dict[str, str]]:
    """The #SBATCH flags of each heterogeneous group (one group for an ordinary job)."""
    groups, current = [], {}
    for line in script.splitlines():
        if line == "#SBATCH hetjob":
            groups.append(current)
            current = {}
        elif line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH "):].partition("=")
            current[key] = value
    return groups + [current]


def trainer_script(text: str) -> str:
    return text.split("# trainer script", 1)[1].split("#----------------\n", 1)[1].split("\n\n#----------------")[0]


def server_script(text: str) -> str:
    return text.split("# server script", 1)[1].split("#----------------\n", 1)[1]


def server_command(text: str) -> list[str]:
    """The SGLang command line the server script's supervisor runs (parsed by the shell's rules)."""
    line = next(line for line in server_script(text).splitlines() if SGLANG_PYTHON in line)
    words = shlex.split(line)
    assert words[:3] == ["exec", "python", "-m"] and words[3] == "launch.supervise", line
    return words[words.index("--") + 1:]


def monitor_loop(script: str) -> str:
    """NeMo-Run's loop at the end of the sbatch script that watches the sruns' pids (their 60 s waits
    made 0.2 s)."""
    start = script.index("all_done=false\n")
    end = script.index("\ndone\n", start) + len("\ndone\n")
    return script[start:end].replace("sleep 60", "sleep 0.2")


def expected_paper(name):
    model = "qwen2.5-math-7b" if "math-7b" in name else "qwen2.5-32b"
    hf = "Qwen2.5-Math-7B" if model == "qwen2.5-math-7b" else "Qwen2.5-32B"
    algo = name.split(f"{model}-")[1].removesuffix("-256gpu")
    nodes = {"qwen2.5-math-7b": (4, 4, 1), "qwen2.5-32b": (8, 8, 2)}[model]
    if name.endswith("-256gpu"):
        nodes = (16, 16, 2)
    return model, hf, algo, nodes


PAPER = [n for n in RECIPES if n.startswith("paper/")]


def test_the_paper_runs_are_named_recipes():
    for algo in PAPER_ALGORITHMS:
        for model in ("qwen2.5-math-7b", "qwen2.5-32b"):
            assert f"paper/{model}-{algo}" in RECIPES
            assert (REPO / RECIPES[f"paper/{model}-{algo}"]["train_recipe"]).is_file()
    # 7B on 64 H100, 32B on 128 and 256
    gpus = lambda r: (r["trainer_nodes"] + r["rollout_nodes"]) * r["gpus_per_node"]  # noqa: E731
    assert gpus(RECIPES["paper/qwen2.5-math-7b-nft"]) == 64
    assert gpus(RECIPES["paper/qwen2.5-32b-nft"]) == 128 and gpus(RECIPES["paper/qwen2.5-32b-nft-256gpu"]) == 256


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_dry_run_is_a_heterogeneous_sbatch(name, cluster):
    model, hf, algo, (trainers, servers, rollout_tp) = expected_paper(name)
    cfg, text = dry(name, cluster)
    script = sbatch_script(text)
    groups = sbatch_groups(script)
    assert len(groups) == 1 + servers
    assert [g["--nodes"] for g in groups] == [str(trainers)] + ["1"] * servers
    for g in groups:
        assert g["--gpus-per-node"] == "8" and g["--ntasks-per-node"] == "1" and "--exclusive" in g
        assert g["--account"] == "nft_research" and g["--partition"] == "batch" and g["--time"] == "24:00:00"
    sruns = [line for line in script.splitlines() if line.startswith("srun --het-group")]
    assert [re.search(r"--het-group=(\d+)", s).group(1) for s in sruns] == [str(i) for i in range(1 + servers)]
    for s in sruns:
        assert "--container-image /lustre/images/megatron-nft.sqsh" in s
        assert "/lustre/models:/models,/lustre/runs:/runs" in s
    assert sruns[0].split(" & ")[0].endswith(f"bash /nemo_run/scripts/{cfg.job.name}-0.sh")
    for i, s in enumerate(sruns[1:], start=1):
        assert s.split(" & ")[0].endswith(f"bash /nemo_run/scripts/{cfg.job.name}-{i}.sh")
    server = server_command(text)
    assert server[:14] == [SGLANG_PYTHON, "-m", "sglang.launch_server", "--model-path", f"/models/{hf}", "--host",
                           "0.0.0.0", "--port", "30000", "--tp-size", str(rollout_tp), "--dp-size", str(8 // rollout_tp),
                           "--mem-fraction-static"]
    assert server[15:] == ["--enable-deterministic-inference", "--random-seed", "1234"]
    assert "export HF_HUB_OFFLINE=1" in script

    # the exports, evaluated with stand-in hostnames for the het-group macros
    hosts = "".join(f"het_group_host_{i}=node-{i}\n" for i in range(1 + servers))
    exports = "\n".join(line for line in script.splitlines() if line.startswith("export NFT_"))
    shown = subprocess.run(["bash", "-c", hosts + exports + '\necho "$NFT_TRAINER_HOST|$NFT_ROLLOUT_URLS"'],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert shown == "node-0|" + ",".join(f"http://node-{i}:30000" for i in range(1, 1 + servers))

    trainer = trainer_script(text)
    assert f"torchrun --nnodes={trainers} --nproc-per-node=8" in trainer
    assert f"--recipe recipes/paper/{model}-{algo}.yaml" in trainer
    for arg in (f"model.hf_path=/models/{hf}", f"run.dir=/runs/{cfg.job.name}-{cfg.point}", "rollout.engine=sglang",
                '"rollout.urls=[$NFT_ROLLOUT_URLS]"', "python -m launch.wait_for_servers",
                f"rollout.server_tp_size={rollout_tp}", f"rollout.server_dp_size={8 // rollout_tp}"):
        assert arg in trainer, arg
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # the sbatch script parses


@pytest.mark.parametrize("name", ["local/demo", "local/train", "slurm/train"])
def test_other_recipes_dry_run(name, cluster):
    overrides = [] if name == "local/demo" else ["job.train_recipe=recipes/demo.yaml"]
    cfg, text = dry(name, cluster, *overrides, "job.gpus_per_node=4", "algo.eps=0.5")
    if name.startswith("local/"):
        (command,) = [line for line in text.splitlines() if line.startswith("cd ")]
        assert f"cd {os.getcwd()} && env HF_HUB_OFFLINE=1" in command
        assert "--nnodes 1 --nproc-per-node 4" in command
        tail = command.split("-m megatron_nft.cli ", 1)[1].split()
        if name == "local/demo":
            assert tail == ["demo", "algo.eps=0.5"]
        else:
            assert tail == ["train", "--recipe", str(REPO / "recipes/demo.yaml"), "algo.eps=0.5"]
        return
    script = sbatch_script(text)
    (group,) = sbatch_groups(script)
    assert group["--nodes"] == "1" and group["--gpus-per-node"] == "4" and "hetjob" not in script
    assert "export NFT_TRAINER_HOST=$head_node_ip" in script
    (srun,) = [line for line in script.splitlines() if line.startswith("srun --output")]
    assert "--het-group" not in srun and srun.endswith(f"bash /nemo_run/scripts/{cfg.job.name}.sh")
    trainer = trainer_script(text)
    assert "torchrun --nnodes=1 --nproc-per-node=4" in trainer and "wait_for_servers" not in trainer
    assert (f"train --quiet --recipe recipes/demo.yaml run.dir=/runs/slurm-train-{cfg.point} run.save_every_minutes=60 "
            "algo.eps=0.5") in trainer


STUB_TORCHRUN = """#!/bin/bash
# torchrun's part here: record the arguments, start one training process and fail when it fails
printf "%s\\n" "$@" > {out}/torchrun.args
bash -c 'trap "echo TERM > {out}/worker.signal; exit 75" TERM; touch {out}/worker.ready; while :; do sleep 0.05; done' &
wait $!
code=$?
echo $code > {out}/torchrun.code  # written only if USR1 did not kill this stand-in for torchrun
[ $code -eq 0 ] || exit 1
"""


def _stubs(tmp_path, *, python_sleeps=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "torchrun").write_text(STUB_TORCHRUN.format(out=tmp_path))
    wait = f"touch {tmp_path}/python.ready; while :; do sleep 0.05; done\n" if python_sleeps else ""
    (bin_dir / "python").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/python.args\n{wait}')
    for tool in ("torchrun", "python"):
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "NFT_TRAINER_HOST": "node-0", "SLURM_JOB_ID": "4242",
            "NFT_ROLLOUT_URLS": "http://node-1:30000,http://node-2:30000"}


def _prepare_run_dir(run_dir: Path, run_dir_exists: bool, checkpoint: bool) -> None:
    if run_dir_exists:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text("run: {}\n")
    if checkpoint:
        (run_dir / "checkpoints" / "step_000020").mkdir(parents=True, exist_ok=True)


def _run_trainer_script(text, tmp_path, restarts, run_dir, run_dir_exists, checkpoint=False):
    """Runs the generated trainer script with stub python/torchrun (the stub training process ends on
    its own at once); returns torchrun's and python's arguments."""
    _prepare_run_dir(run_dir, run_dir_exists, checkpoint)
    env = {**_stubs(tmp_path), "SLURM_RESTART_COUNT": str(restarts)}
    # here the stub training process returns at once instead of running until it is told to stop
    (tmp_path / "bin" / "torchrun").write_text(STUB_TORCHRUN.format(out=tmp_path).replace("while :; do sleep 0.05; done", "true"))
    subprocess.run(["bash", "-c", trainer_script(text)], env=env, check=True)
    return (tmp_path / "torchrun.args").read_text().splitlines(), (tmp_path / "python.args").read_text().splitlines()


def test_trainer_script_waits_for_servers_rendezvouses_and_resumes_after_requeue(cluster, tmp_path):
    cfg, text = dry("paper/qwen2.5-math-7b-nft", cluster, f"cluster.runs_dir={tmp_path / 'runs'}", "algo.eps=0.5")
    run_dir = Path(cfg.run_dir)
    args, waited = _run_trainer_script(text, tmp_path, 0, run_dir, run_dir_exists=False)
    assert waited == ["-m", "launch.wait_for_servers", "http://node-1:30000,http://node-2:30000", "--timeout", "3600"]
    assert args[:9] == ["--nnodes=4", "--nproc-per-node=8", "--tee=3", "--rdzv-backend=c10d", "--rdzv-endpoint=node-0:29500",
                        "--rdzv-id=4242", "-m", "megatron_nft.cli", "train"]
    assert "rollout.urls=[http://node-1:30000,http://node-2:30000]" in args and args[-1] != "run.resume=true"
    assert args.index("algo.eps=0.5") > args.index("rollout.engine=sglang")  # the user's overrides come last
    # a requeued job with a checkpoint continues its run; one whose run began but never saved starts that
    # run again (a resume would refuse: nothing to resume); one that never began starts afresh
    args, _ = _run_trainer_script(text, tmp_path, 1, run_dir, run_dir_exists=True, checkpoint=True)
    assert args[-1] == "run.resume=true"
    import shutil

    shutil.rmtree(run_dir / "checkpoints")
    args, _ = _run_trainer_script(text, tmp_path, 1, run_dir, run_dir_exists=True)
    assert args[-1] == "run.overwrite=true" and "run.resume=true" not in args
    (run_dir / "config.yaml").unlink()
    args, _ = _run_trainer_script(text, tmp_path, 1, run_dir, run_dir_exists=False)
    assert "run.resume=true" not in args and "run.overwrite=true" not in args


def _start_and_warn(text, tmp_path, ready: str, *, python_sleeps=False) -> subprocess.CompletedProcess:
    """Starts the trainer script in its own process group, waits for `ready`, then sends SIGUSR1 to
    every process of the group, as slurmstepd signals every process of a job step ahead of the limit."""
    env = {**_stubs(tmp_path, python_sleeps=python_sleeps), "SLURM_RESTART_COUNT": "0"}
    proc = subprocess.Popen(["bash", "-c", trainer_script(text)], env=env, start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / ready).exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the stub never started"
        time.sleep(0.05)
    time.sleep(0.2)  # the script's own trap is set right after the child starts
    os.killpg(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def test_time_limit_warning_stops_the_trainer_with_a_checkpoint_and_requeues(cluster, tmp_path):
    cfg, text = dry("paper/qwen2.5-32b-nft", cluster, f"cluster.runs_dir={tmp_path / 'runs'}")
    script = sbatch_script(text)
    groups = sbatch_groups(script)
    # Slurm warns every step one planned step + a checkpoint + the batch script's two polls ahead
    # (NeMo-Run repeats the job's flags in every het component: the servers get it too, and ignore it)
    assert {g["--signal"] for g in groups} == {f"USR1@{(150 + 5) * 60 + 180}"}
    assert "export TORCHX_MAX_RETRIES=20" in script  # NeMo-Run's requeue on a non-zero exit, up to 20 times
    assert "scontrol requeue" in script
    run_dir = Path(cfg.run_dir)

    # the warning arrives while training: the training process (not torchrun) gets SIGTERM, the
    # script answers 75 when a checkpoint is there (the trainer wrote it after its step) ...
    _prepare_run_dir(run_dir, True, checkpoint=True)
    done = _start_and_warn(text, tmp_path, "worker.ready")
    assert (tmp_path / "worker.signal").read_text().strip() == "TERM"
    assert (tmp_path / "torchrun.code").read_text().strip() == "75"  # torchrun outlived the warning
    assert done.returncode == 75, done.stderr
    # ... and torchrun's own failure code without one (a crash on the way out is not a clean stop)
    for name in ("worker.signal", "worker.ready"):
        (tmp_path / name).unlink()
    import shutil

    shutil.rmtree(run_dir / "checkpoints")
    done = _start_and_warn(text, tmp_path, "worker.ready")
    assert (tmp_path / "worker.signal").exists() and done.returncode == 1, done.stderr
    # the warning arrives while the servers load: stop waiting, 75, the requeued job starts again
    done = _start_and_warn(text, tmp_path, "python.ready", python_sleeps=True)
    assert done.returncode == 75 and "time limit is near before training began" in done.stderr


def test_job_time_must_leave_room_for_the_warning(cluster, capsys):
    assert main(["paper/qwen2.5-32b-nft", "--cluster", cluster, "job.time=02:00:00", "--dryrun"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "job.time=02:00:00: shorter than the stop warning of 9480 s" in err[0]
    # Slurm's other time formats read the same way
    from launch.config import _time_limit_s

    assert [_time_limit_s(t) for t in ("90", "90:30", "1-00", "1-02:03", "1-02:03:04", "24:00:00")] == [
        5400, 5430, 86400, 93780, 93784, 86400]


def test_launch_validates_the_trainer_config_before_generating_anything(cluster, capsys):
    assert main(["paper/qwen2.5-32b-nft", "--cluster", cluster, "--dryrun"]) == 0  # the real paper recipe loads
    capsys.readouterr()
    cases = [
        (["paper/qwen2.5-32b-nft", "--cluster", cluster, "algo.epz=1", "--dryrun"], "unknown key 'algo.epz'"),
        (["paper/qwen2.5-32b-nft", "--cluster", cluster, "job.trainer_nodes=3", "--dryrun"],
         "24 processes is not a multiple of parallel.tp=8 x parallel.pp=2 x parallel.cp=2 = 32"),
        (["paper/qwen2.5-32b-nft", "--cluster", cluster, "cluster.acount=x", "--dryrun"], "unknown key 'cluster.acount'"),
        (["paper/qwen2.5-32b-nft", "--dryrun"], "cluster.account is not set"),
        (["paper/qwen2.5-32b-nft", "--cluster", cluster, "job.rollout_tp=3", "--dryrun"], "job.rollout_tp=3: must divide"),
        (["paper/qwen3-nft", "--dryrun"], "launch recipe 'paper/qwen3-nft' does not exist"),
        (["local/train", "--dryrun"], "job.train_recipe is not set"),
        (["local/demo", "job.rollout_nodes=2", "--dryrun"], "job.rollout_nodes > 0 needs job.executor=slurm"),
        (["local/demo", "job.trainer_nodes=two", "--dryrun"], "job.trainer_nodes"),
        # SGLang takes broadcast weight updates only from --dp-size 1 servers; the paper servers run dp 4
        (["paper/qwen2.5-32b-nft", "--cluster", cluster, "rollout.weight_transport=nccl", "--dryrun"],
         "rollout.weight_transport=nccl: SGLang takes tensor and broadcast weight updates only from --dp-size 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)


def test_list_and_help_read_well(capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(RECIPES) and listed[0].startswith("local/demo")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "paper/qwen2.5-32b-nft" in help_text and "cluster.KEY=VALUE" in help_text


def test_wait_for_servers(tmp_path):
    import http.server
    import threading

    from launch.wait_for_servers import main as wait_main

    answers = iter([503, 503, 200])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(next(answers, 200) if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert wait_main([url, "--timeout", "30", "--poll", "0.05"]) == 0  # healthy on the third try
        closed = "http://127.0.0.1:9"  # discard port: nothing listens
        assert wait_main([f"{url},{closed}", "--timeout", "0.3", "--poll", "0.05"]) == 1
    finally:
        server.shutdown()


@pytest.mark.slow
def test_local_demo_on_two_ranks_through_nemo_run(tmp_path):
    """The demo under NeMo-Run's LocalExecutor + torchrun on two CPU ranks (DP=2), shrunk to one step."""
    run_dir = tmp_path / "demo"
    small = ["warmup.steps=10", "data.n_train=200", "data.n_eval=8", "rollout.prompts_per_step=4",
             "rollout.gen_prompts=8", "rollout.samples_per_prompt=4", "algo.num_minibatches=2", "eval.samples=1",
             "eval.every=0", "run.steps=1"]
    env_path = os.environ["PATH"]
    os.environ["PATH"] = f"{Path(os.sys.executable).parent}:{env_path}"  # torchrun from this environment
    try:
        code = main(["local/demo", f"cluster.experiments_dir={tmp_path / 'nemo'}", "job.gpus_per_node=2",
                     f"run.dir={run_dir}", *small])
    finally:
        os.environ["PATH"] = env_path
    assert code == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    assert (run_dir / "hf" / "config.json").is_file()
    # torchelastic wrote one log directory per worker: two ranks ran
    ranks = {p.parent.name for p in (tmp_path / "nemo").rglob("attempt_0/*/stderr.log")}
    assert ranks == {"0", "1"}


@pytest.mark.parametrize("name", PAPER)
def test_paper_runs_fit_their_gpus_per_the_planner(name, cluster):
    """Each paper launch's training run (its recipe with the launch's trainer arguments, loaded as the
    trainer loads them) fits an H100-80GB on its trainer GPUs by `megatron-nft plan`'s memory model
    (whose formulas tests/test_plan.py checks against measured CPU peaks), through plan.from_config,
    the adapter `megatron-nft plan --recipe` uses: a recipe that cannot start on the cluster is a bug here."""
    from launch.tasks import trainer_arguments
    from megatron_nft import plan as P
    from megatron_nft.config import load_config

    cfg = resolve(name, cluster, [])
    job = cfg.job
    train = load_config(REPO / job.train_recipe, [a for a in trainer_arguments(cfg) if "=" in a and not a.startswith("-")])
    inputs = P.from_config(train, P.Settings(rollout_gpus=job.rollout_nodes * job.gpus_per_node))
    assert inputs.settings.rollout_tp == job.rollout_tp  # the SGLang servers the launch starts
    result = P.plan_layout(inputs.shape, inputs.work, inputs.layout(job.trainer_nodes * job.gpus_per_node), inputs.settings)
    assert result.fits, (str(result.layout), result.problems)


def test_rollout_tp_and_the_trainers_server_tp_size_are_one_value(cluster, tmp_path, capsys):
    def server_tp(cfg):
        from launch.tasks import trainer_arguments

        args = trainer_arguments(cfg)
        values = {int(a.split("=", 1)[1]) for a in args if a.startswith("rollout.server_tp_size=")}
        assert len(values) == 1, args  # the launch's and a user's override, if any, agree
        return cfg.job.rollout_tp, values.pop()

    # the launch recipe's job.rollout_tp reaches the trainer
    assert server_tp(resolve("paper/qwen2.5-32b-nft", cluster, [])) == (2, 2)
    # unset, it is what the training recipe states, or a trainer override
    recipe = tmp_path / "tp4.yaml"
    recipe.write_text(f"base: {REPO / 'recipes/paper/qwen2.5-math-7b-nft.yaml'}\nrollout:\n  server_tp_size: 4\n")
    assert server_tp(resolve("slurm/one-node", cluster, [f"job.train_recipe={recipe}"])) == (4, 4)
    one_node = ["job.train_recipe=recipes/paper/qwen2.5-math-7b-nft.yaml"]
    assert server_tp(resolve("slurm/one-node", cluster, [*one_node, "rollout.server_tp_size=2"])) == (2, 2)
    assert server_tp(resolve("slurm/one-node", cluster, one_node)) == (1, 1)
    # two different values are one line, before anything is generated
    for argv, stated in ((["paper/qwen2.5-32b-nft", "rollout.server_tp_size=4"], 4),
                         (["slurm/one-node", f"job.train_recipe={recipe}", "job.rollout_tp=2"], 4)):
        assert main([*argv, "--cluster", cluster, "--dryrun"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"rollout.server_tp_size={stated} (training recipe" in err[0], err
        assert "both are the SGLang servers' TP; give one value" in err[0]


def test_a_server_given_up_does_not_end_the_job(cluster, tmp_path):
    """NeMo-Run's batch script ends the job a minute after any srun exits; the server's srun runs
    launch.supervise, which restarts the server job.server_restarts times and then stays (answering
    503): the job ends when the trainers' srun does, with their exit code."""
    from launch.supervise import GIVEN_UP
    from megatron_nft.runtime import free_port

    _, text = dry("paper/qwen2.5-math-7b-nft", cluster, "job.server_restarts=2",
                  'job.server_args=["--max-running-requests","256"]', "job.rollout_seed=7")
    assert server_command(text)[-4:] == ["--random-seed", "7", "--max-running-requests", "256"]
    server = server_script(text)
    assert "trap '' USR1" in server  # Slurm's time-limit warning is the trainers'
    assert "exec python -m launch.supervise --restarts 2 --delay 10 --port 30000 -- " in server
    script = sbatch_script(text)
    monitor = monitor_loop(script)
    assert "kill -9" in monitor  # what ends every other srun once one has exited

    def job(trainer: str, server: str) -> tuple[subprocess.CompletedProcess, float]:
        """The sruns as local background processes, watched by the dry run's own monitor loop."""
        body = f"set +e\n{trainer} & pids[0]=$!\n{server} & pids[1]=$!\n{monitor}echo \"job exited with code $exitcode\"\n"
        begin = time.monotonic()
        done = subprocess.run(["bash", "-c", body], check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"})
        return done, time.monotonic() - begin

    # what the supervisor must avoid: a server's srun that exits ends the job, trainers and all
    done, seconds = job("sleep 30", "sh -c 'exit 3'")
    assert done.stdout.strip().endswith("job exited with code 3") and "Killing process" in done.stdout
    assert seconds < 10

    # the generated server script with a stand-in SGLang that exits at once, on a free port
    stub = tmp_path / "sglang"
    stub.write_text(f"#!/bin/sh\necho start >> {tmp_path}/starts\nexit 3\n")
    stub.chmod(0o755)
    (tmp_path / "server.sh").write_text(
        server.replace(SGLANG_PYTHON, str(stub)).replace("--delay 10", "--delay 0").replace("--port 30000", f"--port {free_port()}"))
    log = tmp_path / "server.log"
    # the trainers finish (exit 75: stopped with a checkpoint) a second after the server was given up
    trainer = f"sh -c 'until grep -q \"{GIVEN_UP}\" {log} 2>/dev/null; do sleep 0.1; done; sleep 1; exit 75'"
    done, seconds = job(trainer, f"bash {tmp_path / 'server.sh'} 2> {log}")
    pids = dict(re.findall(r"Process (\d+) exited with code (\d+)", done.stdout))
    assert len(pids) == 1 and list(pids.values()) == ["75"], done.stdout  # the trainers' srun ended the job
    assert done.stdout.strip().endswith("job exited with code 75")
    assert re.search(r"Killing process \d+", done.stdout)  # the supervisor, still there
    assert (tmp_path / "starts").read_text().count("start") == 3
    assert f"{GIVEN_UP}: the server exited with code 3, 2 restart(s) used" in log.read_text()
    assert seconds < 30


def test_cluster_environment_secrets_and_logs(cluster, tmp_path, monkeypatch, capsys):
    secret = "s3cret-value-never-written"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    cfg, text = dry("paper/qwen2.5-math-7b-nft", cluster, "cluster.secret_env=[WANDB_API_KEY]",
                    "cluster.network_interface=ib0", "cluster.local_cache_dir=/local", "run.wandb_project=nft")
    script = sbatch_script(text)
    assert secret not in text
    sruns = [line for line in script.splitlines() if line.startswith("srun --het-group")]
    for s in sruns:
        assert "--container-env WANDB_API_KEY" in s and "--no-container-mount-home" in s
    assert "--label" in sruns[0].split(" & ")[0] and "--label" not in sruns[1]  # 4 nodes x 8 ranks, one log
    hosts = "SLURM_JOB_ID=77\n"
    exports = "\n".join(line for line in script.splitlines() if line.startswith("export "))
    shown = subprocess.run(["bash", "-c", hosts + exports + "\nenv"], capture_output=True, text=True, check=True,
                           env={"PATH": "/usr/bin:/bin"}).stdout
    env = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "ib0"
    for key, sub in (("TRITON_CACHE_DIR", "triton"), ("FLASHINFER_WORKSPACE_BASE", "flashinfer"),
                     ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("XDG_CACHE_HOME", "xdg")):
        assert env[key] == f"/local/megatron-nft-77/{sub}", key
    assert "WANDB_API_KEY" not in env
    assert "run.wandb_project=nft" in trainer_script(text)
    # a credential by value, or W&B without its key, stops the launch in one line
    cases = [
        (["cluster.env={WANDB_API_KEY: abc}"], "cluster.env.WANDB_API_KEY: a credential's value would be written"),
        (["run.wandb_project=nft"], "run.wandb_project=nft: W&B needs its key on the nodes"),
        (["cluster.secret_env=[HF_TOKEN]"], "cluster.secret_env: HF_TOKEN not set in this environment"),
    ]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("launch.experiment.submit", lambda *a, **k: pytest.fail("submitted"))
    for overrides, message in cases:
        dry_flag = [] if "HF_TOKEN" in overrides[0] else ["--dryrun"]
        assert main(["paper/qwen2.5-math-7b-nft", "--cluster", cluster, *overrides, *dry_flag]) == 2, overrides
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (overrides, err)


def test_one_node_recipes_keep_trainer_and_server_gpus_apart(cluster):
    from megatron_nft.config import load_config
    from megatron_nft.rollout.servers import gpu_groups

    recipe = "recipes/paper/qwen2.5-math-7b-nft.yaml"
    cfg, text = dry("slurm/one-node", cluster, f"job.train_recipe={recipe}")
    script = sbatch_script(text)
    (group,) = sbatch_groups(script)
    assert group["--nodes"] == "1" and group["--gpus-per-node"] == "8" and "hetjob" not in script
    trainer = trainer_script(text)
    assert "torchrun --nnodes=1 --nproc-per-node=4 " in trainer and "wait_for_servers" not in trainer
    args = shlex.split(trainer.split("set -- ", 1)[1].splitlines()[0])
    assert f"rollout.sglang_python={SGLANG_PYTHON}" in args
    # the trainer's own config loader and server placement accept the split: 4 ranks on GPUs 0-3, four
    # TP1 servers on 4-7 (gpu_groups refuses any overlap with the trainer's local ranks)
    train = load_config(REPO / recipe, [a for a in args if "=" in a and not a.startswith("run.dir")])
    r = train.rollout
    assert r.engine == "sglang" and not r.urls and r.server_dp_size == 1
    visible = "0,1,2,3,4,5,6,7"
    assert gpu_groups(r.num_servers, r.server_tp_size, trainer_gpus=4, server_gpus=r.server_gpus,
                      visible=visible) == ["4", "5", "6", "7"]
    assert r.server_args == ["--random-seed", "1234"]
    # TP2 servers: two of them on the same four GPUs
    _, text = dry("slurm/one-node", cluster, f"job.train_recipe={recipe}", "job.rollout_tp=2")
    args = shlex.split(trainer_script(text).split("set -- ", 1)[1].splitlines()[0])
    r = load_config(REPO / recipe, [a for a in args if "=" in a and not a.startswith("run.dir")]).rollout
    assert gpu_groups(r.num_servers, r.server_tp_size, trainer_gpus=4, server_gpus=r.server_gpus,
                      visible=visible) == ["4,5", "6,7"]
    # locally (a GPU workstation): the same split under NeMo-Run's torchrun
    _, text = dry("local/one-node", cluster, f"job.train_recipe={recipe}")
    (command,) = [line for line in text.splitlines() if line.startswith("cd ")]
    assert "--nnodes 1 --nproc-per-node 4" in command and "rollout.server_gpus=[4,5,6,7]" in command
    assert "rollout.sglang_python" not in command


def test_single_allocation_variant_of_the_paper_runs(cluster):
    cfg, text = dry("paper/qwen2.5-math-7b-nft", cluster, "job.allocation=single")
    script = sbatch_script(text)
    (group,) = sbatch_groups(script)
    assert group["--nodes"] == "8" and "hetjob" not in script and "--het-group" not in script
    sruns = [line.split(" & ")[0] for line in script.splitlines() if line.startswith("srun --output")]
    assert "--nodes=4 --ntasks=4 --relative=4" in sruns[0] and sruns[0].endswith(f"{cfg.job.name}-0.sh")
    for i, s in enumerate(sruns[1:]):
        assert f"--nodes=1 --ntasks=1 --relative={i}" in s  # the first four nodes serve
    nodes = "nodes=(n0 n1 n2 n3 n4 n5 n6 n7)\n"
    exports = "\n".join(line for line in script.splitlines() if line.startswith("export NFT_"))
    shown = subprocess.run(["bash", "-c", nodes + exports + '\necho "$NFT_TRAINER_HOST|$NFT_ROLLOUT_URLS"'],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert shown == "n4|" + ",".join(f"http://n{i}:30000" for i in range(4))
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_sweep_points_get_their_own_run_directories(cluster, capsys):
    from launch.__main__ import sweep_points

    assert sweep_points(["a.b=1,2", "job.x=[1,2],[3]"]) == [
        ["a.b=1", "job.x=[1,2]"], ["a.b=1", "job.x=[3]"], ["a.b=2", "job.x=[1,2]"], ["a.b=2", "job.x=[3]"]]
    assert main(["paper/qwen2.5-math-7b-nft", "--cluster", cluster, "--dryrun",
                 "--sweep", "rollout.max_new_tokens=1024,2048", "--sweep", "job.trainer_nodes=4,8"]) == 0
    out = capsys.readouterr().out
    dirs = re.findall(r"^# run directory: (\S+)$", out, flags=re.M)
    assert len(dirs) == 4 == len(set(dirs)) and all(d.startswith("/runs/paper-qwen2.5-math-7b-nft-") for d in dirs)
    assert len(re.findall(r"^sbatch --requeue", out, flags=re.M)) == 4
    # the same configuration lands in the same directory; resuming or saving more often is the same run
    same = [resolve("paper/qwen2.5-math-7b-nft", cluster, o).run_dir for o in
            (["rollout.max_new_tokens=1024"], ["rollout.max_new_tokens=1024", "run.resume=true", "run.save_every=5"])]
    assert same[0] == same[1] and same[0] in dirs
    # every point is checked before anything is generated
    assert main(["paper/qwen2.5-math-7b-nft", "--cluster", cluster, "--dryrun", "--sweep", "algo.eps=0.5,x"]) == 2
    assert "algo.eps" in capsys.readouterr().err
    assert main(["paper/qwen2.5-math-7b-nft", "--cluster", cluster, "--dryrun", "--sweep", "cluster.qos=a,b"]) == 2
    assert "--sweep 'cluster.qos=a,b': expected KEY=V1,V2" in capsys.readouterr().err


def _timed_saves_worker(rank, world_size):
    from megatron_nft import runtime
    from megatron_nft.checkpointing import TimedSaves

    runtime.init_process_group()
    now = [0.0]
    minutes_per_step = (4.0, 1.0)[rank]  # rank 0's steps look longer: its clock decides first
    saves = TimedSaves(10.0, clock=lambda: now[0] * 60.0)
    saved_at = []
    for step in range(1, 9):
        now[0] += minutes_per_step
        if saves.due():
            saves.saved()
            saved_at.append(step)
    return saved_at


def test_checkpoints_by_wall_time_are_agreed_by_every_rank():
    from megatron_nft.testing import run_distributed
    from megatron_nft.checkpointing import TimedSaves

    # the reference: rank 0's clock alone passes 10 minutes at steps 3 (12 min) and 6 (24 min)
    assert run_distributed(_timed_saves_worker, 2) == [[3, 6], [3, 6]]
    never = TimedSaves(0.0, clock=lambda: 1e9)
    assert not never.due()


FAKE_WANDB = '''
import json, os
_path = os.path.join(os.environ["FAKE_WANDB_OUT"], "wandb.jsonl")
class _Run:
    def log(self, data, step=None):
        with open(_path, "a") as f:
            f.write(json.dumps({"step": step, "keys": sorted(data)}) + "\\n")
    def finish(self):
        pass
def init(project=None, dir=None, **_):
    with open(_path, "a") as f:
        f.write(json.dumps({"init": project}) + "\\n")
    return _Run()
'''


@pytest.mark.slow
def test_wall_time_checkpoints_and_wandb_in_a_real_run(tmp_path):
    """The loop saves on wall time alone (save_every=0: without run.save_every_minutes only the last step
    would be saved) and logs to W&B when run.wandb_project is set (a stand-in wandb module records it)."""
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "wandb.py").write_text(FAKE_WANDB)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(fake), "FAKE_WANDB_OUT": str(tmp_path)}
    small = ["warmup.steps=10", "data.n_train=100", "data.n_eval=4", "data.max_operand=9", "model.hidden_size=32",
             "model.num_layers=1", "model.intermediate_size=64", "rollout.prompts_per_step=4", "rollout.gen_prompts=8",
             "rollout.samples_per_prompt=2", "algo.num_minibatches=1", "eval.samples=1", "eval.every=0", "run.steps=3",
             "reward.workers=1", "run.save_every=0", "run.save_every_minutes=0.0001", "run.wandb_project=nft-test"]
    import sys

    subprocess.run([sys.executable, "-m", "megatron_nft.cli", "demo", "--quiet", f"run.dir={run_dir}", *small],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [f"step_00000{i}" for i in (1, 2, 3)]
    records = [json.loads(line) for line in (tmp_path / "wandb.jsonl").read_text().splitlines()]
    assert records[0] == {"init": "nft-test"} and [r["step"] for r in records[1:]] == [0, 1, 2, 3]
