"""Nothing lost, nothing executed: run directories, resumes and checkpoints against hostile input.

One short real run (two steps, a checkpoint each) is made once; every case works on a copy of it and
asserts one error line (or the right fall-back) and that every input and every earlier output is
byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest

from helpers import tiny_hf_checkpoint
from megatron_nft import checkpointing
from megatron_nft.cli import EXIT_STOPPED, _existing_outputs, main


def digest(root: Path) -> dict:
    """Every file under `root` with the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def train_args(hf: Path, data: Path, run_dir: Path, *extra) -> list[str]:
    return ["train", "--quiet", f"model.hf_path={hf}", "data.task=jsonl", f"data.train_path={data}", f"run.dir={run_dir}",
            "data.template=raw", "rollout.max_new_tokens=8", "rollout.prompts_per_step=2", "rollout.gen_prompts=2",
            "rollout.samples_per_prompt=2", "algo.num_minibatches=1", "reward.workers=1", "run.steps=2",
            "run.save_every=1", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    hf = tiny_hf_checkpoint(root / "model")
    other = tiny_hf_checkpoint(root / "other-model", hidden=48)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    run = root / "run"
    assert main(train_args(hf, data, run)) == 0
    assert [p.name for p in checkpointing.step_dirs(run)] == ["step_000001", "step_000002"]
    return {"root": root, "hf": hf, "other": other, "data": data, "run": run}


def copy_run(world, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    return run


def inputs_digest(world) -> dict:
    return {name: digest(world[name]) if world[name].is_dir() else hashlib.sha256(world[name].read_bytes()).hexdigest()
            for name in ("hf", "other", "data")}


# ---------------------------------------------------------------------------------------------------
# run directories and inputs (#14 items 2, 5)


def test_overwrite_refuses_a_run_dir_that_holds_or_is_inside_an_input(world, capsys, tmp_path):
    inputs = inputs_digest(world)
    # the model inside the run directory that run.overwrite would delete (the demo's own layout)
    run = tmp_path / "run"
    shutil.copytree(world["hf"], run / "base")
    before = digest(run)
    code, err = cli(capsys, *train_args(run / "base", world["data"], run, "run.overwrite=true"))
    assert code == 2 and len(err) == 1 and "model.hf_path" in err[0] and "run.overwrite" in err[0], err
    assert digest(run) == before
    # a run directory inside the model folder, or the data file's folder being the run directory
    code, err = cli(capsys, *train_args(world["hf"], world["data"], world["hf"] / "runs" / "x"))
    assert code == 2 and len(err) == 1 and "lies inside model.hf_path" in err[0], err
    code, err = cli(capsys, *train_args(world["hf"], world["data"], world["data"].parent, "run.overwrite=true"))
    assert code == 2 and len(err) == 1 and "inside run.dir" in err[0], err
    assert inputs_digest(world) == inputs and not (world["hf"] / "runs").exists()


def test_a_start_that_fails_leaves_nothing_that_blocks_the_corrected_rerun(world, capsys, tmp_path):
    """model.megatron_ckpt at garbage: one line (not torch's CheckpointException), and no run dir left."""
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "metadata.json").write_text("{}")
    (garbage / ".metadata").write_bytes(b"not a pickle at all")
    run = tmp_path / "run"
    code, err = cli(capsys, *train_args(world["hf"], world["data"], run, f"model.megatron_ckpt={garbage}"))
    assert code == 2 and len(err) == 1 and "model.megatron_ckpt" in err[0], err
    assert not run.exists()
    # another model's checkpoint (a different shape): one line too
    other_ckpt = world["run"] / "checkpoints" / "step_000002" / "actor"
    code, err = cli(capsys, *train_args(world["other"], world["data"], run, f"model.megatron_ckpt={other_ckpt}"))
    assert code == 2 and len(err) == 1 and "cannot be loaded into the model" in err[0], err
    assert not run.exists()
    # a run directory the user made (empty) beforehand is kept, emptied of what the failed start wrote
    run.mkdir()
    code, err = cli(capsys, *train_args(world["other"], world["data"], run, f"model.megatron_ckpt={other_ckpt}"))
    assert code == 2 and run.is_dir() and not any(run.iterdir()), err


# ---------------------------------------------------------------------------------------------------
# resume (#14 items 3, 4, 7)


def test_resume_with_nothing_to_resume_is_an_error_and_changes_nothing(world, capsys, tmp_path):
    run = copy_run(world, tmp_path)
    shutil.rmtree(run / "checkpoints")
    before = digest(run)
    code, err = cli(capsys, *train_args(world["hf"], world["data"], run, "run.resume=true"))
    assert code == 2 and len(err) == 1 and "no checkpoint to resume from" in err[0], err
    assert digest(run) == before
    # every manifest missing: each checkpoint is named with its reason, and nothing changes
    run = copy_run(world, tmp_path / "b")
    for step in checkpointing.step_dirs(run):
        (step / checkpointing.MANIFEST).unlink()
    before = digest(run)
    code, err = cli(capsys, *train_args(world["hf"], world["data"], run, "run.resume=true"))
    assert code == 2 and "none of the 2 checkpoints" in err[-1] and err[-1].count("no manifest.json") == 2, err
    assert sum("skipping checkpoint" in line for line in err) == 2
    assert digest(run) == before


def test_resume_with_another_model_is_refused_before_anything_is_written(world, capsys, tmp_path):
    run = copy_run(world, tmp_path)
    before = digest(run)
    code, err = cli(capsys, *train_args(world["other"], world["data"], run, "run.resume=true"))
    assert code == 2 and len(err) == 1 and "another model or layout" in err[0] and "model.hf_path" in err[0], err
    code, err = cli(capsys, *train_args(world["hf"], world["data"], run, "run.resume=true", "model.dtype=bf16"))
    assert code == 2 and len(err) == 1 and "model.dtype" in err[0], err
    assert digest(run) == before


def test_a_deleted_manifest_is_reported_and_the_previous_checkpoint_resumed(world, capsys, tmp_path):
    run = copy_run(world, tmp_path)
    (run / "checkpoints" / "step_000002" / checkpointing.MANIFEST).unlink()
    code, err = cli(capsys, *train_args(world["hf"], world["data"], run, "run.resume=true"))
    assert code == 0, err
    assert any("skipping checkpoint" in line and "step_000002" in line and "no manifest.json" in line for line in err), err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]  # step 2 recomputed from step 1


# ---------------------------------------------------------------------------------------------------
# damaged and crafted checkpoints (#14 items 6, 11, 12)


def test_a_flipped_byte_is_caught_by_the_checksum_and_the_previous_checkpoint_used(world, capsys, tmp_path):
    run = copy_run(world, tmp_path)
    latest = run / "checkpoints" / "step_000002"
    shard = max((p for p in (latest / "actor").rglob("*.distcp")), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a checksum sees it
    shard.write_bytes(bytes(data))
    assert checkpointing.problem(latest) is None and "checksum" in checkpointing.checksum_problem(latest)
    code, err = cli(capsys, *train_args(world["hf"], world["data"], run, "run.resume=true"))
    assert code == 0 and any("step_000002" in line and "checksum" in line for line in err), err


def _crafted_pickle(marker: Path) -> bytes:
    class Proof:  # unpickling calls open(marker, "w"): a harmless stand-in for any code
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Proof())


def test_crafted_checkpoint_files_are_never_executed(world, capsys, tmp_path):
    marker = tmp_path / "code-ran"
    run = copy_run(world, tmp_path)
    latest = run / "checkpoints" / "step_000002"
    # the torch_dist index, kept at its manifest size and checksum so that only the unpickler decides
    index = latest / "actor" / ".metadata"
    index.write_bytes(_crafted_pickle(marker))
    manifest = json.loads((latest / checkpointing.MANIFEST).read_text())
    manifest["files"]["actor/.metadata"] = {"bytes": index.stat().st_size, "crc32": checkpointing.crc32(index)}
    (latest / checkpointing.MANIFEST).write_text(json.dumps(manifest))
    # an RNG file in the old pickled format beside the JSON one: never read
    (latest / "rng_rank0.pt").write_bytes(_crafted_pickle(marker))
    code, err = cli(capsys, *train_args(world["hf"], world["data"], run, "run.resume=true"))
    assert code == 0 and any("step_000002" in line and "refusing to load it" in line for line in err), err
    assert not marker.exists()
    # the converters read the same index (the resume above replaced step 2: craft a fresh copy)
    from checkpoints_tools import megatron_to_hf, verify

    crafted = tmp_path / "crafted"
    shutil.copytree(world["run"] / "checkpoints" / "step_000002" / "actor", crafted)
    (crafted / ".metadata").write_bytes(_crafted_pickle(marker))
    for module, argv in ((megatron_to_hf, ["--ckpt", crafted, "--hf-config", world["hf"], "--out", tmp_path / "x"]),
                         (verify, ["--hf", world["hf"], "--ckpt", crafted])):
        code = module.main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "refusing to load it" in err[0], (module.__name__, err)
    assert not marker.exists() and not (tmp_path / "x").exists()


def test_checkpoints_hold_no_pickles(world):
    for step in checkpointing.step_dirs(world["run"]):
        assert sorted(p.name for p in step.glob("rng_rank*")) == ["rng_rank0.json"]
        json.loads((step / "rng_rank0.json").read_text())


# ---------------------------------------------------------------------------------------------------
# a stopped run says so (#14 item 9)


def test_outputs_listed_are_the_ones_that_exist(tmp_path):
    assert _existing_outputs(tmp_path) == "nothing yet"
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "checkpoints").mkdir()
    assert _existing_outputs(tmp_path) == "metrics.jsonl, checkpoints/"
    assert EXIT_STOPPED not in (0, 1, 2)
