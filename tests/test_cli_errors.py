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


# ----------------------------------------------------------------------------------------------------
# issue 14, items 13 and 14: each refused in one line naming the key, flag or file, exit status 2,
# nothing created, every input byte-for-byte as it was
# ----------------------------------------------------------------------------------------------------


def tree_digest(*roots):
    """Every file and folder under `roots` -> its sha256 ("dir" for folders)."""
    import hashlib
    from pathlib import Path

    digest = {}
    for root in map(Path, roots):
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            digest[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def _refused(capsys, argv, must_name, *inputs, created=()):
    before = tree_digest(*inputs)
    code, err = run_cli(capsys, *argv)
    assert code == 2 and len(err) == 1, err
    for word in must_name:
        assert word in err[0], err[0]
    assert tree_digest(*inputs) == before
    for path in created:
        assert not path.exists(), f"{path} was created"
    return err[0]


@pytest.mark.parametrize(
    "override, must_name",
    [
        ("algo.eps=[0.5", ["algo.eps=[0.5", "YAML"]),  # item 13: not valid YAML
        ("algo.eps=${nope}", ["nope", "interpolation"]),
        ("optim.adam_beta1=1.5", ["optim.adam_beta1=1.5", "[0, 1)"]),
        ("reward.workers=0", ["reward.workers=0", ">= 1"]),
        ("run.save_every=-1", ["run.save_every=-1", ">= 0"]),  # item 14: silently accepted before
        ("eval.every=-1", ["eval.every=-1", ">= 0"]),
        ("optim.weight_decay=-0.1", ["optim.weight_decay=-0.1", ">= 0"]),
        ("optim.grad_clip=-1", ["optim.grad_clip=-1", "> 0"]),
        ("optim.lr=inf", ["optim.lr=inf", "finite"]),
        ("optim.lr=nan", ["optim.lr=nan", "finite"]),
        ("reward.timeout_s=0", ["reward.timeout_s=0", "> 0"]),
        ("data.max_prompt_len=0", ["data.max_prompt_len=0", ">= 1"]),
        ("rollout.urls=[[1]]", ["rollout.urls", "[1]"]),
        ("rollout.weight_sync_dir=''", ["rollout.weight_sync_dir", "empty"]),
    ],
)
def test_bad_override_refused_before_anything(capsys, tiny_hf, tmp_path, override, must_name):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 2?", "answer": "3"}) + "\n")
    argv = ["train", f"model.hf_path={tiny_hf}", "data.task=jsonl", f"data.train_path={data}",
            f"run.dir={tmp_path / 'run'}", "rollout.max_new_tokens=16", "data.template=raw", override]
    _refused(capsys, argv, must_name, tiny_hf, data, created=[tmp_path / "run"])


def _train_argv(hf, tmp_path, *extra):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 2?", "answer": "3"}) + "\n")
    return data, ["train", f"model.hf_path={hf}", "data.task=jsonl", f"data.train_path={data}",
                  f"run.dir={tmp_path / 'run'}", "rollout.max_new_tokens=16", "data.template=raw", *extra]


def test_tp_without_torchrun(capsys, tiny_hf, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data, argv = _train_argv(tiny_hf, tmp_path, "parallel.tp=2")
    line = _refused(capsys, argv, ["parallel.tp=2", "torchrun --nproc-per-node 2"], tiny_hf, data,
                    created=[tmp_path / "run"])
    assert "WORLD_SIZE unset" in line


def test_max_new_tokens_beyond_context_names_it(capsys, tiny_hf, tmp_path):
    data, argv = _train_argv(tiny_hf, tmp_path, "rollout.max_new_tokens=200")
    line = _refused(capsys, argv, ["rollout.max_new_tokens=200", "96-token context", "at most 95"], tiny_hf, data,
                    created=[tmp_path / "run"])
    assert "max_prompt_len=-" not in line


def _copy_hf(tiny_hf, dst, drop=(), config_edit=None):
    import shutil

    shutil.copytree(tiny_hf, dst)
    for name in drop:
        (dst / name).unlink()
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_edit)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_hf_without_tokenizer(capsys, tiny_hf, tmp_path):
    hf = _copy_hf(tiny_hf, tmp_path / "hf", drop=("tokenizer.json", "tokenizer_config.json"))
    data, argv = _train_argv(hf, tmp_path)
    _refused(capsys, argv, [str(hf), "no tokenizer", "tokenizer.json"], hf, data, created=[tmp_path / "run"])
    bench = tmp_path / "mini.jsonl"
    bench.write_text(json.dumps({"q": "What is 1 + 2?", "a": "3"}) + "\n")
    _refused(capsys, ["eval", "--hf", str(hf), "--benchmarks", str(bench), "--problem-field", "q", "--answer-field", "a",
                      "--out", str(tmp_path / "eval")], ["--hf", "no tokenizer"], hf, bench, created=[tmp_path / "eval"])


def test_config_vocab_differs_from_weights(capsys, tiny_hf, tmp_path):
    hf = _copy_hf(tiny_hf, tmp_path / "hf", config_edit={"vocab_size": 300})
    data, argv = _train_argv(hf, tmp_path)
    _refused(capsys, argv, ["model.embed_tokens.weight", "config.json implies [300"], hf, data,
             created=[tmp_path / "run"])


def test_tokenizer_larger_than_vocab(capsys, tiny_hf, tmp_path):
    """The tokenizer's ids beyond config.json vocab_size would index past the embedding."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from megatron_nft.model.hf_io import save_hf_checkpoint

    tok = AutoTokenizer.from_pretrained(tiny_hf)
    config = Qwen2Config(vocab_size=len(tok) - 10, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=96)
    hf = tmp_path / "hf"
    save_hf_checkpoint(hf, Qwen2ForCausalLM(config).named_parameters(), config, tok)
    data, argv = _train_argv(hf, tmp_path)
    _refused(capsys, argv, [f"{len(tok)} tokens", f"vocab_size={len(tok) - 10}"], hf, data, created=[tmp_path / "run"])


@pytest.fixture
def bench(tmp_path):
    path = tmp_path / "mini.jsonl"
    path.write_text(json.dumps({"q": "What is 1 + 2?", "a": "3"}) + "\n")
    return path


def _eval_argv(tiny_hf, bench, out, *extra):
    return ["eval", "--hf", str(tiny_hf), "--benchmarks", str(bench), "--problem-field", "q", "--answer-field", "a",
            "--template", "raw", "--out", str(out), "--max-new-tokens", "8", "--quiet", *extra]


@pytest.mark.parametrize(
    "extra, must_name",
    [
        (["--max-new-tokens", "0"], ["--max-new-tokens 0", ">= 1"]),
        (["--temperature", "-1"], ["--temperature -1", "> 0"]),
        (["--temperature", "nan"], ["--temperature nan", "finite"]),
        (["--samples", "0"], ["--samples 0", ">= 1"]),  # item 14: ran 32 before
        (["--top-p", "1.5"], ["--top-p 1.5", "(0, 1]"]),
        (["--max-new-tokens", "96"], ["--max-new-tokens 96", "96-token context"]),
        (["--urls", "localhost:1"], ["--urls", "http"]),
    ],
)
def test_eval_bad_flag(capsys, tiny_hf, bench, tmp_path, extra, must_name):
    out = tmp_path / "eval"
    _refused(capsys, _eval_argv(tiny_hf, bench, out, *extra), must_name, tiny_hf, bench, created=[out])


def test_eval_out_is_a_file(capsys, tiny_hf, bench, tmp_path):
    out = tmp_path / "results"
    out.write_text("my notes\n")
    _refused(capsys, _eval_argv(tiny_hf, bench, out), ["--out", str(out), "not a directory"], tiny_hf, bench, out)


def test_eval_out_inside_hf_or_over_benchmark(capsys, tiny_hf, bench, tmp_path):
    _refused(capsys, _eval_argv(tiny_hf, bench, tiny_hf / "eval"), ["--out", "inside --hf"], tiny_hf, bench,
             created=[tiny_hf / "eval"])
    # OUT/mini.jsonl would be the benchmark file itself: records appended to the input
    _refused(capsys, _eval_argv(tiny_hf, bench, tmp_path), ["--benchmarks", "written over it"], tiny_hf, bench)


def test_eval_unknown_benchmark_file_names_the_flags(capsys, tiny_hf, bench, tmp_path):
    argv = ["eval", "--hf", str(tiny_hf), "--benchmarks", str(bench), "--out", str(tmp_path / "eval")]
    line = _refused(capsys, argv, ["--problem-field", "--answer-field", str(bench)], tiny_hf, bench,
                    created=[tmp_path / "eval"])
    assert "problem_field=" not in line and "name=" not in line


def test_eval_resume_with_non_utf8_results(capsys, tiny_hf, bench, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    # an interrupted last line too: it must not be cut off before the file is found unusable
    (out / "mini.jsonl").write_bytes(b'\xff\xfe not text\n{"partial')
    line = _refused(capsys, _eval_argv(tiny_hf, bench, out, "--samples", "1"), [f"{out / 'mini.jsonl'}:1", "UTF-8"],
                    tiny_hf, bench, out)
    assert "delete the file" in line
