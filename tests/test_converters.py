"""checkpoints_tools: HF Qwen2 <-> megatron-core dist checkpoints, on random HF models (no download).

Cost plan (two cores): the TP=1 conversions run in this process (a world of one); every multi-rank
check shares ONE run_distributed spawn of 4 gloo ranks (the CLIs run there as torchrun-style ranks);
one subprocess runs the real `python -m` entry point, which spawns its own 2 ranks.

Shapes: MHA untied, GQA 3:1 tied, a single KV head (tied), and 3 layers (odd, PP=1); all with random
q/k/v biases and norms, and a vocabulary (101) that TP=2 pads. Each is imported at TP=1 and at a
multi-rank layout, each checkpoint is run at another layout than it was saved at, logits match
transformers' own forward within 1e-4 (fp32), and HF -> Megatron -> HF through disk is bit-exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # an editable install made before checkpoints_tools existed misses it
    sys.path.insert(0, str(REPO))

from helpers import random_qwen2  # noqa: E402

from checkpoints_tools import hf_to_megatron, megatron_to_hf, verify  # noqa: E402

# label -> (random_qwen2 kwargs, the multi-rank layout (tp, pp) it is imported/exported at)
SHAPES = {
    "mha_untied": (dict(hidden=32, heads=4, kv_heads=4, layers=2, ffn=48, tied=False, seed=0), (2, 2)),
    "gqa3_tied": (dict(hidden=48, heads=6, kv_heads=2, layers=2, ffn=48, tied=True, seed=1), (2, 2)),
    "kv1_tied": (dict(hidden=32, heads=4, kv_heads=1, layers=2, ffn=48, tied=True, seed=2), (1, 2)),
    "odd3_untied": (dict(hidden=32, heads=4, kv_heads=2, layers=3, ffn=48, tied=False, seed=3), (2, 1)),
}
WORLD = 4
ATOL = 1e-4


def _tokens(vocab):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(7))


def _save_hf(model, config, out: Path, *, dtype=None, tokenizer=None, shard_bytes=None):
    from megatron_nft.model.hf_io import save_hf_checkpoint

    state = {k: v.clone() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # as transformers saves a tied model
    kwargs = {"shard_bytes": shard_bytes} if shard_bytes else {}
    save_hf_checkpoint(out, state.items(), config, tokenizer, dtype=dtype, **kwargs)
    return out


def _hf_state(path: Path) -> dict:
    from megatron_nft.model.hf_io import hf_tensor_reader, hf_weight_map

    fetch = hf_tensor_reader(path)
    return {name: fetch(name) for name in hf_weight_map(path)}


def _assert_bit_exact(got: dict, want: dict):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def _cli(capsys, module, *argv):
    code = module.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


# ----------------------------------------------------------------------------------------------------
# fixtures: HF models on disk, TP=1 conversions in this process, the one 4-rank spawn
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("converters")


@pytest.fixture(scope="module")
def models(root):
    from megatron_nft.data.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([f"What is {i} + {i + 1}?" for i in range(50)], vocab_size=300)
    out = {}
    for label, (kwargs, layout) in SHAPES.items():
        config, model = random_qwen2(vocab=101, **kwargs)
        # one source is sharded (index + several files) and carries a tokenizer
        extra = {"tokenizer": tokenizer, "shard_bytes": 64 * 1024} if label == "gqa3_tied" else {}
        hf = _save_hf(model, config, root / label / "hf", **extra)
        out[label] = {"config": config, "model": model, "hf": hf, "layout": layout, "dir": root / label}
    return out


@pytest.fixture(scope="module")
def tp1(models):
    """HF -> Megatron (TP=1) -> HF through disk, in this process, for every shape."""
    results = {}
    for label, m in models.items():
        d = m["dir"]
        code1 = hf_to_megatron.main(["--hf", str(m["hf"]), "--out", str(d / "m1")])
        code2 = megatron_to_hf.main(["--ckpt", str(d / "m1"), "--hf-config", str(m["hf"]), "--out", str(d / "e1")])
        results[label] = (code1, code2)
    return results


def _spawn_worker(rank, world_size, cases, tokens):
    from checkpoints_tools import hf_to_megatron, megatron_to_hf, verify
    from megatron_nft.model.qwen2 import shape_from_hf

    out = {}
    for label, (d, config, (tp, pp)) in cases.items():
        d = Path(d)
        shape = shape_from_hf(config)
        # the CLIs, run as ranks of this existing (torchrun-style) world; DP fills the rest
        code = hf_to_megatron.main(["--hf", str(d / "hf"), "--out", str(d / "m2"), "--tp", str(tp), "--pp", str(pp)])
        assert code == 0, (label, code)
        # both checkpoints (m1 saved at TP=1 in the parent, m2 at (tp, pp) here) run at both layouts
        for ckpt in ("m1", "m2"):
            for layout in ((1, 1), (tp, pp)):
                out[(label, ckpt, *layout)] = verify.logits_rank(str(d / ckpt), shape, *layout, "fp32", tokens[label])
        code = megatron_to_hf.main(
            ["--ckpt", str(d / "m2"), "--hf-config", str(d / "hf"), "--out", str(d / "e2"),
             "--tp", str(tp), "--pp", str(pp), "--max-shard-mib", "0.05"]
        )
        assert code == 0, (label, code)
    return out


@pytest.fixture(scope="module")
def spawned(models, tp1):
    from megatron_nft.testing import run_distributed

    cases = {label: (str(m["dir"]), m["config"], m["layout"]) for label, m in models.items()}
    tokens = {label: _tokens(m["config"].vocab_size) for label, m in models.items()}
    return run_distributed(_spawn_worker, WORLD, cases, tokens)[0], tokens


# ----------------------------------------------------------------------------------------------------
# round trips and parity
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", list(SHAPES))
def test_tp1_round_trip_through_disk_is_bit_exact(models, tp1, label):
    assert tp1[label] == (0, 0)
    m = models[label]
    _assert_bit_exact(_hf_state(m["dir"] / "e1"), _hf_state(m["hf"]))
    assert not (m["dir"] / "m1.tmp").exists() and not (m["dir"] / "e1.tmp").exists()
    meta = json.loads((m["dir"] / "m1" / "converted_from_hf.json").read_text())
    assert meta["tp"] == 1 and meta["dtype"] == "fp32"


@pytest.mark.parametrize("label", list(SHAPES))
def test_multi_rank_round_trip_is_bit_exact(models, spawned, label):
    m = models[label]
    e2 = m["dir"] / "e2"
    _assert_bit_exact(_hf_state(e2), _hf_state(m["hf"]))
    # --max-shard-mib 0.05: sharded files with an index
    index = json.loads((e2 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("label", list(SHAPES))
def test_logits_match_transformers_at_every_layout(models, spawned, label):
    out, tokens = spawned
    m = models[label]
    with torch.no_grad():
        ref = m["model"](tokens[label]).logits.float()
    tp, pp = m["layout"]
    runs = {k: v for k, v in out.items() if k[0] == label}
    assert set(runs) == {(label, c, *layout) for c in ("m1", "m2") for layout in ((1, 1), (tp, pp))}
    for key, logits in runs.items():
        assert logits.shape == ref.shape, key
        err = (logits - ref).abs().max().item()
        assert err < ATOL, (key, err)


def test_exported_checkpoint_loads_in_transformers(models, spawned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = models["gqa3_tied"]
    e2 = m["dir"] / "e2"
    # config.json and the tokenizer come from the source folder (config verbatim but for its dtype)
    src_cfg = json.loads((m["hf"] / "config.json").read_text())
    src_cfg.update({k: "float32" for k in ("dtype", "torch_dtype") if k in src_cfg} or {"torch_dtype": "float32"})
    assert json.loads((e2 / "config.json").read_text()) == src_cfg
    assert AutoTokenizer.from_pretrained(str(e2))("What is 1 + 2?")["input_ids"] == AutoTokenizer.from_pretrained(
        str(m["hf"])
    )("What is 1 + 2?")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(e2), dtype=torch.float32).eval()
    tokens = _tokens(101)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, m["model"](tokens).logits)


def test_bf16_round_trip_and_verify(models, root, capsys):
    """A bf16 HF checkpoint imports as bf16 (--dtype auto), exports bit-exact, and verify (fp32 compute)
    passes against transformers."""
    m = models["odd3_untied"]
    hf = _save_hf(m["model"], m["config"], root / "bf16" / "hf", dtype=torch.bfloat16)
    code, out, err = _cli(capsys, hf_to_megatron, "--hf", hf, "--out", root / "bf16" / "m")
    assert code == 0, err
    assert json.loads((root / "bf16" / "m" / "converted_from_hf.json").read_text())["dtype"] == "bf16"
    code, out, err = _cli(capsys, megatron_to_hf, "--ckpt", root / "bf16" / "m", "--hf-config", hf, "--out", root / "bf16" / "e")
    assert code == 0, err
    _assert_bit_exact(_hf_state(root / "bf16" / "e"), _hf_state(hf))
    code, out, err = _cli(capsys, verify, "--hf", hf, "--ckpt", root / "bf16" / "m", "--seq-len", "16", "--max-logit-diff", "1e-4")
    assert code == 0, out + "\n".join(err)
    assert "max |delta logit|" in out and "cosine" in out and "argmax" in out and out.strip().endswith("PASS")


def test_verify_fails_on_the_wrong_weights(models, tp1, root, capsys):
    """Same shape, different weights: verify prints the gap and exits 1."""
    m = models["mha_untied"]
    config, other = random_qwen2(vocab=101, **{**SHAPES["mha_untied"][0], "seed": 99})
    hf = _save_hf(other, config, root / "other" / "hf")
    code, out, err = _cli(capsys, verify, "--hf", hf, "--ckpt", m["dir"] / "m1", "--seq-len", "8")
    assert code == 1
    assert "FAIL" in out and "max |delta logit|" in out


def test_cli_entry_point_spawns_its_own_ranks(models, tp1, root, capsys):
    """`python -m checkpoints_tools.hf_to_megatron --tp 2`: the real entry point (its __main__ guard
    matters: spawned ranks and checkpoint writers re-import it); the TP=2 checkpoint then runs at TP=1."""
    m = models["mha_untied"]
    out = root / "cli_tp2"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "checkpoints_tools.hf_to_megatron", "--hf", str(m["hf"]), "--out", str(out), "--tp", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout
    assert json.loads((out / "converted_from_hf.json").read_text())["padded_vocab_size"] == 102
    code, text, err = _cli(capsys, verify, "--hf", m["hf"], "--ckpt", out, "--seq-len", "8", "--max-logit-diff", "1e-4")
    assert code == 0, text + "\n".join(err)


def test_help_is_readable(capsys):
    for module, flags in (
        (hf_to_megatron, ["--hf", "--out", "--tp", "--pp", "--dtype", "--overwrite"]),
        (megatron_to_hf, ["--ckpt", "--hf-config", "--out", "--tp", "--pp", "--overwrite"]),
        (verify, ["--hf", "--ckpt", "--tp", "--pp", "--max-logit-diff"]),
    ):
        code, out, _ = _cli(capsys, module, "--help")
        assert code == 0
        assert out.startswith("usage: python -m checkpoints_tools.")
        for flag in flags:
            assert flag in out


# ----------------------------------------------------------------------------------------------------
# bad input: one line naming it, exit 2, nothing left behind
# ----------------------------------------------------------------------------------------------------


def _assert_refused(code, err, out_dir: Path, *needles):
    assert code == 2
    assert len(err) == 1, err
    for needle in needles:
        assert str(needle) in err[0], (needle, err[0])
    assert not out_dir.exists()
    assert not out_dir.with_name(out_dir.name + ".tmp").exists()


@pytest.fixture()
def small(tmp_path):
    config, model = random_qwen2(vocab=101, hidden=32, heads=4, kv_heads=2, layers=2, ffn=48, seed=5)
    return config, model, tmp_path


def test_missing_shard(small, capsys):
    config, model, tmp = small
    hf = _save_hf(model, config, tmp / "hf", shard_bytes=64 * 1024)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (hf / victim).unlink()
    code, _, err = _cli(capsys, hf_to_megatron, "--hf", hf, "--out", tmp / "out")
    _assert_refused(code, err, tmp / "out", victim, "missing")


def test_tensor_with_the_wrong_shape(small, capsys):
    config, model, tmp = small
    state = dict(model.state_dict())
    state["model.layers.1.mlp.up_proj.weight"] = torch.randn(40, 32)
    from megatron_nft.model.hf_io import save_hf_checkpoint

    hf = save_hf_checkpoint(tmp / "hf", state.items(), config)
    code, _, err = _cli(capsys, hf_to_megatron, "--hf", hf, "--out", tmp / "out")
    _assert_refused(code, err, tmp / "out", "model.layers.1.mlp.up_proj.weight", "[40, 32]", "[48, 32]")


def test_tp_that_does_not_divide_the_heads(small, capsys):
    config, model, tmp = small
    hf = _save_hf(model, config, tmp / "hf")
    code, _, err = _cli(capsys, hf_to_megatron, "--hf", hf, "--out", tmp / "out", "--tp", "3")
    _assert_refused(code, err, tmp / "out", "--tp 3", "2 key/value heads", "config.json")
    code, _, err = _cli(capsys, hf_to_megatron, "--hf", hf, "--out", tmp / "out", "--pp", "0")
    _assert_refused(code, err, tmp / "out", "--pp 0")


def test_missing_qkv_bias_and_unexpected_bias(small, capsys):
    from megatron_nft.model.hf_io import save_hf_checkpoint

    config, model, tmp = small
    state = dict(model.state_dict())
    del state["model.layers.0.self_attn.k_proj.bias"]
    save_hf_checkpoint(tmp / "a", state.items(), config)
    code, _, err = _cli(capsys, hf_to_megatron, "--hf", tmp / "a", "--out", tmp / "out")
    _assert_refused(code, err, tmp / "out", "model.layers.0.self_attn.k_proj.bias", "missing")
    state = {**model.state_dict(), "model.layers.0.self_attn.o_proj.bias": torch.zeros(32)}
    save_hf_checkpoint(tmp / "b", state.items(), config)
    code, _, err = _cli(capsys, hf_to_megatron, "--hf", tmp / "b", "--out", tmp / "out")
    _assert_refused(code, err, tmp / "out", "model.layers.0.self_attn.o_proj.bias", "unexpected")


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("attention_bias", False, "attention_bias"),
        ("mlp_bias", True, "mlp_bias"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, "rope"),
        ("hidden_act", "gelu", "hidden_act"),
        ("model_type", "llama", "model_type"),
    ],
)
def test_unsupported_config_field(small, capsys, field, value, needle):
    config, model, tmp = small
    hf = _save_hf(model, config, tmp / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg[field] = value
    if field == "rope_scaling":
        cfg["rope_parameters"] = {**cfg.get("rope_parameters", {}), **value}
    (hf / "config.json").write_text(json.dumps(cfg))
    code, _, err = _cli(capsys, hf_to_megatron, "--hf", hf, "--out", tmp / "out")
    _assert_refused(code, err, tmp / "out", needle, "config.json")


def test_existing_output_is_refused_without_overwrite(small, capsys):
    config, model, tmp = small
    hf = _save_hf(model, config, tmp / "hf")
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    code, _, err = _cli(capsys, hf_to_megatron, "--hf", hf, "--out", tmp / "out")
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0] and str(tmp / "out") in err[0]
    assert (tmp / "out" / "keep.txt").read_text() == "mine"
    code, _, err = _cli(capsys, megatron_to_hf, "--ckpt", tmp / "nope", "--hf-config", hf, "--out", tmp / "x")
    _assert_refused(code, err, tmp / "x", "--ckpt", "nope", "no such directory")


def _tree_digest(root: Path) -> dict:
    """Every file under root (or root itself) with its bytes: an input must come out byte-for-byte equal."""
    import hashlib

    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root) if p != root else p.name): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# --out relative to an input, as a function of the input folder: every way the two can overlap
# (the staging folder OUT.tmp included: `--hf q.tmp --out q` once deleted its own input).
OVERLAPS = {
    "out is the input": lambda src: src,
    "out inside the input": lambda src: src / "converted",
    "input inside out": lambda src: src.parent,
    "staging folder is the input": lambda src: src.with_name(src.name.removesuffix(".tmp")),
    "staging folder inside the input": lambda src: src / "x",  # x.tmp inside src
}


@pytest.mark.parametrize("overlap", OVERLAPS)
def test_outputs_that_overlap_an_input_are_refused_and_inputs_untouched(models, tp1, overlap, capsys, tmp_path):
    import shutil

    m = models["mha_untied"]
    # copies named so that every relation exists (a `.tmp` name for the staging case)
    root = tmp_path / "inputs"
    hf = root / "q.tmp"
    ckpt = root / "m1.tmp"
    shutil.copytree(m["hf"], hf)
    shutil.copytree(m["dir"] / "m1", ckpt)
    calls = {
        "hf_to_megatron --hf": (hf_to_megatron, ["--hf", hf], hf),
        "megatron_to_hf --ckpt": (megatron_to_hf, ["--ckpt", ckpt, "--hf-config", hf], ckpt),
        "megatron_to_hf --hf-config": (megatron_to_hf, ["--ckpt", ckpt, "--hf-config", hf], hf),
    }
    before = _tree_digest(root)
    for label, (module, argv, src) in calls.items():
        out = OVERLAPS[overlap](src)
        for extra in ([], ["--overwrite"]):
            code, _, err = _cli(capsys, module, *argv, "--out", out, *extra)
            assert code == 2 and len(err) == 1, (label, extra, err)
            assert "overlaps the input" in err[0] or ("exists" in err[0] and not extra), (label, extra, err)
            assert _tree_digest(root) == before, f"{label} {overlap} {extra}: an input changed"


def test_failure_midway_leaves_no_output(small, capsys, monkeypatch):
    from megatron_nft.model import mapping

    config, model, tmp = small
    hf = _save_hf(model, config, tmp / "hf")
    real = mapping.megatron_shard_state

    def broken(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 5:
                raise OSError("disk went away")
            yield item

    monkeypatch.setattr(mapping, "megatron_shard_state", broken)
    with pytest.raises(OSError, match="disk went away"):
        hf_to_megatron.main(["--hf", str(hf), "--out", str(tmp / "out")])
    assert not (tmp / "out").exists() and not (tmp / "out.tmp").exists()


def test_export_refuses_a_checkpoint_of_another_model(models, tp1, small, capsys):
    config, model, tmp = small  # 2 kv heads, untied; mha_untied has 4 kv heads
    hf = _save_hf(model, config, tmp / "hf")
    ckpt = models["mha_untied"]["dir"] / "m1"
    code, _, err = _cli(capsys, megatron_to_hf, "--ckpt", ckpt, "--hf-config", hf, "--out", tmp / "out")
    _assert_refused(code, err, tmp / "out", "linear_qkv.weight", "config.json")
    code, _, err = _cli(capsys, megatron_to_hf, "--ckpt", hf, "--hf-config", hf, "--out", tmp / "out")
    _assert_refused(code, err, tmp / "out", "not a megatron-core distributed checkpoint")
