"""Bad input: one line naming the problem, a non-zero exit, nothing written over."""

from __future__ import annotations

import json

import pytest

from megatron_nft.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_missing_recipe(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--recipe", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert len(err) == 1 and "nope.yaml" in err[0] and "no such file" in err[0]


def test_malformed_recipe(capsys, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("algo:\n  name: nft\n   eps: [1\n")
    code, err = run_cli(capsys, "train", "--recipe", str(recipe))
    assert code == 2
    assert len(err) == 1 and "bad.yaml" in err[0] and "YAML" in err[0]


def test_unknown_key_and_bad_value_name_the_key(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algo:\n  epsilon: 0.5\n")
    code, err = run_cli(capsys, "config", "--recipe", str(recipe))
    assert code == 2 and "algo.epsilon" in err[0] and "eps" in err[0]
    code, err = run_cli(capsys, "config", "algo.name=ppo")
    assert code == 2 and "algo.name" in err[0] and "nft" in err[0] and "dapo" in err[0]
    code, err = run_cli(capsys, "config", "algo.eps=abc")
    assert code == 2 and "algo.eps" in err[0]


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "algo.eps=0.5"]) == 0
    out = capsys.readouterr().out
    assert "eps: 0.5" in out


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random HF Qwen2 checkpoint with an offline-trained tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_nft.data.tokenizer import train_bpe_tokenizer
    from megatron_nft.model.hf_io import save_hf_checkpoint

    out = tmp_path_factory.mktemp("hf") / "model"
    tok = train_bpe_tokenizer([f"What is {i} + {i + 1}?" for i in range(200)] + ["Answer: 12"], vocab_size=300)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=96, tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    save_hf_checkpoint(out, ((n, p) for n, p in model.named_parameters()), config, tok)
    return out


def _train(capsys, tiny_hf, tmp_path, data_lines, *extra):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in data_lines) + "\n")
    return run_cli(
        capsys, "train", f"model.hf_path={tiny_hf}", "data.task=jsonl", f"data.train_path={data}",
        f"run.dir={tmp_path / 'run'}", "rollout.max_new_tokens=16", "data.template=raw", *extra,
    )


def test_dataset_row_without_answer(capsys, tiny_hf, tmp_path):
    code, err = _train(capsys, tiny_hf, tmp_path, [{"prompt": "What is 1 + 2?", "answer": "3"}, {"prompt": "What is 2 + 2?"}])
    assert code == 2 and len(err) == 1
    assert "train.jsonl:2" in err[0] and "answer" in err[0]


def test_prompt_longer_than_context(capsys, tiny_hf, tmp_path):
    long = "What is " + " + ".join(str(i) for i in range(60)) + "?"
    code, err = _train(capsys, tiny_hf, tmp_path, [{"prompt": "What is 1 + 2?", "answer": "3"}, {"prompt": long, "answer": "1"}])
    assert code == 2 and len(err) == 1
    assert "train.jsonl:2" in err[0] and "80" in err[0]  # 96 positions - 16 new tokens


def test_existing_run_is_not_overwritten(capsys, tiny_hf, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    code, err = _train(capsys, tiny_hf, tmp_path, [{"prompt": "What is 1 + 2?", "answer": "3"}])
    assert code == 2 and len(err) == 1
    assert str(run) in err[0] and "run.resume" in err[0] and "run.overwrite" in err[0]
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
