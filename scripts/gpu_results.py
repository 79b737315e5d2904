"""results.json and results.md of a gpu-check run, rewritten after every step.

Each write goes to a temporary name in the same folder and is renamed over the old file, so a reader
(or a machine taken back mid-step) always finds the last complete state: every step finished so far,
never half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATUSES = ("passed", "failed", "timeout", "error", "skipped")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Results:
    """The run's header (`meta`: machine, plan, start time) and one record per finished step."""

    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.doc = {**meta, "steps": []}

    def record(self, step: dict) -> None:
        if step.get("status") not in STATUSES:
            raise ValueError(f"step {step.get('name')!r}: status {step.get('status')!r} is not one of {STATUSES}")
        self.doc["steps"].append(step)
        self.write()

    def finish(self, **fields) -> None:
        self.doc.update(fields)
        self.write()

    def write(self) -> None:
        atomic_write(self.out_dir / "results.json", json.dumps(self.doc, indent=2, default=str) + "\n")
        atomic_write(self.out_dir / "results.md", render_markdown(self.doc))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value).replace("|", "\\|")


def _table(rows: list[dict]) -> list[str]:
    """A Markdown table of dicts (columns: the keys of the first row, then any new ones)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def render_markdown(doc: dict) -> str:
    steps = doc.get("steps", [])
    lines = [f"# gpu-check {doc.get('started', '')}", ""]
    for key in ("machine", "mode", "repo_commit", "bundle"):
        if doc.get(key):
            lines.append(f"- {key}: {doc[key]}")
    if "finished" in doc:
        lines.append(f"- finished: {doc['finished']} ({doc.get('wall_s', 0):.0f} s in all)")
    else:
        lines.append(f"- running: {len(steps)} of {len(doc.get('plan', []))} steps done")
    lines += ["", "| step | status | seconds / budget | summary |", "|---|---|---|---|"]
    done = {s["name"] for s in steps}
    for s in steps:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} / {s.get('budget_s', 0)} | "
                     f"{_cell(s.get('summary', ''))} |")
    for p in doc.get("plan", []):
        if p["name"] not in done:
            lines.append(f"| {p['name']} | not run | - / {p['budget_s']} | {_cell(p.get('title', ''))} |")
    for s in steps:
        lines += ["", f"## {s['name']}: {s['status']}", ""]
        if s.get("title"):
            lines += [s["title"], ""]
        for note in s.get("notes", []):
            lines.append(f"- {note}")
        if s.get("notes"):
            lines.append("")
        for name, rows in s.get("tables", {}).items():
            if rows:
                lines += [f"{name}:", "", *_table(rows), ""]
        if s.get("failures"):
            lines += ["failures:", "", *(f"- {f}" for f in s["failures"]), ""]
        if s["status"] != "passed" and s.get("log_tail"):
            lines += ["end of its output:", "", "```", s["log_tail"].rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"
