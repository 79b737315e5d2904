"""model.* shape keys beside model.hf_path: the checkpoint's config.json is the model's shape, so a
stated key that contradicts it (silently ignored before) is refused in one line before anything is
created; one that agrees (a demo's saved config training on from its own base) is accepted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from helpers import tiny_hf_checkpoint

from megatron_nft.cli import main
from megatron_nft.config import load_config
from megatron_nft.errors import ConfigError
from megatron_nft.preflight import SHAPE_KEYS, check_shape_keys, check_train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return tiny_hf_checkpoint(tmp_path_factory.mktemp("hf") / "model")  # hidden 32, 2 layers, 96 positions, tied


def overrides(hf, run_dir, *extra):
    return [f"model.hf_path={hf}", f"run.dir={run_dir}", "rollout.max_new_tokens=16", *extra]


@pytest.mark.parametrize("key, value, actual", [
    ("hidden_size", 64, 32), ("num_layers", 3, 2), ("max_position_embeddings", 4096, 96),
    ("tie_word_embeddings", False, True),
])
def test_a_shape_key_the_checkpoint_contradicts_is_refused(tiny_hf, tmp_path, capsys, key, value, actual):
    run_dir = tmp_path / "run"
    code = main(["train", *overrides(tiny_hf, run_dir, f"model.{key}={value}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"model.{key}={value}: not used with model.hf_path, whose {tiny_hf}/config.json gives {key} {actual}" in err[0]
    assert not run_dir.exists()


def test_keys_that_agree_or_are_left_at_their_defaults_pass(tiny_hf, tmp_path):
    # num_layers 2 and max_position_embeddings 96 are stated (not the defaults) and agree; hidden_size is
    # left at its default (128), which the checkpoint's 32 replaces as always
    cfg = load_config(None, overrides(tiny_hf, tmp_path / "run", "model.num_layers=2", "model.max_position_embeddings=96"))
    check_train(cfg)
    with pytest.raises(ConfigError, match="model.num_layers=3"):
        check_train(load_config(None, overrides(tiny_hf, tmp_path / "run", "model.num_layers=3")))


def test_the_demos_config_trains_on_from_its_own_base():
    """The demo's recipe (and so its saved config.yaml) states every shape key; its base checkpoint has
    that shape (demo.py builds it from them) but the vocabulary its tokenizer reached, which may be
    smaller than model.vocab_size, so `train --recipe <demo>/config.yaml model.hf_path=<base>` passes
    even with a vocab_size its tokenizer did not reach, and a base of another shape is refused."""
    model = load_config(REPO / "recipes/demo.yaml", ["model.vocab_size=512"]).model
    base = dataclasses.replace(model.random_shape(), vocab_size=371)
    check_shape_keys(model, base)
    assert all(getattr(model, k) == getattr(base, k) for k in SHAPE_KEYS) and "vocab_size" not in SHAPE_KEYS
    with pytest.raises(ConfigError, match=r"model.max_position_embeddings=2048: .* gives max_position_embeddings 1024"):
        check_shape_keys(model, dataclasses.replace(base, max_position_embeddings=1024))
