"""Local CSV / JSONL / text files as labeled texts or prompt/completion pairs."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .splits import DataError, LabeledTexts, PromptCompletions

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".text": "text"}


def file_format(path: Path, fmt: str | None) -> str:
    """The format named by `fmt`, else the one of the file suffix."""
    if fmt is not None:
        return fmt
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataError(f"{path}: cannot tell the format from the suffix '{path.suffix}'; "
                        f"set data.format to csv, jsonl or text")
    return found


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data file {path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); is it the right file?") from None


def read_records(path: str | Path, fmt: str | None = None, two_columns: tuple[str, str] = ("label", "text")
                 ) -> list[dict[str, Any]]:
    """Rows of a data file as dicts; a `.txt` row is `first<TAB>second` named by `two_columns`, or one column."""
    path = Path(path)
    kind = file_format(path, fmt)
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    rows: list[dict[str, Any]] = []
    if kind == "csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            header = reader.fieldnames or []
            for row in reader:
                if None in row or None in row.values():
                    raise DataError(f"{path}: line {reader.line_num} does not have the {len(header)} fields "
                                    f"of the header {header}")
                rows.append(row)
        except csv.Error as exc:
            raise DataError(f"{path}: not valid CSV ({exc})") from None
    elif kind == "jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno} is a JSON {type(row).__name__}, expected an object")
            rows.append(row)
    else:
        for line in text.splitlines():
            if not line.strip():
                continue
            first, tab, second = line.partition("\t")
            rows.append({two_columns[0]: first, two_columns[1]: second} if tab else {two_columns[1]: line})
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return rows


def _column(rows: list[dict[str, Any]], name: str, path: Path, role: str) -> list[str]:
    if name not in rows[0]:
        raise DataError(f"{path}: no {role} column '{name}'; columns are {sorted(rows[0])} "
                        f"(set data.{role}_column)")
    values = []
    for i, row in enumerate(rows):
        value = row.get(name)
        if value is None:
            raise DataError(f"{path}: row {i + 1} has no '{name}' value")
        values.append(str(value))
    return values


def read_labeled_texts(path: str | Path, text_column: str = "text", label_column: str = "label",
                       fmt: str | None = None, label_names: list[str] | None = None) -> LabeledTexts:
    """Texts and labels of a file; labels index `label_names` (default: the sorted distinct labels)."""
    path = Path(path)
    rows = read_records(path, fmt, (label_column, text_column))
    texts = _column(rows, text_column, path, "text")
    raw_labels = _column(rows, label_column, path, "label")
    names = sorted(set(raw_labels)) if label_names is None else list(label_names)
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(raw_labels) - set(index))
    if unknown:
        raise DataError(f"{path}: labels {unknown[:5]} do not occur in the training file (labels: {names[:10]})")
    if len(names) < 2:
        raise DataError(f"{path}: column '{label_column}' has a single label {names}; classification needs two")
    return LabeledTexts(texts, [index[v] for v in raw_labels], names)


def read_prompt_completions(path: str | Path, prompt_column: str = "prompt", completion_column: str = "completion",
                            fmt: str | None = None) -> PromptCompletions:
    """Prompt/completion pairs of a file; a text line without a tab is a completion with an empty prompt."""
    path = Path(path)
    rows = read_records(path, fmt, (prompt_column, completion_column))
    completions = _column(rows, completion_column, path, "completion")
    prompts = [str(r.get(prompt_column, "")) for r in rows]
    if prompt_column not in rows[0] and file_format(path, fmt) != "text":
        raise DataError(f"{path}: no prompt column '{prompt_column}'; columns are {sorted(rows[0])} "
                        f"(set data.prompt_column)")
    return PromptCompletions(prompts, completions)
