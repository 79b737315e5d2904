"""Prompt datasets for training and evaluation: JSON Lines and Parquet files -> PromptRow lists ->
token ids, and the resumable cursor that hands the trainer its prompts.

Fields are named by dotted paths into nested objects ("reward_model.ground_truth"). A prompt field may
hold the problem text or a list of chat messages [{"role": "user", "content": ...}], whose (last) user
message is taken. That covers the DAPO-Math-17k parquet as published:

    load_prompt_rows("dapo-math-17k.parquet", prompt_field="prompt", answer_field="reward_model.ground_truth")
    # its prompts already carry DAPO's instructions: encode them with template="raw"

That file repeats every prompt ~100 times, so rows are de-duplicated on (problem, answer), keeping the
first occurrence; the counts are logged and kept on the returned list (`.n_rows`, `.n_unique`).

Every unusable input raises DataError with one line: "<file>:<line>: <field> <what is wrong>; expected
<what>". Line numbers are 1-based lines for JSON Lines and 1-based row numbers for Parquet.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from megatron_nft.data.templates import check_template, render_prompt
from megatron_nft.errors import DataError

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
ID_FIELDS = ("id", "extra_info.index")  # tried in order when id_field is not given
_MISSING = object()


@dataclass(frozen=True)
class PromptRow:
    id: str  # the row's own id field when it has one (DAPO: extra_info.index), else `source`
    problem: str  # the text the template is applied to
    answer: str  # the gold answer handed to the verifier
    source: str  # "<file>:<line>" where the row was read (first occurrence)


class PromptRows(list):
    """A list of PromptRow that also remembers how many rows the file had before de-duplication."""

    def __init__(self, rows=(), *, n_rows: int = 0, path: str = ""):
        super().__init__(rows)
        self.n_rows, self.path = n_rows, path

    @property
    def n_unique(self) -> int:
        return len(self)


def _get(obj, dotted: str):
    """Follows a dotted path through nested dicts; _MISSING where any step is absent."""
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def _problem_text(value, where: str, field: str) -> str:
    if value is None:
        raise DataError(f"{where}: field {field!r} is null; expected the problem text")
    if isinstance(value, list):  # chat messages: the last user turn is the problem
        users = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise DataError(f"{where}: field {field!r} is a list without a user message; expected a string or chat messages with a 'user' turn")
        value = users[-1].get("content")
        field = f"{field}[role=user].content"
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__} {_short(value)}; expected a string")
    if not value.strip():
        raise DataError(f"{where}: field {field!r} is empty; expected the problem text")
    return value


def _answer_text(value, where: str, field: str) -> str:
    if value is None:
        raise DataError(f"{where}: field {field!r} is null; expected the gold answer")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__} {_short(value)}; expected a string or a number")
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: field {field!r} is empty; expected the gold answer")
    return text


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _detect_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("jsonl", "parquet"):
            raise DataError(f"{path}: unknown format {fmt!r}; expected 'jsonl' or 'parquet'")
        return fmt
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; expected one of "
            f"{', '.join(FORMATS)} (or pass fmt='jsonl' / 'parquet')"
        )
    return found


def _jsonl_records(path: Path):
    """(line number, object) for each non-blank line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason}); expected UTF-8 JSON Lines") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: a JSON {type(record).__name__}; expected one JSON object per line")
            yield lineno, record


def _parquet_records(path: Path, fields: list[str]):
    """(row number, object) with only the top-level columns the fields need, batch by batch (the
    DAPO file has ~1.8M rows: converting only the needed columns keeps this to seconds)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}); expected a Parquet file") from None
    names = parquet.schema_arrow.names
    columns = []
    for field in fields:
        top = field.split(".")[0]
        if top not in names:
            raise DataError(f"{path}: no column {top!r} for field {field!r}; the file has columns: {', '.join(names)}")
        if top not in columns:
            columns.append(top)
    rowno = 0
    for batch in parquet.iter_batches(batch_size=8192, columns=columns):
        for record in batch.to_pylist():
            rowno += 1
            yield rowno, record


def load_prompt_rows(
    path,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    fmt: str | None = None,
    id_field: str | None = None,
    dedup: bool = True,
) -> PromptRows:
    """Reads a JSON Lines or Parquet prompt file (format from the suffix unless `fmt` is given) into
    PromptRows, de-duplicated on (problem, answer) unless dedup=False. `id_field` names the row id;
    by default "id", then "extra_info.index" are tried, and the row's "<file>:<line>" is the fall-back."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; expected a .jsonl or .parquet prompt file")
    if not path.is_file():
        raise DataError(f"{path}: not a file; expected a .jsonl or .parquet prompt file")
    kind = _detect_format(path, fmt)
    for name, value in (("prompt_field", prompt_field), ("answer_field", answer_field), ("id_field", id_field)):
        if value is not None and (not value or any(not part for part in value.split("."))):
            raise DataError(f"{path}: {name}={value!r} is not a field path; expected names joined by dots")
    id_fields = [id_field] if id_field else list(ID_FIELDS)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            names = set(pq.read_schema(path).names)
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}); expected a Parquet file") from None
        wanted = [prompt_field, answer_field] + [f for f in id_fields if id_field or f.split(".")[0] in names]
        records = _parquet_records(path, wanted)
    else:
        records = _jsonl_records(path)

    rows, seen, n_rows = [], set(), 0
    for lineno, record in records:
        n_rows += 1
        where = f"{path}:{lineno}"
        raw = _get(record, prompt_field)
        if raw is _MISSING:
            raise DataError(f"{where}: no field {prompt_field!r}; expected the problem under {prompt_field!r} (set prompt_field)")
        problem = _problem_text(raw, where, prompt_field)
        raw = _get(record, answer_field)
        if raw is _MISSING:
            raise DataError(f"{where}: no field {answer_field!r}; expected the gold answer under {answer_field!r} (set answer_field)")
        answer = _answer_text(raw, where, answer_field)
        row_id = where
        for field in id_fields:
            value = _get(record, field)
            if value is not _MISSING and value is not None:
                row_id = str(value)
                break
        else:
            if id_field:
                raise DataError(f"{where}: no field {id_field!r}; expected the row id under {id_field!r} (set id_field)")
        key = (problem, answer)
        if dedup and key in seen:
            continue
        seen.add(key)
        rows.append(PromptRow(id=row_id, problem=problem, answer=answer, source=where))
    if not rows:
        raise DataError(f"{path}: no rows; expected at least one prompt")
    out = PromptRows(rows, n_rows=n_rows, path=str(path))
    log.info("%s: %d rows, %d unique", path, out.n_rows, out.n_unique)
    return out


def _describe(row, index: int) -> tuple[str, str]:
    """(problem, a name for the row in messages) for a PromptRow or a dict with 'problem'."""
    if isinstance(row, PromptRow):
        return row.problem, row.source if row.id == row.source else f"{row.source} (id {row.id})"
    if isinstance(row, dict) and "problem" in row:
        name = row.get("source") or (f"id {row['id']}" if "id" in row else f"row {index}")
        return row["problem"], str(name)
    raise DataError(f"prompt row {index}: a {type(row).__name__}; expected a PromptRow or a dict with 'problem'")


def encode_prompts(tokenizer, rows, *, template: str, chat: bool = False, max_prompt_len: int) -> list[list[int]]:
    """Token ids of each row's prompt: the template applied to its problem, wrapped in the tokenizer's
    chat template when `chat`. Without chat the tokenizer adds its usual special tokens (a BOS for
    tokenizers that have one); with chat the template already holds them. A prompt longer than
    `max_prompt_len` is an error naming the row: silently truncating a math problem changes it."""
    check_template(template)
    described = [_describe(row, i) for i, row in enumerate(rows)]
    texts = [render_prompt(problem, template, tokenizer, chat=chat) for problem, _ in described]
    if not texts:
        return []
    ids = [list(x) for x in tokenizer(texts, add_special_tokens=not chat)["input_ids"]]
    too_long = [i for i, x in enumerate(ids) if len(x) > max_prompt_len]
    if too_long:
        first = too_long[0]
        more = f" ({len(too_long) - 1} more rows are over the limit)" if len(too_long) > 1 else ""
        raise DataError(
            f"{described[first][1]}: prompt is {len(ids[first])} tokens with template {template!r}; "
            f"expected at most max_prompt_len={max_prompt_len}{more}"
        )
    return ids


class PromptCursor:
    """Hands out `rows` in batches, epoch by epoch, each epoch a fresh shuffle fixed by (seed, epoch).
    A batch may span an epoch boundary. state_dict() is JSON-serialisable; a cursor restored from it
    over the same rows continues with exactly the prompts the original would have produced."""

    def __init__(self, rows, seed: int):
        self.rows = list(rows)
        if not self.rows:
            raise ValueError("PromptCursor needs at least one row")
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index into the current epoch's order
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"prompt-cursor:{self.seed}:{epoch}").shuffle(order)  # str seeds: stable across processes
        return order

    def __len__(self) -> int:
        return len(self.rows)

    def next_batch(self, n: int) -> list:
        if n < 0:
            raise ValueError(f"batch size must be >= 0; got {n}")
        out = []
        while len(out) < n:
            if self.position == len(self.rows):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffle(self.epoch)
            take = min(n - len(out), len(self.rows) - self.position)
            out.extend(self.rows[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "n_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("seed", "epoch", "position", "n_rows") if k not in state]
        if missing:
            raise DataError(f"prompt cursor state lacks {', '.join(missing)}; expected the dict PromptCursor.state_dict() returned")
        if state["n_rows"] != len(self.rows):
            raise DataError(
                f"prompt cursor state is for {state['n_rows']} prompts but this run has {len(self.rows)}; "
                "expected the same prompt set as the run being resumed"
            )
        if not 0 <= state["position"] <= len(self.rows) or state["epoch"] < 0:
            raise DataError(f"prompt cursor state has epoch={state['epoch']}, position={state['position']}; expected epoch >= 0 and 0 <= position <= {len(self.rows)}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._shuffle(self.epoch)
