"""Data side: prompt templates, the arithmetic task, the offline BPE tokenizer, prompt files, the cursor."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_nft.data.arithmetic import arithmetic_splits, make_arithmetic_problems, reference_response
from megatron_nft.data.prompts import PromptCursor, PromptRow, encode_prompts, load_prompt_rows
from megatron_nft.data.templates import DAPO_PREFIX, DAPO_SUFFIX, render_prompt
from megatron_nft.data.tokenizer import train_bpe_tokenizer
from megatron_nft.errors import DataError, UserError

DAPO_TEXT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "{p}\n\nRemember to put your answer on its own line after \"Answer:\"."
)


def _corpus(n=300, seed=0, max_operand=30):
    rows = make_arithmetic_problems(n, seed, max_operand=max_operand, ops=("+", "-"))
    return [render_prompt(r["problem"], "dapo") for r in rows] + [reference_response(r["answer"]) for r in rows]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(_corpus(), vocab_size=400)


# ---------------------------------------------------------------------------------------------- templates


def test_templates_exact_text():
    p = "What is 1 + 2?"
    assert render_prompt(p, "dapo") == DAPO_TEXT.format(p=p) == DAPO_PREFIX + p + DAPO_SUFFIX
    assert render_prompt(p, "boxed") == p + "\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert render_prompt(p, "raw") == p


def test_unknown_template_lists_allowed_names():
    with pytest.raises(ValueError) as e:
        render_prompt("x", "qwen")
    assert "'qwen'" in str(e.value) and all(n in str(e.value) for n in ("dapo", "boxed", "raw"))
    assert isinstance(e.value, UserError)  # the CLI prints it as one line
    with pytest.raises(ValueError, match="qwen"):
        encode_prompts(None, [], template="qwen", max_prompt_len=10)


def test_chat_wrap(tok):
    text = render_prompt("What is 1 + 2?", "raw", tok, chat=True)
    assert text == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt("x", "boxed", tok, chat=True).startswith("<|im_start|>user\nx\nPlease")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        render_prompt("x", "raw", None, chat=True)

    class Plain:
        chat_template = None
        name_or_path = "plain-tok"

    with pytest.raises(ValueError, match="plain-tok.*no chat_template"):
        render_prompt("x", "raw", Plain(), chat=True)
    assert render_prompt("x", "raw", Plain(), chat=False) == "x"


# --------------------------------------------------------------------------------------------- arithmetic


def _check(row):
    m = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", row["problem"])
    assert m, row
    a, op, b = int(m[1]), m[2], int(m[3])
    return a, op, b, {"+": a + b, "-": a - b, "*": a * b}[op] == int(row["answer"])


def test_arithmetic_deterministic_and_correct():
    a = make_arithmetic_problems(200, 7, max_operand=20, ops=("+", "-", "*"))
    assert a == make_arithmetic_problems(200, 7, max_operand=20, ops=("+", "-", "*"))
    assert a != make_arithmetic_problems(200, 8, max_operand=20, ops=("+", "-", "*"))
    assert len({r["problem"] for r in a}) == 200  # distinct while the space allows
    parsed = [_check(r) for r in a]
    assert all(ok for *_, ok in parsed)
    assert {op for _, op, _, _ in parsed} == {"+", "-", "*"}
    assert all(0 <= x <= 20 and 0 <= y <= 20 for x, _, y, _ in parsed)
    assert all(int(r["answer"]) >= 0 for r in a)  # "-" keeps results non-negative by default
    neg = make_arithmetic_problems(300, 1, max_operand=9, ops=("-",), allow_negative=True)
    assert any(int(r["answer"]) < 0 for r in neg) and all(_check(r)[3] for r in neg)
    lo = make_arithmetic_problems(50, 1, min_operand=5, max_operand=9)
    assert all(5 <= x <= 9 and 5 <= y <= 9 for x, _, y, _ in map(_check, lo))


def test_arithmetic_space_exhaustion_repeats_evenly():
    rows = make_arithmetic_problems(2 * 16 + 5, 0, max_operand=3)  # 4*4 = 16 distinct "+" problems
    counts = {}
    for r in rows:
        counts[r["problem"]] = counts.get(r["problem"], 0) + 1
    assert len(counts) == 16 and set(counts.values()) <= {2, 3}
    tri = make_arithmetic_problems(100, 0, max_operand=3, ops=("-",))  # a >= b: 10 problems
    assert len({r["problem"] for r in tri}) == 10


def test_arithmetic_splits_disjoint():
    train, held = arithmetic_splits(4000, 200, seed=1234, max_operand=50)  # the demo recipe
    assert len(train) == 4000 and len(held) == 200
    held_problems = {r["problem"] for r in held}
    assert len(held_problems) == 200
    assert not held_problems & {r["problem"] for r in train}
    assert len({r["problem"] for r in train}) == 51 * 51 - 200  # space exhausted: every other problem used
    assert (train, held) == arithmetic_splits(4000, 200, seed=1234, max_operand=50)
    assert arithmetic_splits(4000, 200, seed=1, max_operand=50)[1] != held
    big_train, big_held = arithmetic_splits(300, 50, seed=0, max_operand=1000, ops=("+", "-"))  # sparse path
    assert len({r["problem"] for r in big_train}) == 300
    assert not {r["problem"] for r in big_held} & {r["problem"] for r in big_train}
    train, held = arithmetic_splits(10, 0, seed=0, max_operand=5)
    assert len(train) == 10 and held == []
    with pytest.raises(ValueError, match="only 16 distinct problems"):
        arithmetic_splits(10, 16, seed=0, max_operand=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ops": ("/",)}, "unknown arithmetic op '/'"),
        ({"ops": ()}, "ops is empty"),
        ({"ops": ("+", "+")}, "repeats"),
        ({"max_operand": -1}, "min_operand <= max_operand"),
        ({"min_operand": 5, "max_operand": 2}, "min_operand <= max_operand"),
    ],
)
def test_arithmetic_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_arithmetic_problems(5, 0, **kwargs)


def test_reference_response():
    assert reference_response("42") == "Answer: 42"
    assert reference_response("-3", "boxed") == "\\boxed{-3}"
    with pytest.raises(ValueError, match="'latex'.*dapo, boxed"):
        reference_response("1", "latex")


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_digits(tok):
    samples = _corpus(20, seed=99) + [
        render_prompt("What is 123 + 4567?", "boxed"),
        "  leading spaces,\ttabs\r\nand unicode: ∑ café 😀 ½ ²",
        "Answer: -17\n",
        "",
    ]
    for text in samples:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    chat = render_prompt("What is 3 + 4?", "dapo", tok, chat=True)
    assert tok.decode(tok.encode(chat)) == chat
    for d in "0123456789":
        assert len(tok.encode(d)) == 1
    ids = tok.encode("9876543210")
    assert len(ids) == 10 and [tok.decode([i]) for i in ids] == list("9876543210")
    assert tok.encode("12") == tok.encode("1") + tok.encode("2")


def test_tokenizer_special_tokens(tok):
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok.encode(s)) == 1
        assert tok.convert_ids_to_tokens(tok.encode(s)) == [s]
    assert tok.encode("7") == [tok.convert_tokens_to_ids("7")]  # no BOS/EOS added
    assert len(tok) <= 400 and tok.decode(tok.encode("x<|endoftext|>"), skip_special_tokens=True) == "x"


def test_tokenizer_save_and_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    trained = train_bpe_tokenizer(_corpus(), vocab_size=400, out_dir=tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    texts = _corpus(30, seed=5) + [render_prompt("What is 2 + 2?", "raw", trained, chat=True)]
    assert loaded(texts)["input_ids"] == trained(texts)["input_ids"] == tok(texts)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (trained.eos_token_id, trained.pad_token_id, len(trained))
    assert render_prompt("q", "dapo", loaded, chat=True) == render_prompt("q", "dapo", trained, chat=True)
    assert loaded.decode(loaded.encode(texts[0])) == texts[0]


def test_tokenizer_deterministic_across_processes(tok):
    model = lambda tokenizer_json: json.loads(tokenizer_json)["model"]  # noqa: E731  (vocab + merges)
    again = train_bpe_tokenizer(_corpus(), vocab_size=400)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_data import _corpus; "
        "from megatron_nft.data.tokenizer import train_bpe_backend; "
        "print(train_bpe_backend(_corpus(), vocab_size=400).to_str())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert model(out) == model(tok.backend_tokenizer.to_str())


def test_tokenizer_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size=100 is below the byte-level minimum of 259"):
        train_bpe_tokenizer(["a"], vocab_size=100)
    with pytest.raises(ValueError, match="at least one text"):
        train_bpe_tokenizer([], vocab_size=300)


# -------------------------------------------------------------------------------------------- prompt files


def _write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return path


def _dapo_parquet(path, n_unique=3, repeats=4, **overrides):
    """A miniature of DAPO-Math-17k's layout: every prompt repeated, chat-message prompts, struct answers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for rep in range(repeats):
        for i in range(n_unique):
            records.append(
                {
                    "data_source": "math_dapo",
                    "prompt": [{"content": DAPO_PREFIX + f"Find {i} + {i}." + DAPO_SUFFIX, "role": "user"}],
                    "ability": "MATH",
                    "reward_model": {"ground_truth": str(2 * i), "style": "rule-lighteval/MATH_v2"},
                    "extra_info": {"index": f"uuid-{i}-{rep}"},
                }
            )
    for k, v in overrides.items():
        records[-1][k] = v
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_jsonl_rows_dotted_fields_and_dedup(tmp_path, caplog):
    path = _write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"question": "What is 1 + 1?", "meta": {"gold": "2"}, "id": "a"},
            "",
            {"question": "What is 2 + 2?", "meta": {"gold": 4}},
            {"question": "What is 1 + 1?", "meta": {"gold": "2"}, "id": "dup"},
            {"question": "What is 1 + 1?", "meta": {"gold": " 3 "}},
        ],
    )
    with caplog.at_level(logging.INFO, logger="megatron_nft.data.prompts"):
        rows = load_prompt_rows(path, prompt_field="question", answer_field="meta.gold")
    assert rows == [
        PromptRow("a", "What is 1 + 1?", "2", f"{path}:1"),
        PromptRow(f"{path}:3", "What is 2 + 2?", "4", f"{path}:3"),
        PromptRow(f"{path}:5", "What is 1 + 1?", "3", f"{path}:5"),
    ]
    assert (rows.n_rows, rows.n_unique) == (4, 3)
    assert f"{path}: 4 rows, 3 unique" in caplog.text
    assert len(load_prompt_rows(path, prompt_field="question", answer_field="meta.gold", dedup=False)) == 4
    same = load_prompt_rows(tmp_path / "p.jsonl", prompt_field="question", answer_field="meta.gold", id_field="question")
    assert same[0].id == "What is 1 + 1?"


def test_dapo_parquet(tmp_path, tok):
    path = _dapo_parquet(tmp_path / "dapo.parquet")
    rows = load_prompt_rows(path, prompt_field="prompt", answer_field="reward_model.ground_truth")
    assert (rows.n_rows, rows.n_unique) == (12, 3)
    assert [r.answer for r in rows] == ["0", "2", "4"]
    assert [r.id for r in rows] == ["uuid-0-0", "uuid-1-0", "uuid-2-0"]
    assert rows[1].source == f"{path}:2" and rows[1].problem == DAPO_PREFIX + "Find 1 + 1." + DAPO_SUFFIX
    ids = encode_prompts(tok, rows, template="raw", max_prompt_len=200)
    assert ids[1] == tok.encode(render_prompt("Find 1 + 1.", "dapo"))  # raw on DAPO's text == our dapo template
    same = load_prompt_rows(tmp_path / "dapo.parquet", fmt="parquet", prompt_field="prompt", answer_field="reward_model.ground_truth")
    assert same == rows


def test_chat_message_prompts_in_jsonl(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 5 + 5?"}]
    rows = load_prompt_rows(_write_jsonl(tmp_path / "c.jsonl", [{"prompt": msgs, "answer": "10"}]))
    assert rows[0].problem == "What is 5 + 5?"


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"prompt": "q", "answer": ', r":2: invalid JSON .*expected one JSON object per line"),
        ("[1, 2]", r":2: a JSON list; expected one JSON object per line"),
        ({"prompt": "q"}, r":2: no field 'answer'; expected the gold answer"),
        ({"prompt": "q", "answer": ""}, r":2: field 'answer' is empty; expected the gold answer"),
        ({"prompt": "q", "answer": "   "}, r":2: field 'answer' is empty"),
        ({"prompt": "q", "answer": None}, r":2: field 'answer' is null; expected the gold answer"),
        ({"prompt": "q", "answer": ["1", "2"]}, r":2: field 'answer' is list \['1', '2'\]; expected a string or a number"),
        ({"prompt": "q", "answer": True}, r":2: field 'answer' is bool True; expected a string or a number"),
        ({"answer": "1"}, r":2: no field 'prompt'; expected the problem"),
        ({"prompt": "", "answer": "1"}, r":2: field 'prompt' is empty; expected the problem text"),
        ({"prompt": None, "answer": "1"}, r":2: field 'prompt' is null"),
        ({"prompt": 17, "answer": "1"}, r":2: field 'prompt' is int 17; expected a string"),
        ({"prompt": [{"role": "system", "content": "x"}], "answer": "1"}, r":2: field 'prompt' is a list without a user message"),
        ({"prompt": [{"role": "user", "content": 5}], "answer": "1"}, r":2: field 'prompt\[role=user\].content' is int 5"),
    ],
)
def test_jsonl_bad_rows_name_file_line_field(tmp_path, line, expected):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1"}, line])
    with pytest.raises(DataError, match=re.escape(str(path)) + expected) as e:
        load_prompt_rows(path)
    assert "\n" not in str(e.value)


def test_bad_nested_field_and_id_field(tmp_path):
    path = _write_jsonl(tmp_path / "n.jsonl", [{"p": "q", "rm": {"gt": "1"}}, {"p": "q2", "rm": "flat"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: no field 'rm.gt'")):
        load_prompt_rows(path, prompt_field="p", answer_field="rm.gt")
    with pytest.raises(DataError, match=re.escape(f"{path}:1: no field 'uid'; expected the row id")):
        load_prompt_rows(path, prompt_field="p", answer_field="p", id_field="uid")
    with pytest.raises(DataError, match=re.escape(f"{path}: answer_field='rm.' is not a field path")):
        load_prompt_rows(path, prompt_field="p", answer_field="rm.")


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file")):
        load_prompt_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: not a file")):
        load_prompt_rows(tmp_path)
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"p\.csv: cannot tell the format from the suffix '\.csv'"):
        load_prompt_rows(tmp_path / "p.csv")
    with pytest.raises(DataError, match=r"p\.csv: unknown format 'csv'; expected 'jsonl' or 'parquet'"):
        load_prompt_rows(tmp_path / "p.csv", fmt="csv")
    empty = _write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=re.escape(f"{empty}: no rows")):
        load_prompt_rows(empty)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"prompt": "q", "answer": "1"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=re.escape(f"{binary}:2: not UTF-8")):
        load_prompt_rows(binary)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=re.escape(f"{junk}: not a readable Parquet file")):
        load_prompt_rows(junk)


def test_bad_parquet_columns_and_rows(tmp_path):
    path = _dapo_parquet(tmp_path / "d.parquet")
    with pytest.raises(DataError, match=re.escape(f"{path}: no column 'answer' for field 'answer'") + ".*reward_model"):
        load_prompt_rows(path)
    with pytest.raises(DataError, match=re.escape(f"{path}:1: no field 'reward_model.truth'")):
        load_prompt_rows(path, answer_field="reward_model.truth")
    bad = _dapo_parquet(tmp_path / "e.parquet", reward_model={"ground_truth": "", "style": "x"})
    with pytest.raises(DataError, match=re.escape(f"{bad}:12: field 'reward_model.ground_truth' is empty")):
        load_prompt_rows(bad, answer_field="reward_model.ground_truth")


# ----------------------------------------------------------------------------------------------- encoding


def test_encode_prompts(tok):
    rows = make_arithmetic_problems(5, 0)
    ids = encode_prompts(tok, rows, template="dapo", max_prompt_len=100)
    assert ids == [tok.encode(render_prompt(r["problem"], "dapo")) for r in rows]
    chat = encode_prompts(tok, rows, template="dapo", chat=True, max_prompt_len=100)
    assert chat[0] == tok.encode(render_prompt(rows[0]["problem"], "dapo", tok, chat=True))
    assert chat[0][0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert encode_prompts(tok, [], template="dapo", max_prompt_len=1) == []


def test_encode_prompts_too_long_names_row(tok, tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "x " * 80, "answer": "1"}])
    rows = load_prompt_rows(path)
    n = len(tok.encode(render_prompt("x " * 80, "boxed")))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: prompt is {n} tokens with template 'boxed'; expected at most max_prompt_len=60")):
        encode_prompts(tok, rows, template="boxed", max_prompt_len=60)
    with pytest.raises(DataError, match=re.escape(f"{path}:1: prompt is") + r".*\(1 more rows are over the limit\)"):
        encode_prompts(tok, rows, template="dapo", max_prompt_len=5)
    with pytest.raises(DataError, match=r"row 0: prompt is \d+ tokens"):
        encode_prompts(tok, [{"problem": "What is 1 + 1?", "answer": "2"}], template="dapo", max_prompt_len=5)
    with pytest.raises(DataError, match=r"x\.jsonl:3 \(id q7\): prompt is"):
        encode_prompts(tok, [PromptRow("q7", "What is 1 + 1?", "2", "x.jsonl:3")], template="dapo", max_prompt_len=5)
    with pytest.raises(DataError, match="prompt row 0: a str; expected a PromptRow"):
        encode_prompts(tok, ["What is 1 + 1?"], template="dapo", max_prompt_len=5)


# ------------------------------------------------------------------------------------------------- cursor


def test_cursor_epochs_and_determinism():
    rows = list(range(10))
    c = PromptCursor(rows, seed=3)
    epoch0 = c.next_batch(10)
    assert sorted(epoch0) == rows and epoch0 != rows
    assert c.epoch == 0
    epoch1 = c.next_batch(4) + c.next_batch(6)
    assert sorted(epoch1) == rows and epoch1 != epoch0
    spanning = c.next_batch(25)  # epochs 2, 3 and half of 4
    assert sorted(spanning[:10]) == sorted(spanning[10:20]) == rows and c.epoch == 4
    again = PromptCursor(rows, seed=3)
    assert again.next_batch(45) == epoch0 + epoch1 + spanning
    assert PromptCursor(rows, seed=4).next_batch(10) != epoch0
    assert c.next_batch(0) == [] and len(c) == 10
    with pytest.raises(ValueError):
        PromptCursor([], seed=0)


def test_cursor_resume_gives_same_prompts():
    rows = [f"p{i}" for i in range(7)]
    a = PromptCursor(rows, seed=11)
    for _ in range(3):
        a.next_batch(3)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_batch(3) for _ in range(6)]
    b = PromptCursor(rows, seed=999)  # the state carries the seed
    b.load_state_dict(state)
    assert [b.next_batch(3) for _ in range(6)] == expected
    with pytest.raises(DataError, match="state is for 7 prompts but this run has 6"):
        PromptCursor(rows[:6], seed=11).load_state_dict(state)
    with pytest.raises(DataError, match="lacks position"):
        PromptCursor(rows, seed=11).load_state_dict({"seed": 1, "epoch": 0, "n_rows": 7})
    with pytest.raises(DataError, match="position=9"):
        PromptCursor(rows, seed=11).load_state_dict({**state, "position": 9})
