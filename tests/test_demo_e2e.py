"""The demo end to end on a shrunken budget: every artefact a run promises, and the loop's invariants."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_nft.cli import main

pytestmark = pytest.mark.slow

SMALL = [
    "warmup.steps=40",
    "warmup.lr=3e-3",
    "data.n_train=600",
    "data.n_eval=24",
    "data.max_operand=9",
    "rollout.prompts_per_step=8",
    "rollout.gen_prompts=16",
    "rollout.samples_per_prompt=4",
    "algo.num_minibatches=2",
    "eval.samples=2",
    "eval.every=0",
    "--quiet",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", f"run.dir={run}", "run.steps=2", *SMALL]) == 0
    return run


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_artefacts(demo_run):
    assert (demo_run / "curves.png").stat().st_size > 1000
    assert (demo_run / "config.yaml").is_file()
    assert (demo_run / "checkpoints" / "step_000002" / "manifest.json").is_file()
    assert not list((demo_run / "checkpoints").glob("*.tmp"))
    assert list((demo_run / "tensorboard").iterdir())
    metrics = rows(demo_run)
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[-1]


def test_loop_invariants(demo_run):
    for m in rows(demo_run)[1:]:
        if m.get("actor/minibatches"):
            # NFT's loss is exactly zero on the first minibatch (R = 1)
            assert m["actor/loss_first_minibatch"] == pytest.approx(0.0, abs=1e-7)
            # the rollout engine got the actor's weights through the HF mapping: same log-probs
            assert m["actor/rollout_logprob_abs_diff"] < 1e-4
        assert m["rollout/groups_kept"] <= 8


def test_hf_export_loads_in_transformers_and_matches_the_checkpoint(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_run / "hf").eval()
    tok = AutoTokenizer.from_pretrained(demo_run / "hf")
    ids = torch.tensor([tok.encode("What is 3 + 4?")])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_refuses_to_overwrite_then_resumes(demo_run, capsys):
    before = (demo_run / "metrics.jsonl").read_text()
    assert main(["demo", f"run.dir={demo_run}", "run.steps=3", *SMALL]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (demo_run / "metrics.jsonl").read_text() == before
    assert main(["demo", f"run.dir={demo_run}", "run.steps=3", "run.resume=true", *SMALL]) == 0
    metrics = rows(demo_run)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert (demo_run / "checkpoints" / "step_000003" / "manifest.json").is_file()


def test_train_starts_from_a_converted_megatron_checkpoint(demo_run, tmp_path):
    """HF base -> checkpoints_tools.hf_to_megatron -> `megatron-nft train model.megatron_ckpt=...`:
    the actor starts from the converted weights, and the rollout engine (fed by the actor's HF export)
    reproduces the actor's log-probs, so the conversion and both mappings agree."""
    from checkpoints_tools import hf_to_megatron

    converted = tmp_path / "mcore"
    assert hf_to_megatron.main(["--hf", str(demo_run / "base"), "--out", str(converted)]) == 0
    run = tmp_path / "from_mcore"
    code = main(
        ["train", "--recipe", str(demo_run / "config.yaml"), f"model.hf_path={demo_run / 'base'}",
         f"model.megatron_ckpt={converted}", f"run.dir={run}", "run.steps=1", "run.resume=false", "--quiet"]
    )
    assert code == 0
    first, step1 = rows(run)[:2]
    assert first["eval/accuracy"] == rows(demo_run)[0]["eval/accuracy"]  # same starting policy
    assert step1["actor/rollout_logprob_abs_diff"] < 1e-4


def test_train_through_the_sglang_http_client_on_local_servers(demo_run, tmp_path):
    """rollout.engine=local_http: the trainer drives two server processes through the SGLang client
    code path (HTTP /generate, weight sync by disk + /update_weights_from_disk, version stamps); the
    servers start from dummy weights, so equal log-probs prove the actor's weights reached them."""
    run = tmp_path / "http"
    code = main(
        ["train", "--recipe", str(demo_run / "config.yaml"), f"model.hf_path={demo_run / 'base'}", f"run.dir={run}",
         "run.steps=1", "run.resume=false", "rollout.engine=local_http", "rollout.num_servers=2", "--quiet"]
    )
    assert code == 0
    step1 = rows(run)[1]
    assert step1["actor/rollout_logprob_abs_diff"] < 1e-4
    assert step1["rollout/groups_kept"] > 0
    assert not list(run.glob("weight_sync/*"))  # staged weights are cleaned up


def test_eval_command_writes_a_resumable_table(demo_run, tmp_path, capsys):
    bench = tmp_path / "arith.jsonl"
    bench.write_text("".join(json.dumps({"q": f"What is {a} + {b}?", "a": str(a + b)}) + "\n" for a, b in [(1, 2), (3, 4), (5, 1)]))
    out = tmp_path / "eval"
    argv = ["eval", "--hf", str(demo_run / "hf"), "--benchmarks", str(bench), "--out", str(out), "--samples", "2",
            "--template", "dapo", "--max-new-tokens", "8", "--problem-field", "q", "--answer-field", "a", "--quiet"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "arith.jsonl").read_text().splitlines()]
    assert [len(r["scores"]) for r in records] == [2, 2, 2]
    table = (out / "results.md").read_text()
    mean = sum(sum(r["scores"]) for r in records) / 6
    assert "arith" in table and f"{100 * mean:.1f}" in table
    before = (out / "arith.jsonl").read_text()
    assert main(argv) == 0  # resumed: nothing regenerated, nothing rewritten
    assert (out / "arith.jsonl").read_text() == before
    capsys.readouterr()
    # a problem longer than the demo model's context: one clear line
    aime = tmp_path / "aime24.jsonl"
    aime.write_text(json.dumps({"id": 1, "problem": "Find the number of ordered pairs " * 400, "answer": "7"}) + "\n")
    assert main(["eval", "--hf", str(demo_run / "hf"), "--benchmarks", str(aime), "--out", str(tmp_path / "e2"),
                 "--max-new-tokens", "8", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aime24" in err[0]


def test_eval_through_http_servers_equals_the_local_engine(demo_run, tmp_path):
    """`megatron-nft eval --engine local_http`: launched server processes behind SGLang's API, weights
    pushed from --hf, the same answers as the in-process engine at (near-)greedy sampling."""
    bench = tmp_path / "arith.jsonl"
    bench.write_text("".join(json.dumps({"q": f"What is {a} + {b}?", "a": str(a + b)}) + "\n" for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]))
    common = ["--hf", str(demo_run / "hf"), "--benchmarks", str(bench), "--samples", "2", "--template", "dapo",
              "--max-new-tokens", "8", "--problem-field", "q", "--answer-field", "a", "--temperature", "0.001", "--quiet"]
    assert main(["eval", *common, "--out", str(tmp_path / "local")]) == 0
    assert main(["eval", *common, "--out", str(tmp_path / "http"), "--engine", "local_http", "--num-servers", "2"]) == 0
    local, http = ([json.loads(line) for line in (tmp_path / d / "arith.jsonl").read_text().splitlines()] for d in ("local", "http"))
    assert [(r["id"], r["responses"], r["scores"]) for r in http] == [(r["id"], r["responses"], r["scores"]) for r in local]
    assert (tmp_path / "http" / "results.md").read_text().split("\n", 1)[1] == (tmp_path / "local" / "results.md").read_text().split("\n", 1)[1]
    assert list((tmp_path / "http" / "rollout_servers").glob("*.log"))
    assert not list((tmp_path / "http").glob("weight_sync/*"))  # staged weights cleaned up
