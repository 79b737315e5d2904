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
import subprocess
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
    return text.split("# trainer script", 1)[1].split("#----------------\n", 1)[1]


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
    for s in sruns[1:]:
        assert (f"{SGLANG_PYTHON} -m sglang.launch_server --model-path /models/{hf} --host 0.0.0.0 --port 30000 "
                f"--tp-size {rollout_tp} --dp-size {8 // rollout_tp}") in s
        assert s.split(" & ")[0].split("--mem-fraction-static ")[1].split()[1] == "--enable-deterministic-inference"
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
    for arg in (f"model.hf_path=/models/{hf}", f"run.dir=/runs/{cfg.job.name}", "rollout.engine=sglang",
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
    assert "train --quiet --recipe recipes/demo.yaml run.dir=/runs/slurm-train algo.eps=0.5" in trainer


def _run_trainer_script(text, tmp_path, restarts, run_dir_exists, checkpoint=False):
    """Runs the generated trainer script with stub python/torchrun; returns torchrun's arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("python", "torchrun"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/{tool}.args\n')
        stub.chmod(0o755)
    run_dir = tmp_path / "runs" / "paper-qwen2.5-math-7b-nft"
    if run_dir_exists:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text("run: {}\n")
    if checkpoint:
        (run_dir / "checkpoints" / "step_000020").mkdir(parents=True, exist_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "NFT_TRAINER_HOST": "node-0", "SLURM_JOB_ID": "4242",
           "NFT_ROLLOUT_URLS": "http://node-1:30000,http://node-2:30000", "SLURM_RESTART_COUNT": str(restarts)}
    subprocess.run(["bash", "-c", trainer_script(text)], env=env, check=True)
    return (tmp_path / "torchrun.args").read_text().splitlines(), (tmp_path / "python.args").read_text().splitlines()


def test_trainer_script_waits_for_servers_rendezvouses_and_resumes_after_requeue(cluster, tmp_path):
    _, text = dry("paper/qwen2.5-math-7b-nft", cluster, f"cluster.runs_dir={tmp_path / 'runs'}", "algo.eps=0.5")
    args, waited = _run_trainer_script(text, tmp_path, restarts=0, run_dir_exists=False)
    assert waited == ["-m", "launch.wait_for_servers", "http://node-1:30000,http://node-2:30000", "--timeout", "3600"]
    assert args[:8] == ["--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node-0:29500",
                        "--rdzv-id=4242", "-m", "megatron_nft.cli", "train"]
    assert "rollout.urls=[http://node-1:30000,http://node-2:30000]" in args and args[-1] != "run.resume=true"
    assert args.index("algo.eps=0.5") > args.index("rollout.engine=sglang")  # the user's overrides come last
    # a requeued job with a checkpoint continues its run; one whose run began but never saved starts that
    # run again (a resume would refuse: nothing to resume); one that never began starts afresh
    args, _ = _run_trainer_script(text, tmp_path, restarts=1, run_dir_exists=True, checkpoint=True)
    assert args[-1] == "run.resume=true"
    import shutil

    shutil.rmtree(tmp_path / "runs" / "paper-qwen2.5-math-7b-nft" / "checkpoints")
    args, _ = _run_trainer_script(text, tmp_path, restarts=1, run_dir_exists=True)
    assert args[-1] == "run.overwrite=true" and "run.resume=true" not in args
    (tmp_path / "runs" / "paper-qwen2.5-math-7b-nft" / "config.yaml").unlink()
    args, _ = _run_trainer_script(text, tmp_path, restarts=1, run_dir_exists=False)
    assert "run.resume=true" not in args and "run.overwrite=true" not in args


def test_launch_validates_the_trainer_config_before_generating_anything(cluster, capsys):
    assert main(["paper/qwen2.5-32b-nft", "--cluster", cluster, "--dryrun"]) == 0  # the real paper recipe loads
    capsys.readouterr()
    cases = [
        (["paper/qwen2.5-32b-nft", "--cluster", cluster, "algo.epz=1", "--dryrun"], "unknown key 'algo.epz'"),
        (["paper/qwen2.5-32b-nft", "--cluster", cluster, "job.trainer_nodes=3", "--dryrun"],
         "24 processes is not divisible by parallel.tp x pp x cp = 32"),
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


def test_dockerfile_pins_agree_with_pyproject_and_it_runs_the_smoke_test():
    import tomllib

    dockerfile = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, flags=re.M))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for req in project["dependencies"] + project["optional-dependencies"]["launch"]:
        name, _, version = req.partition("==")
        pins[name.split("[")[0]] = version
    assert args["MEGATRON_CORE_VERSION"] == pins["megatron-core"]
    assert args["NEMO_RUN_VERSION"] == pins["nemo-run"] and args["LEPTONAI_VERSION"] == pins["leptonai"]
    assert args["MATH_VERIFY_VERSION"] == pins["math-verify"]
    assert args["BASE_IMAGE"].startswith("nvcr.io/nvidia/pytorch:")
    assert "RUN bash /opt/megatron-nft/docker/smoke.sh" in dockerfile
    assert f"{Path(SGLANG_PYTHON).parent.parent}" in dockerfile  # the SGLang venv the launcher runs
    smoke = (REPO / "docker" / "smoke.sh").read_text()
    for check in ("megatron-nft --help", "import transformer_engine.pytorch", "import sglang"):
        assert check in smoke
    subprocess.run(["bash", "-n", str(REPO / "docker" / "smoke.sh")], check=True)


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
def test_paper_runs_fit_their_gpus_per_the_planner(name):
    """Each paper launch's training layout (its train recipe's parallel settings on its trainer GPUs)
    fits an H100-80GB by `megatron-nft plan`'s memory model (whose formulas tests/test_plan.py checks
    against measured CPU peaks): a recipe that cannot start on the cluster is a bug here."""
    from megatron_nft import plan as P
    from megatron_nft.config import load_config

    job = RECIPES[name]
    cfg = load_config(REPO / job["train_recipe"])
    p = cfg.parallel
    gpus = job["trainer_nodes"] * job["gpus_per_node"]
    assert gpus % (p.tp * p.pp * p.cp) == 0
    layout = P.Layout(tp=p.tp, pp=p.pp, cp=p.cp, dp=gpus // (p.tp * p.pp * p.cp), recompute=p.recompute)
    seq = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    work = P.Workload(
        prompt_len=cfg.data.max_prompt_len, response_len=cfg.rollout.max_new_tokens,
        prompts_per_step=cfg.rollout.prompts_per_step, samples_per_prompt=cfg.rollout.samples_per_prompt,
        num_minibatches=cfg.algo.num_minibatches,
        micro_batch_tokens=p.max_tokens_per_micro_batch or p.micro_batch_size * seq,
    )
    settings = P.Settings(fp8=cfg.model.fp8 is not None, rollout_gpus=job["rollout_nodes"] * job["gpus_per_node"],
                          rollout_tp=job["rollout_tp"])
    result = P.plan_layout(P.model_shape(cfg.model.hf_path.rsplit("/", 1)[1]), work, layout, settings)
    assert result.fits, (str(layout), result.problems)
