"""evaluate_benchmarks: avg@k against a fake engine (exact reference), files, table, resume, errors."""

from __future__ import annotations

import json

import pytest

from helpers import random_qwen2
from megatron_nft.data.benchmarks import BenchmarkProblem
from megatron_nft.data.tokenizer import train_bpe_tokenizer
from megatron_nft.errors import DataError
from megatron_nft.evaluate import (
    PAPER_TEMPERATURE,
    PAPER_TOP_P,
    evaluate_benchmarks,
    format_results_table,
    paper_samples,
    paper_sampling,
)
from megatron_nft.rollout.base import Completion, RolloutEngine, SamplingParams

PROBLEMS = [BenchmarkProblem(f"p{i}", f"What is {i} + {i}?", str(2 * i)) for i in range(4)]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [p.problem for p in PROBLEMS] + [f"The answer is \\boxed{{{i}}}." for i in range(10)]
    return train_bpe_tokenizer(corpus * 4, vocab_size=320)


class FakeEngine(RolloutEngine):
    """Answers each prompt with fixed texts (cycled over the n samples); records every call."""

    def __init__(self, tokenizer, answers: dict[str, list[tuple[str, str]]]):
        self.tokenizer, self.answers, self.calls = tokenizer, answers, []

    def generate(self, prompts, params):
        self.calls.append([self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts])
        out = []
        for i, text in enumerate(self.calls[-1]):
            fixed = self.answers[text]
            for j in range(params.n):
                response, reason = fixed[j % len(fixed)]
                ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
                out.append(Completion(i, ids, [0.0] * len(ids), reason, 0))
        return out

    def update_weights(self, named_tensors, version):
        pass

    @property
    def weight_version(self):
        return 0


class CountingEngine(RolloutEngine):
    """Wraps an engine and counts the prompts it is asked to generate for."""

    def __init__(self, inner):
        self.inner, self.prompts = inner, []

    def generate(self, prompts, params):
        self.prompts.extend(tuple(p) for p in prompts)
        return self.inner.generate(prompts, params)

    def update_weights(self, named_tensors, version):
        self.inner.update_weights(named_tensors, version)

    @property
    def weight_version(self):
        return self.inner.weight_version


def _right(i):
    return (f"so \\boxed{{{2 * i}}}", "stop")


def _wrong(i):
    return (f"so \\boxed{{{2 * i + 1}}}", "stop")


def test_paper_defaults():
    assert [paper_samples(n) for n in ("aime24", "aime25", "amc23")] == [32, 32, 32]
    assert [paper_samples(n) for n in ("math500", "minerva_math", "olympiadbench")] == [1, 1, 1]
    assert PAPER_TOP_P == 0.7 and PAPER_TEMPERATURE == {"7b": 0.6, "32b": 1.0}
    s = paper_sampling("32b", max_new_tokens=100)
    assert (s.temperature, s.top_p, s.max_new_tokens) == (1.0, 0.7, 100)
    with pytest.raises(ValueError, match="model_size"):
        paper_sampling("13b", 10)


@pytest.mark.parametrize("grader", ["math_verify", "qwen_math"])
def test_fake_engine_exact_accuracy(tokenizer, tmp_path, grader):
    # p0: 3 of 4 right; p1: all right; p2: none right; p3: 2 right but one of them truncated.
    answers = {
        PROBLEMS[0].problem: [_right(0), _right(0), _wrong(0), _right(0)],
        PROBLEMS[1].problem: [_right(1)],
        PROBLEMS[2].problem: [_wrong(2), ("no answer at all", "stop")],
        PROBLEMS[3].problem: [_right(3), (_right(3)[0], "length"), _wrong(3), _wrong(3)],
    }
    engine = FakeEngine(tokenizer, answers)
    acc = evaluate_benchmarks(
        engine, tokenizer, {"tiny": PROBLEMS, "one": PROBLEMS[:1]}, out_dir=tmp_path, samples={"tiny": 4, "one": 4},
        sampling=SamplingParams(max_new_tokens=8), template="raw", grader=grader, max_prompt_len=64, workers=1,
        chunk_size=3, progress=False,
    )
    assert acc["tiny"] == pytest.approx((0.75 + 1 + 0 + 0.25) / 4)
    assert acc["one"] == pytest.approx(0.75)
    records = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["p0", "p1", "p2", "p3"]
    assert records[0]["scores"] == [1.0, 1.0, 0.0, 1.0] and records[0]["mean_score"] == 0.75
    assert records[3]["finish_reasons"] == ["stop", "length", "stop", "stop"] and records[3]["scores"] == [1.0, 0.0, 0.0, 0.0]
    assert records[1]["responses"] == ["so \\boxed{2}"] * 4 and records[1]["answer"] == "2"
    assert [len(c) for c in engine.calls] == [3, 1, 1]  # chunks of 3 problems
    table = (tmp_path / "results.md").read_text()
    assert "tiny (avg@4)" in table and "one (avg@4)" in table
    assert "| model | 50.0 | 75.0 | 62.5 |" in table
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_format_results_table():
    text = format_results_table({"aime24": 0.1234, "math500": 0.5}, {"aime24": 32, "math500": 1}, model_name="nft-7b")
    lines = text.splitlines()
    assert lines[0] == "| Model | aime24 (avg@32) | math500 (avg@1) | Avg. |"
    assert lines[2] == "| nft-7b | 12.3 | 50.0 | 31.2 |"


def test_prompt_too_long_names_benchmark_and_problem(tokenizer, tmp_path):
    long = [*PROBLEMS[:2], BenchmarkProblem("long-one", "What is " + "1 + " * 200 + "1?", "201")]
    engine = FakeEngine(tokenizer, {})
    with pytest.raises(DataError, match=r"benchmark 'tiny', problem id 'long-one'.*max_prompt_len=32"):
        evaluate_benchmarks(engine, tokenizer, {"tiny": long}, out_dir=tmp_path, samples={"tiny": 1},
                            sampling=SamplingParams(max_new_tokens=4), template="raw", max_prompt_len=32, workers=1,
                            progress=False)
    assert engine.calls == []


def test_resume_mismatched_samples_is_an_error(tokenizer, tmp_path):
    engine = FakeEngine(tokenizer, {p.problem: [_right(int(p.id[1:]))] for p in PROBLEMS})
    kw = dict(out_dir=tmp_path, sampling=SamplingParams(max_new_tokens=8), template="raw", max_prompt_len=64,
              workers=1, progress=False)
    evaluate_benchmarks(engine, tokenizer, {"tiny": PROBLEMS}, samples={"tiny": 1}, **kw)
    with pytest.raises(DataError, match="evaluated with 1 samples"):
        evaluate_benchmarks(engine, tokenizer, {"tiny": PROBLEMS}, samples={"tiny": 2}, **kw)


def test_local_engine_files_table_and_resume(tokenizer, tmp_path):
    from megatron_nft.rollout.local import LocalEngine

    config, model = random_qwen2(vocab=len(tokenizer), hidden=32, layers=1, heads=2, kv_heads=1, ffn=48)
    inner = LocalEngine(config, seed=0)
    inner.update_weights(model.named_parameters(), 0)
    engine = CountingEngine(inner)
    kw = dict(out_dir=tmp_path, samples={"tiny": 2}, sampling=SamplingParams(temperature=1.0, top_p=0.7, max_new_tokens=6),
              template="raw", grader="qwen_math", max_prompt_len=64, workers=1, chunk_size=2, progress=False)

    acc = evaluate_benchmarks(engine, tokenizer, {"tiny": PROBLEMS}, **kw)
    assert 0.0 <= acc["tiny"] <= 1.0
    path = tmp_path / "tiny.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and len(engine.prompts) == 4
    for line in lines:
        r = json.loads(line)
        assert len(r["responses"]) == len(r["scores"]) == len(r["finish_reasons"]) == 2
        assert set(r["finish_reasons"]) <= {"stop", "length"}
    assert (tmp_path / "results.md").exists()

    # Nothing left to do: no generation at all.
    engine.prompts.clear()
    assert evaluate_benchmarks(engine, tokenizer, {"tiny": PROBLEMS}, **kw) == acc
    assert engine.prompts == []

    # Delete the last record: only that problem is regenerated.
    path.write_text("\n".join(lines[:3]) + "\n")
    evaluate_benchmarks(engine, tokenizer, {"tiny": PROBLEMS}, **kw)
    assert [tokenizer.decode(p, skip_special_tokens=True) for p in engine.prompts] == [PROBLEMS[3].problem]
    new_lines = path.read_text().splitlines()
    assert new_lines[:3] == lines[:3] and json.loads(new_lines[3])["id"] == "p3"

    # A truncated last line (interrupted write) is dropped and that problem redone.
    engine.prompts.clear()
    path.write_text("\n".join(new_lines[:3]) + "\n" + new_lines[3][:20])
    evaluate_benchmarks(engine, tokenizer, {"tiny": PROBLEMS}, **kw)
    assert len(engine.prompts) == 1
    final = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in final] == ["p0", "p1", "p2", "p3"]
