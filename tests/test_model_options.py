"""Model execution options (model.impl / packed_attention / fp8*, parallel.recompute): what "auto" picks
on a machine, the one-line errors for what a machine cannot run, and the Megatron settings each option
becomes. The numerical checks (recompute gives the same step, flex equals dense attention) live in
tests/test_packing.py and tests/test_flex_attention.py; FP8 itself needs a GPU with Transformer Engine.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import random_qwen2
from megatron_nft.config import load_config, model_options
from megatron_nft.errors import ConfigError
from megatron_nft.model.qwen2 import ModelOptions, shape_from_hf, transformer_config

BF16, FP32 = torch.bfloat16, torch.float32
CPU = dict(cuda=False, te=False, num_layers=4, pp=1)
GPU_NO_TE = dict(cuda=True, te=False, num_layers=4, pp=1)
GPU_TE = dict(cuda=True, te=True, num_layers=4, pp=1)


def test_auto_picks_per_machine():
    assert ModelOptions().resolved(dtype=FP32, **CPU) == ModelOptions(impl="local", packed_attention="dense")
    assert ModelOptions().resolved(dtype=BF16, **GPU_NO_TE) == ModelOptions(impl="local", packed_attention="flex")
    assert ModelOptions().resolved(dtype=BF16, **GPU_TE).impl == "te"
    # an explicit choice stands
    assert ModelOptions(impl="local", packed_attention="dense").resolved(dtype=BF16, **GPU_TE) == ModelOptions(
        impl="local", packed_attention="dense"
    )


@pytest.mark.parametrize(
    "options, machine, dtype, message",
    [
        (ModelOptions(impl="te"), CPU, BF16, "model.impl=te needs CUDA and an importable transformer_engine"),
        (ModelOptions(impl="te"), GPU_NO_TE, BF16, "this machine has no transformer_engine"),
        (ModelOptions(fp8="hybrid"), CPU, BF16, "model.fp8=hybrid needs Transformer Engine layers"),
        (ModelOptions(fp8="hybrid", impl="local"), GPU_TE, BF16, "this run uses model.impl=local"),
        (ModelOptions(fp8="e4m3"), GPU_TE, FP32, "model.fp8=e4m3 needs model.dtype=bf16"),
        (ModelOptions(fp8="hybrid", fp8_recipe="tensorwise", fp8_bf16_layers=3), {**GPU_TE, "pp": 2}, BF16, "expected 0..2"),
        (ModelOptions(fp8="hybrid", fp8_bf16_layers=1), GPU_TE, BF16,
         "model.fp8_bf16_layers=1 needs model.fp8_recipe tensorwise or blockwise"),
        (ModelOptions(fp8="e5m2"), GPU_TE, BF16, "model.fp8='e5m2': allowed values are null, hybrid, e4m3"),
        (ModelOptions(packed_attention="flex"), CPU, FP32, "model.packed_attention=flex needs CUDA"),
        (ModelOptions(recompute="selective"), CPU, FP32, "parallel.recompute='selective': allowed values are"),
    ],
)
def test_what_a_machine_cannot_run_is_one_config_error(options, machine, dtype, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        options.check(bf16=dtype == BF16)  # what config.validate runs at load
        options.resolved(dtype=dtype, **machine)  # what the actor runs on its machine


def test_model_options_are_checked_once_per_run(monkeypatch):
    """config.validate checks the options at load; the machine check before the run directory and the
    actor's resolve only decide what depends on the machine (they ran `check` again: three times)."""
    from megatron_nft.run_dir import check_machine

    calls = []
    plain = ModelOptions.check
    monkeypatch.setattr(ModelOptions, "check", lambda self, **kw: (calls.append(kw), plain(self, **kw))[1])
    cfg = load_config(None, [])
    check_machine(cfg)  # `train` / `demo` before the run directory
    model_options(cfg).resolved(dtype=FP32, **CPU)  # the actor's model build
    assert len(calls) == 1


@pytest.fixture(scope="module")
def shape():
    config, _ = random_qwen2(layers=4)
    return shape_from_hf(config)


@pytest.mark.parametrize(
    "recompute, expected",
    [
        ("none", dict(recompute_granularity=None)),
        ("core_attn", dict(recompute_granularity="selective", recompute_modules=["core_attn"])),
        ("mlp", dict(recompute_granularity="selective", recompute_modules=["mlp"])),
        ("full", dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    ],
)
def test_recompute_becomes_megatron_settings(shape, recompute, expected):
    config = transformer_config(shape, dtype=FP32, tp=1, pp=1, options=ModelOptions(recompute=recompute).resolved(dtype=FP32, **CPU))
    assert {k: getattr(config, k) for k in expected} == expected


def test_fp8_becomes_megatron_settings(shape):
    options = ModelOptions(fp8="hybrid", fp8_recipe="blockwise", fp8_bf16_layers=1).resolved(dtype=BF16, **GPU_TE)
    config = transformer_config(shape, dtype=BF16, tp=1, pp=1, options=options)
    assert (config.fp8, config.fp8_recipe) == ("hybrid", "blockwise")
    assert (config.first_last_layers_bf16, config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16) == (True, 1, 1)
    plain = transformer_config(shape, dtype=BF16, tp=1, pp=1, options=ModelOptions().resolved(dtype=BF16, **GPU_TE))
    assert plain.fp8 is None and not plain.first_last_layers_bf16


FP8_COMBINATIONS = [
    (fp8, recipe, bf16_layers, pp)
    for fp8 in (None, "hybrid", "e4m3")
    for recipe in ("delayed", "tensorwise", "blockwise")
    for bf16_layers in (0, 1, 2, 3)
    for pp in (1, 2)
]


def test_fp8_options_are_refused_exactly_where_megatron_core_refuses_them(shape):
    # The reference is megatron-core's own TransformerConfig check, run on the config the actor would
    # build: the project refuses (at load, or when resolving for a TE machine) exactly the fp8 /
    # recipe / bf16-layer / pipeline combinations megatron-core raises for, and nothing else.
    refused_by = {"project": set(), "megatron": set()}
    for fp8, recipe, bf16_layers, pp in FP8_COMBINATIONS:
        options = ModelOptions(impl="te", fp8=fp8, fp8_recipe=recipe, fp8_bf16_layers=bf16_layers)
        combination = (fp8, recipe, bf16_layers, pp)
        try:  # what a run does: config.validate's check at load, the actor's resolve on its machine
            options.check(bf16=True)
            options.resolved(dtype=BF16, **{**GPU_TE, "num_layers": shape.num_layers, "pp": pp})
        except ConfigError as e:
            assert len(str(e).splitlines()) == 1 and "model.fp8_bf16_layers=" in str(e), e
            refused_by["project"].add(combination)
        try:
            transformer_config(shape, dtype=BF16, tp=1, pp=pp, options=options)
        except ValueError:
            refused_by["megatron"].add(combination)
    assert refused_by["project"] == refused_by["megatron"]
    assert ("hybrid", "delayed", 1, 1) in refused_by["megatron"]  # issue 13's case
    assert ("hybrid", "tensorwise", 3, 2) in refused_by["megatron"]  # more bf16 layers than a stage holds
    assert ("hybrid", "blockwise", 2, 1) not in refused_by["megatron"]
    # at load (config.validate), before any machine is known
    with pytest.raises(ConfigError, match="model.fp8_bf16_layers=2 needs model.fp8_recipe tensorwise or blockwise"):
        load_config(None, ["model.dtype=bf16", "model.fp8=hybrid", "model.fp8_bf16_layers=2"])


def test_config_fields_reach_the_options():
    cfg = load_config(None, ["model.dtype=bf16", "model.fp8=hybrid", "model.fp8_recipe=tensorwise",
                             "model.fp8_bf16_layers=1", "parallel.recompute=full", "model.packed_attention=flex"])
    assert model_options(cfg) == ModelOptions(impl="auto", packed_attention="flex", fp8="hybrid",
                                              fp8_recipe="tensorwise", fp8_bf16_layers=1, recompute="full")
    with pytest.raises(ConfigError, match="model.fp8=hybrid needs model.dtype=bf16"):
        load_config(None, ["model.fp8=hybrid"])
    with pytest.raises(ConfigError, match="parallel.recompute='some': allowed values are none, core_attn, mlp, full"):
        load_config(None, ["parallel.recompute=some"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_fp8_on_this_machine_exits_2_before_making_a_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "megatron_nft.cli", "demo", "--quiet", f"run.dir={run_dir}", "model.dtype=bf16", "model.fp8=hybrid"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "model.fp8=hybrid needs Transformer Engine layers" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not run_dir.exists()
