"""Hostile arguments for every entry point, generated from its own argparse parser (and, for `train`
and `config`, from the config dataclasses): none may end in a Python traceback, and none may change a
byte of the inputs. Rejection paths only: a combination that is accepted reaches a stub that stops it
before real work (training, conversion, generation) and is listed in the test's output.

In-process calls (main(argv), SystemExit caught, stderr captured) keep it fast; a representative few
run as subprocesses to cover the real interpreter exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from megatron_nft import cli, config as config_module

REPO = Path(__file__).resolve().parent.parent


class Accepted(Exception):
    """Raised by the stubs standing in for real work: the arguments got past every check."""


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny HF Qwen2 (with tokenizer), its megatron-core conversion, a prompt file, a benchmark file
    with its own fields, a recipe and a plain file."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from checkpoints_tools import hf_to_megatron
    from megatron_nft.data.tokenizer import train_bpe_tokenizer
    from megatron_nft.model.hf_io import save_hf_checkpoint

    root = tmp_path_factory.mktemp("inputs")
    tok = train_bpe_tokenizer([f"What is {i} + {i + 1}?" for i in range(200)] + ["Answer: 12"], vocab_size=300)
    hf_config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=96, tie_word_embeddings=True,
    )
    save_hf_checkpoint(root / "hf", Qwen2ForCausalLM(hf_config).named_parameters(), hf_config, tok)
    assert hf_to_megatron.main(["--hf", str(root / "hf"), "--out", str(root / "ckpt"), "--dtype", "fp32"]) == 0
    (root / "train.jsonl").write_text(json.dumps({"prompt": "What is 1 + 2?", "answer": "3"}) + "\n")
    (root / "bench.jsonl").write_text(json.dumps({"q": "What is 1 + 2?", "a": "3"}) + "\n")
    (root / "recipe.yaml").write_text("rollout:\n  max_new_tokens: 16\ndata:\n  template: raw\n")
    (root / "cluster.yaml").write_text("{}\n")
    (root / "afile").write_text("not a directory\n")
    (root / "adir").mkdir()
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under root (directories too, so an added empty folder counts) -> its content hash."""
    digest = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        digest[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


# ----------------------------------------------------------------------------------------------------
# hostile values, from the parser and from the config dataclasses
# ----------------------------------------------------------------------------------------------------

NUMBER_VALUES = {int: ["x", "1.5", "-1", "0", "99999999999999999999"], float: ["x", "-1", "0", "inf", "-inf", "nan"]}
# Flags whose value is a path, and what the command does with it: read ("in") or write ("out").
PATH_ROLES = {"out": "out", "hf": "in", "ckpt": "in", "hf_config": "in", "recipe": "in", "cluster": "in",
              "benchmarks": "in", "sglang_python": "in"}


def path_values(role: str, inputs: Path, outs: Path) -> list[str]:
    """Missing paths, a file where a folder is expected and the reverse, and paths inside one another."""
    values = [str(outs / "missing"), str(inputs / "afile"), str(inputs / "adir"), str(outs / "missing" / "deeper"), ""]
    if role == "out":  # an output inside (or equal to) an input
        values.remove(str(inputs / "adir"))  # an existing empty folder is a fine output (and no input)
        values += [str(inputs / "hf"), str(inputs / "hf" / "sub"), str(inputs / "ckpt"), str(inputs / "ckpt" / "sub"),
                   str(inputs), str(inputs / "train.jsonl"), str(inputs / "bench.jsonl")]
    else:  # an input inside the output, or another input where this one is expected
        values += [str(outs), str(inputs / "train.jsonl"), str(inputs / "hf"), str(inputs / "ckpt")]
    return values


def flag_cases(parser: argparse.ArgumentParser, inputs: Path, outs: Path) -> list[tuple[str, list[str]]]:
    """(flag, [values...]) for every option of `parser`, from its type, choices, nargs and role."""
    cases = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue
        flag = max(action.option_strings, key=len)
        if action.choices is not None:
            values = ["not-a-choice", ""]
        elif action.type in NUMBER_VALUES:
            values = NUMBER_VALUES[action.type]
        elif action.dest in PATH_ROLES:
            values = path_values(PATH_ROLES[action.dest], inputs, outs)
        else:
            values = ["", "-", "x" * 300]
        for value in values:
            cases.append((flag, [value]))
        if action.nargs in ("+", "*"):
            cases.append((flag, values[:2]))
        cases.append((flag, []))  # the flag without its value
    return cases


def _field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def override_cases(inputs: Path, outs: Path) -> list[str]:
    """section.key=value overrides with the wrong type, range or path for every config field, plus
    values that are not valid YAML or interpolations that cannot resolve."""
    overrides = ["algo.eps=[0.5", "algo.eps={", "algo.eps=${nope}", "algo.eps=${algo.eps}", "algo=3", "=1", "nosuch.key=1",
                 "algo.nosuch=1", "algo.eps"]
    for section in dataclasses.fields(config_module.TrainConfig):
        for f in dataclasses.fields(section.default_factory()):
            key = f"{section.name}.{f.name}"
            kind = _field_types(section.default_factory)[f.name]
            base = typing.get_args(kind)[0] if typing.get_origin(kind) in (typing.Union, type(int | None)) else kind
            values = ["[1, 2]", "{a: 1}"]
            if "choices" in f.metadata:
                values += ["not-a-choice"]
            if base is bool:
                values += ["maybe", "2"]
            elif base is int:
                values += ["x", "1.5", "-1", "0", "-99999999999999999999"]
            elif base is float:
                values += ["x", "-1", "0", "inf", "nan", "-inf"]
            elif typing.get_origin(base) is list:
                values = ["5", "x", "[[1]]", "[-1]"]
            elif base is str and "choices" not in f.metadata:
                values += ["''", "null"]
            if key in ("run.dir", "model.hf_path", "model.megatron_ckpt", "data.train_path", "data.eval_path"):
                role = "out" if key == "run.dir" else "in"
                values += path_values(role, inputs, outs)[:-1]  # an empty override is covered above
            overrides += [f"{key}={v}" for v in values]
    return overrides


# ----------------------------------------------------------------------------------------------------
# running a case
# ----------------------------------------------------------------------------------------------------


def run_case(main, argv, capsys) -> tuple[object, str]:
    """(exit status or "accepted", stderr) of main(argv) in this process."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    except Accepted:
        code = "accepted"
    except Exception:  # noqa: BLE001 - what the real interpreter would print as a traceback
        import traceback

        code = "crash"
        print(traceback.format_exc(), file=sys.stderr)
    return code, capsys.readouterr().err


class Sweep:
    def __init__(self, inputs: Path, outs: Path, capsys, *, one_line: bool = True):
        self.inputs, self.outs, self.capsys, self.one_line = inputs, outs, capsys, one_line
        self.before = tree_digest(inputs)
        self.failures: list[str] = []
        self.accepted: list[str] = []
        self.count = 0

    def run(self, name: str, main, argv: list[str]) -> None:
        shutil.rmtree(self.outs, ignore_errors=True)
        self.outs.mkdir()
        code, err = run_case(main, argv, self.capsys)
        self.count += 1
        self.last_code = code
        label = f"{name} {' '.join(argv)}"
        if "Traceback" in err:
            self.failures.append(f"{label}: traceback on stderr: {err[-400:]}")
        if code == "accepted":
            self.accepted.append(label)
        elif code not in (0, 1, 2):
            self.failures.append(f"{label}: exit status {code!r}")
        elif code == 2 and self.one_line and len([line for line in err.splitlines() if line.strip()]) != 1:
            self.failures.append(f"{label}: refusal is not one line: {err[-400:]!r}")
        after = tree_digest(self.inputs)
        if after != self.before:
            changed = sorted(k for k in set(after) | set(self.before) if after.get(k) != self.before.get(k))
            self.failures.append(f"{label}: changed the inputs {changed[:5]}")
            self.before = after

    def check(self, capsys) -> None:
        with capsys.disabled():
            print(f"\n{self.count} hostile cases; {len(self.accepted)} accepted (stopped before real work):")
            for label in self.accepted:
                print(f"  accepted: {label}")
        assert not self.failures, f"{len(self.failures)} failures:\n" + "\n".join(f[:600] for f in self.failures[:40])


def replace_flag(base: list[str], flag: str, values: list[str]) -> list[str]:
    """base with `flag`'s values replaced (or the flag added)."""
    out, i = [], 0
    while i < len(base):
        if base[i] == flag:
            i += 1
            while i < len(base) and not base[i].startswith("--"):
                i += 1
            continue
        out.append(base[i])
        i += 1
    return out + [flag, *values]


# ----------------------------------------------------------------------------------------------------
# the sweeps
# ----------------------------------------------------------------------------------------------------


def subparser(name: str) -> argparse.ArgumentParser:
    action = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.fixture
def stubs(monkeypatch):
    """Real work replaced by Accepted: training, the demo, evaluation's engine, conversions, launches."""

    def accept(*args, **kwargs):
        raise Accepted

    import checkpoints_tools.common
    import megatron_nft.demo
    import megatron_nft.trainer

    monkeypatch.setattr(megatron_nft.trainer, "train", accept)
    monkeypatch.setattr(megatron_nft.demo, "run_demo", accept)
    monkeypatch.setattr(cli, "_eval_engine", accept)
    monkeypatch.setattr(checkpoints_tools.common, "launch_writing", accept)
    monkeypatch.setattr(checkpoints_tools.common, "launch", accept)
    try:
        import launch.experiment

        monkeypatch.setattr(launch.experiment, "submit", accept)
    except ImportError:  # nemo-run absent: the launch sweep is skipped
        pass


def test_megatron_nft_flags(inputs, tmp_path, capsys, stubs):
    outs = tmp_path / "outs"
    sweep = Sweep(inputs, outs, capsys)
    train_base = ["train", "--recipe", str(inputs / "recipe.yaml"), f"model.hf_path={inputs / 'hf'}", "data.task=jsonl",
                  f"data.train_path={inputs / 'train.jsonl'}", f"run.dir={outs / 'run'}"]
    eval_base = ["eval", "--hf", str(inputs / "hf"), "--benchmarks", str(inputs / "bench.jsonl"), "--problem-field", "q",
                 "--answer-field", "a", "--out", str(outs / "eval"), "--max-new-tokens", "8", "--template", "raw", "--quiet"]
    plan_base = ["plan", "--model", "qwen2.5-7b", "--gpus", "8"]
    bases = {"train": train_base, "config": ["config"], "demo": ["demo", f"run.dir={outs / 'demo'}"],
             "eval": eval_base, "plan": plan_base}
    for name, base in bases.items():
        for flag, values in flag_cases(subparser(name), inputs, outs):
            if flag in base:
                argv = [base[0], *replace_flag(base[1:], flag, values)]
            else:
                argv = [*base, flag, *values]
            sweep.run("megatron-nft", cli.main, argv)
    for argv in (["nosuch"], [], ["train", "--nosuch"], ["eval"]):
        sweep.run("megatron-nft", cli.main, argv)
    sweep.check(capsys)


@pytest.mark.slow  # ~700 overrides through `config`, the ~100 it accepts through `train` (about a minute)
def test_megatron_nft_overrides(inputs, tmp_path, capsys, stubs):
    outs = tmp_path / "outs"
    config_sweep, train_sweep = Sweep(inputs, outs, capsys), Sweep(inputs, outs, capsys)
    train_base = ["train", "--recipe", str(inputs / "recipe.yaml"), f"model.hf_path={inputs / 'hf'}",
                  "data.task=jsonl", f"data.train_path={inputs / 'train.jsonl'}", f"run.dir={outs / 'run'}"]
    for override in override_cases(inputs, outs):
        config_sweep.run("megatron-nft", cli.main, ["config", *train_base[1:], override])
        # what the config loader refuses takes the same path in `train`: only the rest goes on
        if config_sweep.last_code == 0:
            train_sweep.run("megatron-nft", cli.main, [*train_base, override])
    config_sweep.check(capsys)
    train_sweep.check(capsys)


def test_checkpoint_tools(inputs, tmp_path, capsys, stubs):
    from checkpoints_tools import hf_to_megatron, megatron_to_hf, verify

    outs = tmp_path / "outs"
    sweep = Sweep(inputs, outs, capsys)
    tools = {
        "hf_to_megatron": (hf_to_megatron, ["--hf", str(inputs / "hf"), "--out", str(outs / "ckpt")]),
        "megatron_to_hf": (megatron_to_hf, ["--ckpt", str(inputs / "ckpt"), "--hf-config", str(inputs / "hf"),
                                            "--out", str(outs / "hf")]),
        "verify": (verify, ["--hf", str(inputs / "hf"), "--ckpt", str(inputs / "ckpt")]),
    }
    for name, (module, base) in tools.items():
        for flag, values in flag_cases(module.build_parser(), inputs, outs):
            sweep.run(name, module.main, replace_flag(base, flag, values))
        sweep.run(name, module.main, [])
    sweep.check(capsys)


def test_launch(inputs, tmp_path, capsys, stubs):
    pytest.importorskip("nemo_run")
    from launch import __main__ as launch_main

    outs = tmp_path / "outs"
    sweep = Sweep(inputs, outs, capsys)  # a refusal is one line, as the CLI's
    base = ["local/demo", "--dryrun"]
    for flag, values in flag_cases(launch_main._parser(), inputs, outs):
        sweep.run("launch", launch_main.main, [*base, flag, *values])
    for argv in (["nosuch/recipe", "--dryrun"], ["local/demo", "--dryrun", "algo.eps=[0.5"],
                 ["local/demo", "--dryrun", "job.nosuch=1"], ["local/demo", "--dryrun", "optim.lr=inf"]):
        sweep.run("launch", launch_main.main, argv)
    sweep.check(capsys)


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "megatron_nft.cli", "config", "algo.eps=[0.5"],
        [sys.executable, "-m", "checkpoints_tools.hf_to_megatron", "--hf", "/nonexistent/hf", "--out", "/nonexistent/out"],
        [sys.executable, "-m", "launch", "local/demo", "--dryrun", "--cluster"],
    ],
    ids=["cli", "hf_to_megatron", "launch"],
)
def test_subprocess_refusal_is_one_line(argv, tmp_path):
    """The real interpreter exit: status 2, one line on stderr, no traceback."""
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "error" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []
