"""Read task data into plain records (list of dicts), each tagged with where it came from.

Formats (inferred from the file name unless `fmt` is given):

- ``jsonl``: one JSON object per line; ``_where`` is ``path:line``.
- ``json``: a JSON array of objects (``_where`` is ``path:[i]``), or SQuAD JSON (see `read_squad`).
- ``csv`` / ``tsv``: a header row, then one record per row (``_where`` is the row's first physical line).
  Files are read as ``utf-8-sig`` so a UTF-8 BOM does not end up in the first column name. Tab-separated
  files default to ``quoting="none"`` (csv.QUOTE_NONE): TSV has no quoting convention and GLUE files such as
  MRPC contain bare ``"`` characters that a quote-aware reader would swallow together with tabs.
- ``conll``: whitespace-separated token columns, blank line between sentences (see `read_conll`).
- ``squad``: SQuAD v1/v2 JSON, one record per question.
- ``hub``: a `datasets.load_dataset` id, used when `source` is not a file:
  ``hf:owner/name[:config][:split][@revision]`` (`parse_hub_name`), e.g. ``"hf:HuggingFaceH4/no_robots:train"``,
  ``"hf:nyu-mll/glue:mrpc:validation@main"``, or ``"nyu-mll/glue"`` with ``split="validation"``. ``owner/name``
  is always one repository; one ``:part`` is the split, two are config and split; ``owner/name/config`` is
  still read. A malformed id is a DataError showing this form.

A malformed row (bad JSON, wrong column count, a `required` field missing or empty) raises `DataError` naming
file, line and field. With ``skip_bad=True`` such rows are skipped and counted instead: a warning is logged and
`report` (a dict the caller passes) receives ``{"skipped": n, "reasons": {reason: count}}``. No rows at all is
always a `DataError`, never a silent empty list.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

log = logging.getLogger(__name__)

CONLL_SUFFIXES = {".conll", ".conllu", ".conll03", ".iob", ".iob2", ".bio", ".bioes", ".testa", ".testb", ".train",
                  ".dev", ".test", ".annotated"}  # .annotated: WNUT-17's files
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}
QUOTING = {"none": csv.QUOTE_NONE, "minimal": csv.QUOTE_MINIMAL, "all": csv.QUOTE_ALL,
           "nonnumeric": csv.QUOTE_NONNUMERIC}
FORMATS = ("jsonl", "json", "csv", "tsv", "conll", "squad", "hub")

_TRANSFORM: contextvars.ContextVar = contextvars.ContextVar("record_transform", default=None)


@contextlib.contextmanager
def record_transform(fn):
    """Within this block every record read (`read_records`, `read_conll`, `read_table_records`, ...) is first
    passed through ``fn(record, where) -> record`` (a data layout renaming columns, see
    ``tunelab.data.layouts``); ``None`` drops the row (counted in the skipped-rows report). ``fn`` may raise
    a DataError naming the row."""
    token = _TRANSFORM.set(fn)
    try:
        yield
    finally:
        _TRANSFORM.reset(token)


class _Rows:
    """Collects good records; either raises on a bad one or counts it by reason."""

    def __init__(self, source: str, skip_bad: bool, limit: int | None, required, report: dict | None, text=None):
        self.source, self.skip_bad, self.limit, self.report = source, skip_bad, limit, report
        self.required = [required] if isinstance(required, str) else list(required or [])
        self.text = [text] if isinstance(text, str) else list(text or [])
        self.records: list[dict] = []
        self.reasons: Counter = Counter()
        self.first: list[str] = []

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.records) >= self.limit

    def bad(self, where: str, reason: str, detail: str) -> None:
        if not self.skip_bad:
            raise DataError(f"{where}: {detail}")
        self.reasons[reason] += 1
        if len(self.first) < 3:
            self.first.append(f"{where}: {detail}")

    def add(self, record: dict, where: str) -> None:
        transform = _TRANSFORM.get()
        if transform is not None:
            record = transform(record, where)
            if record is None:
                self.reasons["dropped by the layout"] += 1
                return
        for key in self.required:
            if key not in record:
                return self.bad(where, f"missing field {key!r}",
                                f"field {key!r} is missing (required: {self.required}; present: {sorted(record)})")
            if record[key] is None:
                return self.bad(where, f"null field {key!r}", f"field {key!r} is null (required: {self.required})")
            if _empty(record[key]):
                return self.bad(where, f"empty field {key!r}", f"field {key!r} is empty (required: {self.required})")
            if isinstance(record[key], float) and record[key] != record[key]:
                return self.bad(where, f"NaN field {key!r}", f"field {key!r} is NaN")
        for key in self.text:
            if key in record and not isinstance(record[key], str):
                return self.bad(where, f"non-text field {key!r}", f"field {key!r} must be text, got {_kind(record[key])}")
            if key in record and "\x00" in record[key]:
                return self.bad(where, f"NUL in field {key!r}", _nul(key, record[key]))
        record["_where"] = where
        self.records.append(record)

    def finish(self) -> list[dict]:
        skipped = sum(self.reasons.values())
        if self.report is not None:
            self.report.update({"skipped": skipped, "reasons": dict(self.reasons)})
        if skipped:
            log.warning("%s: skipped %d bad rows (%s); first: %s", self.source, skipped,
                        ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common()), " | ".join(self.first))
        if not self.records:
            why = f"all {skipped} rows were bad ({dict(self.reasons)})" if skipped else "it holds no records"
            raise DataError(f"{self.source}: no records read: {why}")
        return self.records


def _nul(key: str, text: str) -> str:
    """The error for a NUL character in a text field (binary or mis-encoded data, never meant as text)."""
    return (f"field {key!r} contains a NUL character (\\x00) at character {text.index(chr(0)) + 1}: binary or "
            "mis-encoded data; remove it or set data.skip_bad_rows=true")


def _kind(value) -> str:
    """How a non-text value reads in an error: null, NaN, a list, a number (shown)."""
    if value is None:
        return "null"
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, list | dict):
        return f"a {'list' if isinstance(value, list) else 'mapping'} ({json.dumps(value)[:40]})"
    return f"{type(value).__name__} {value!r}"


def _utf8_lines(path: Path, rows: _Rows):
    """(line number, text) for each line of ``path``; a line that is not UTF-8 is a bad row naming it."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.bad(f"{path}:{n}", "not UTF-8", f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                         "re-save the file as UTF-8 or set data.skip_bad_rows=true to skip such lines")
                continue
            yield n, line.removeprefix("\ufeff") if n == 1 else line


def _read_text(path: Path) -> str:
    """The whole file as UTF-8 text (a BOM dropped), or a DataError naming the first bad line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {data[e.start]:#04x}); re-save the file as UTF-8") from None


def _empty(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, list | dict | tuple) and not value)


def infer_format(path: Path, setting: str | None = None) -> str:
    """The reader format for a file name; raises DataError listing the known suffixes and, when the caller
    has one, the config key that names the format (``setting``, e.g. "task.format: conll")."""
    suffix = path.suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    if suffix in CONLL_SUFFIXES:
        return "conll"
    known = sorted(SUFFIX_FORMATS) + sorted(CONLL_SUFFIXES)
    raise DataError(f"{path}: cannot infer the format from suffix {suffix!r}; known suffixes: {known}; "
                    + (f"or set {setting}" if setting else "rename the file with one of them"))


def _is_hub_name(source: str) -> bool:
    if source.startswith("hf:"):
        return True
    path = Path(source)
    return not path.exists() and not path.suffix and not path.is_absolute() and not source.startswith(".")


def read_records(source, fmt: str | None = None, *, skip_bad: bool = False, delimiter: str | None = None,
                 quoting: str | int | None = None, limit: int | None = None, required=None,
                 report: dict | None = None, split: str | None = None, text=None) -> list[dict]:
    """Read `source` (a file path or hub dataset name) into records, each with ``"_where"``.

    `required`: field names every record must have, non-empty (and not NaN). `text`: fields that, when
    present, must be strings (null, numbers, lists are bad rows, never the text "None").
    `limit`: stop after that many good records.
    `split`: the hub split when the name does not carry one (default "train"). See the module docstring.
    """
    source_s = str(source)
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{source_s}: unknown fmt {fmt!r}; allowed: {FORMATS}")
    if fmt == "hub" or (fmt is None and _is_hub_name(source_s)):
        rows = _Rows(source_s, skip_bad, limit, required, report, text)
        _read_hub(source_s, split, rows)
        return rows.finish()
    if fmt is None and (Path(source_s).is_dir() or Path(source_s).suffix.lower() in (".parquet", ".arrow")):
        return read_table_records(source_s, limit=limit, required=required, skip_bad=skip_bad, report=report, split=split,
                                  text=text)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: file not found" + (" (it is a directory)" if path.is_dir() else ""))
    fmt = fmt or infer_format(path)
    rows = _Rows(str(path), skip_bad, limit, required, report, text)
    if fmt == "jsonl":
        _read_jsonl(path, rows)
    elif fmt == "json":
        _read_json(path, rows)
    elif fmt in ("csv", "tsv"):
        if delimiter is None:
            delimiter = "\t" if fmt == "tsv" else ","
        if quoting is None:
            quoting = "none" if delimiter == "\t" else "minimal"
        _read_csv(path, rows, delimiter, quoting)
    elif fmt == "conll":
        _read_conll(path, rows, 0, -1)
    elif fmt == "squad":
        _read_squad(path, _load_json(path), rows)
    return rows.finish()


def read_conll(path, token_col: int = 0, tag_col: int = -1, *, skip_bad: bool = False, limit: int | None = None,
               report: dict | None = None, iob: bool = False) -> list[dict]:
    """CoNLL column file -> one record ``{"tokens": [...], "tags": [...]}`` per sentence.

    Blank lines separate sentences; ``-DOCSTART-`` lines are skipped. ``_where`` is the sentence's first line.
    A line without `token_col`/`tag_col`, or with another column count than the file's first token line,
    is bad: its whole sentence is rejected (or skipped with `skip_bad`). With `iob`, so is a tag other than
    ``O``, ``B-TYPE``, ``I-TYPE`` (an entity tag column).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = _Rows(str(path), skip_bad, limit, None, report)
    _read_conll(path, rows, token_col, tag_col, iob)
    return rows.finish()


def read_squad(path, *, skip_bad: bool = False, limit: int | None = None, report: dict | None = None) -> list[dict]:
    """SQuAD JSON -> one record per question: ``{id, title, context, question, answers, answer_starts}``.

    ``answers`` is the list of reference texts, ``answer_starts`` their character offsets in ``context``
    (both empty for unanswerable SQuAD v2 questions). ``_where`` is ``path:data[i].paragraphs[j].qas[k]``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = _Rows(str(path), skip_bad, limit, None, report)
    _read_squad(path, _load_json(path), rows)
    return rows.finish()


def _read_jsonl(path: Path, rows: _Rows) -> None:
    for n, line in _utf8_lines(path, rows):
        if rows.full:
            return
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.bad(where, "bad json", f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            rows.bad(where, "not an object", f"expected a JSON object, got {type(obj).__name__}")
            continue
        rows.add(obj, where)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def _is_squad(obj: Any) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("data"), list) and bool(obj["data"])
            and isinstance(obj["data"][0], dict) and "paragraphs" in obj["data"][0])


def _read_json(path: Path, rows: _Rows) -> None:
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: it is really JSON lines
            return _read_jsonl(path, rows)
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if _is_squad(obj):
        return _read_squad(path, obj, rows)
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of objects or SQuAD JSON, got {type(obj).__name__}")
    for i, item in enumerate(obj):
        if rows.full:
            return
        where = f"{path}:[{i}]"
        if not isinstance(item, dict):
            rows.bad(where, "not an object", f"expected a JSON object, got {type(item).__name__}")
            continue
        rows.add(item, where)


def _read_csv(path: Path, rows: _Rows, delimiter: str, quoting: str | int) -> None:
    if isinstance(quoting, str):
        if quoting.lower() not in QUOTING:
            raise DataError(f"{path}: unknown quoting {quoting!r}; allowed: {sorted(QUOTING)}")
        quoting = QUOTING[quoting.lower()]
    lines = list(_utf8_lines(path, rows))  # a non-UTF-8 line is a bad row (skipped with skip_bad)
    number = [n for n, _ in lines]  # reader.line_num counts the lines it was fed: map back to the file's
    reader = csv.reader((ln for _, ln in lines), delimiter=delimiter, quoting=quoting)
    header, last = None, 0
    try:
        for row in reader:
            start, last = last + 1, reader.line_num  # a quoted field may span several physical lines
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = [h.strip() for h in row]
                dup = sorted({h for h in header if header.count(h) > 1})
                if dup:
                    raise DataError(f"{path}:{number[start - 1]}: duplicate column name(s) {dup} in the header "
                                    f"{header}: a later column would silently replace an earlier one")
                continue
            if rows.full:
                return
            where = f"{path}:{number[start - 1]}"
            if len(row) != len(header):
                rows.bad(where, "column count", f"expected {len(header)} columns {header}, got {len(row)}")
                continue
            rows.add(dict(zip(header, row, strict=True)), where)
    except csv.Error as e:
        line = number[min(reader.line_num, len(number)) - 1] if number else 1
        raise DataError(f"{path}:{line}: unreadable CSV ({e})") from None


def _read_conll(path: Path, rows: _Rows, token_col: int, tag_col: int, iob: bool = False) -> None:
    need = max(token_col if token_col >= 0 else -token_col - 1, tag_col if tag_col >= 0 else -tag_col - 1) + 1

    tokens: list[str] = []
    tags: list[str] = []
    start, broken, width = 0, None, None

    def flush():
        if tokens or broken:
            if broken:
                rows.bad(*broken)
            else:
                rows.add({"tokens": list(tokens), "tags": list(tags)}, f"{path}:{start}")

    for n, line in _utf8_lines(path, rows):
        cols = line.split()
        if not cols:
            flush()
            tokens.clear()
            tags.clear()
            broken = None
            if rows.full:
                return
            continue
        if cols[0] == "-DOCSTART-":
            continue
        if not tokens and not broken:
            start = n
        if len(cols) < need:
            broken = broken or (f"{path}:{n}", "column count",
                                f"expected at least {need} columns (token_col={token_col}, "
                                f"tag_col={tag_col}), got {len(cols)}")
            continue
        width = width or len(cols)  # the file's column count, set by its first token line
        if len(cols) != width:
            broken = broken or (f"{path}:{n}", "column count",
                                f"expected {width} columns like the file's first token line, got {len(cols)}")
            continue
        tag = cols[tag_col]
        if iob and tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            broken = broken or (f"{path}:{n}", "bad tag", f"tag {tag!r} (column {tag_col}) is not O, B-TYPE or I-TYPE")
            continue
        tokens.append(cols[token_col])
        tags.append(cols[tag_col])
    if not rows.full:
        flush()


def _read_squad(path: Path, obj: Any, rows: _Rows) -> None:
    if not _is_squad(obj):
        raise DataError(f"{path}: not SQuAD JSON (expected {{'data': [{{'title', 'paragraphs': [...]}}]}})")
    for i, article in enumerate(obj["data"]):
        for j, para in enumerate(article.get("paragraphs", [])):
            context = para.get("context")
            for k, qa in enumerate(para.get("qas", [])):
                if rows.full:
                    return
                where = f"{path}:data[{i}].paragraphs[{j}].qas[{k}]"
                missing = [key for key in ("id", "question") if not qa.get(key)]
                if not context:
                    missing.insert(0, "context")
                if missing:
                    rows.bad(where, f"missing field {missing[0]!r}", f"field {missing[0]!r} is missing or empty")
                    continue
                answers = qa.get("answers") or []
                if any("text" not in a or "answer_start" not in a for a in answers):
                    rows.bad(where, "bad answers", "each answer needs 'text' and 'answer_start'")
                    continue
                rows.add({"id": qa["id"], "title": article.get("title", ""), "context": context,
                          "question": qa["question"], "answers": [a["text"] for a in answers],
                          "answer_starts": [int(a["answer_start"]) for a in answers]}, where)


HUB_ID_FORM = "hf:owner/name[:config][:split][@revision]"
_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_hub_name(source: str, split: str | None = None) -> tuple[str, str | None, str, str | None]:
    """A hub id -> (repository, config, split, revision); see the module docstring.

    ``hf:owner/name[:config][:split][@revision]``: ``owner/name`` (or a bare ``name``) is one repository;
    one ``:part`` is the split, two are config and split; ``@revision`` ends the id. ``owner/name/config``
    (the config after a slash) is still read. ``"hf:HuggingFaceH4/no_robots:train@v1"`` ->
    ("HuggingFaceH4/no_robots", None, "train", "v1"). A malformed id is a DataError showing the form.
    """
    def bad(why: str):
        return DataError(f"{source}: malformed hub id ({why}); expected {HUB_ID_FORM}, "
                         "e.g. hf:HuggingFaceH4/no_robots:train or hf:nyu-mll/glue:mrpc:test@main")

    name = source[3:] if source.startswith("hf:") else source
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
        if not revision.strip() or "@" in revision or revision != revision.strip():
            raise bad(f"revision {revision!r} after '@' is empty or malformed")
    repo, *rest = name.split(":")
    if len(rest) > 2:
        raise bad(f"{len(rest)} ':' parts after the repository; at most config and split")
    if any(not p.strip() or p != p.strip() for p in rest):
        raise bad("an empty or padded ':' part")
    parts = repo.split("/")
    if not 1 <= len(parts) <= 3 or not all(_HUB_PART.fullmatch(p) for p in parts):
        raise bad(f"repository {repo!r} is not 'name' or 'owner/name'")
    config = rest[0] if len(rest) == 2 else None
    if len(parts) == 3:  # owner/name/config
        if config is not None:
            raise bad(f"two configs: {parts[2]!r} after '/' and {config!r} after ':'")
        repo, config = "/".join(parts[:2]), parts[2]
    if rest:
        if split is not None and split != rest[-1]:
            raise DataError(f"{source}: split {rest[-1]!r} in the name conflicts with split={split!r}")
        split = rest[-1]
    return repo, config, split or "train", revision


def hub_label(repo: str, config: str | None, split: str, revision: str | None) -> str:
    """The canonical id of a parsed hub name, as rows' ``_where`` shows it."""
    return f"hf:{repo}{':' + config if config else ''}:{split}{'@' + revision if revision else ''}"


def _read_hub(source: str, split: str | None, rows: _Rows) -> None:
    path, config, split, revision = parse_hub_name(source, split)
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split=split, **({"revision": revision} if revision else {}))
    except Exception as e:  # network, unknown name, unknown split: say which dataset it was
        raise DataError(f"{source}: cannot load hub dataset {path!r} (config {config!r}, split {split!r}, "
                        f"revision {revision!r}): {type(e).__name__}: {e}") from e
    label = hub_label(path, config, split, revision)
    for i, item in enumerate(ds):
        if rows.full:
            return
        rows.add(dict(item), f"{label}:[{i}]")


# ---------------------------------------------------------------- Arrow-backed sources (large sets)
# Parquet / Arrow files, `datasets.save_to_disk` folders, a folder of files of one format, JSON/JSONL/CSV/
# TSV/TXT files and hub ids with config, split and revision, read as a memory-mapped `datasets.Dataset`
# (`load_table`), so a million rows never become Python objects. Hub syntax:
# ``hf:owner/name[:config][:split][@revision]``; ``streaming=True`` streams a hub set row by row.
TABLE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv",
                  ".tsv": "csv", ".txt": "text"}


class Table:
    """A dataset plus where each row came from: ``where(i)`` -> ``"file row n"`` (1-based, per file)."""

    def __init__(self, ds, starts: list[tuple[int, str]], fingerprint: str):
        self.ds, self.starts, self.fingerprint = ds, starts, fingerprint

    def where(self, i: int) -> str:
        import bisect

        k = bisect.bisect_right([s for s, _ in self.starts], i) - 1
        start, name = self.starts[max(k, 0)]
        return f"{name} row {i - start + 1}"


def _file_fingerprint(paths: list[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _load_file(path: Path, datasets, text_unit: str = "line"):
    """One file as a Dataset; a DataError naming the file when it is corrupt, truncated, not of its suffix's
    format, or holds no rows."""
    ds = _load_one(path, datasets, text_unit)
    if len(ds) == 0:
        raise DataError(f"{path}: the file holds no rows")
    return ds


def _load_one(path: Path, datasets, text_unit: str):
    builder = TABLE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: cannot read {path.suffix!r} files as a table; known: {sorted(TABLE_BUILDERS)}")
    if builder == "arrow":
        import pyarrow as pa

        try:
            return datasets.Dataset.from_file(str(path))
        except Exception:  # the IPC file format (pyarrow.feather / ipc.new_file) rather than a stream
            try:
                with pa.memory_map(str(path)) as src:
                    return datasets.Dataset(pa.ipc.open_file(src).read_all())
            except Exception as e:
                raise DataError(f"{path}: not a readable Arrow file (neither the Arrow stream format `datasets` writes "
                                f"nor the IPC file format; corrupt, truncated or not Arrow): {type(e).__name__}: {e}") from None
    if builder == "parquet":  # check the footer first: `datasets` would only say DatasetGenerationError
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(str(path)).metadata.num_rows
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file (corrupt, truncated or not Parquet): "
                            f"{type(e).__name__}: {e}") from None
        if rows == 0:
            raise DataError(f"{path}: the file holds no rows")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {"sample_by": text_unit} if builder == "text" else {}
    from tunelab.models.loading import cache_dir

    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir() / "datasets"), **kwargs)
    except Exception as e:
        cause = e.__cause__ or e.__context__ if type(e).__name__ == "DatasetGenerationError" else None
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: cannot read as {builder} (corrupt, truncated or not {builder}?): {detail}") from None


def load_table(source, *, split: str | None = None, streaming: bool = False, text_unit: str = "line") -> Table:
    """`Table` of a file, folder or hub id (see above); a DataError names the source when it cannot be read.
    ``text_unit``: what one row of a .txt file is: "line", "paragraph" (blank-line separated) or "document"."""
    import datasets

    source_s = str(source)
    path = Path(source_s)
    if source_s.startswith("hf:") or (not path.exists() and _is_hub_name(source_s)):
        return _load_hub_table(source_s, split, streaming)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                name = split or ("train" if "train" in ds else None)
                if name not in ds:
                    raise DataError(f"{path}: a DatasetDict with splits {list(ds)}; name one as {path}:SPLIT")
                ds = ds[name]
            return Table(ds, [(0, str(path))], ds._fingerprint)
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        suffixes = sorted({p.suffix.lower() for p in files})
        if not files:
            raise DataError(f"{path}: the folder holds no data files")
        if len(suffixes) != 1:
            raise DataError(f"{path}: a data folder must hold files of one format, found {suffixes}")
        parts, starts, n = [], [], 0
        for p in files:
            ds = _load_file(p, datasets, text_unit)
            starts.append((n, str(p)))
            n += len(ds)
            parts.append(ds)
        try:
            ds = datasets.concatenate_datasets(parts)
        except ValueError as e:
            raise DataError(f"{path}: the files' columns differ: {e}") from None
        return Table(ds, starts, _file_fingerprint(files) + text_unit)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return Table(_load_file(path, datasets, text_unit), [(0, str(path))], _file_fingerprint([path]) + text_unit)


def _load_hub_table(source: str, split: str | None, streaming: bool) -> Table:
    import datasets

    repo, config, split, revision = parse_hub_name(source, split)
    label = hub_label(repo, config, split, revision)
    try:
        ds = datasets.load_dataset(repo, config, split=split, revision=revision, streaming=streaming)
    except Exception as e:  # network, unknown name, unknown split: say which dataset it was
        raise DataError(f"{source}: cannot load hub dataset {repo!r} (config {config!r}, split {split!r}, "
                        f"revision {revision!r}): {type(e).__name__}: {e}") from e
    if streaming:  # features must be random-access: the stream is written to Arrow once, row by row
        ds = datasets.Dataset.from_generator(lambda: (yield from ds))
    return Table(ds, [(0, label)], getattr(ds, "_fingerprint", label))


def check_column(table: Table, column: str, kind: str, source: str, skip_bad: bool = False) -> None:
    """A DataError when ``column`` is absent, or a row's value is null or not of ``kind`` ("text" or "list").

    The error names the first bad row (file and row number), the field and the value, as the JSONL reader
    does: a list<string> or int column is never trained on as its Python repr. With ``skip_bad`` only a
    column without one good value is an error (the bad rows are dropped and counted when encoded)."""
    import pyarrow as pa

    schema = table.ds.data.schema if hasattr(table.ds, "data") else None
    names = table.ds.column_names
    if column not in names:
        raise DataError(f"{source}: column {column!r} is missing (present: {names}); map yours with task.fields")
    if schema is None:
        return
    t = schema.field(column).type
    typed = (pa.types.is_string(t) or pa.types.is_large_string(t)) if kind == "text" else (
        pa.types.is_list(t) or pa.types.is_large_list(t))
    nulls = table.ds.data.column(column).null_count
    if typed and kind == "text" and not skip_bad:  # a NUL character: binary or mis-encoded data
        import pyarrow.compute as pc

        hit = pc.index(pc.match_substring(table.ds.data.column(column), "\x00"), True).as_py()
        if hit is not None and hit >= 0:
            raise DataError(f"{table.where(hit)}: {_nul(column, table.ds[hit][column])}")
    if typed and (nulls == 0 or (skip_bad and nulls < len(table.ds))):
        return
    want = "text" if kind == "text" else "a list of turns"
    good = (lambda v: isinstance(v, str)) if kind == "text" else (lambda v: isinstance(v, list))
    first = None
    for i, value in enumerate(_column_values(table.ds, column)):
        if good(value):
            if skip_bad:
                return
            continue
        if first is None:
            first = (i, value)
            if not skip_bad:
                break
    if first is None:
        return
    i, value = first
    also = "" if typed or isinstance(t, pa.BaseExtensionType) else f" (the column's Arrow type is {t})"
    if value is None:  # a JSONL row without the field reads as null here
        raise DataError(f"{table.where(i)}: field {column!r} is missing or null, expected {want}")
    raise DataError(f"{table.where(i)}: field {column!r} must be {want}, got {_kind(value)}{also}")


def _column_values(ds, column: str):
    for start in range(0, len(ds), 1000):
        yield from ds[start:start + 1000][column]


def read_table_records(source, *, limit: int | None = None, required=None, skip_bad: bool = False,
                       report: dict | None = None, split: str | None = None, text=None) -> list[dict]:
    """Records of an Arrow-backed source (small sets; large ones stay a `Table`). `text`: as `read_records`."""
    table = load_table(source, split=split)
    rows = _Rows(str(source), skip_bad, limit, required, report, text)
    for i in range(len(table.ds)):
        if rows.full:
            break
        rows.add(dict(table.ds[i]), table.where(i))
    return rows.finish()


# ---------------------------------------------------------------- preference pairs
def _pref_side(value, where: str, key: str):
    """A side of a pair: text, or a normalised turn list (OpenAI or ShareGPT turns)."""
    from tunelab.data.chat_templates import normalize

    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        return value
    if isinstance(value, list):
        style = "sharegpt" if value and isinstance(value[0], dict) and "from" in value[0] else "openai"
        try:
            if key == "prompt":
                return normalize(value + [{"role": "assistant", "content": "-"}] if style == "openai" else
                                 value + [{"from": "gpt", "value": "-"}], style)[:-1]  # a placeholder answer
            return normalize(value, style)
        except (ValueError, TypeError) as e:
            raise DataError(f"{where}: field {key!r}: {e}") from None
    raise DataError(f"{where}: field {key!r} must be text or a list of turns, got {type(value).__name__}")


def _squashed(side):
    """A side with every run of whitespace made one space and the ends stripped (text, or each turn's content)."""
    if isinstance(side, str):
        return " ".join(side.split())
    return [(t["role"], " ".join(t["content"].split())) for t in side]


def read_preferences(source, *, fields: dict | None = None, limit: int | None = None, skip_bad: bool = False,
                     report: dict | None = None) -> list[dict]:
    """Preference pairs ``{"prompt", "chosen", "rejected", "form", "_where"}`` from any source.

    Plain form: three texts. Chat form: ``chosen``/``rejected`` are turn lists ending in an assistant turn,
    with ``prompt`` the shared earlier turns, or absent when both sides carry the whole conversation (the
    longest common run of leading turns becomes the prompt). Errors name file, row and field: a missing or
    empty field, a side that is neither text nor turns, a mix of forms, identical chosen and rejected, a chat
    side whose last turn is not the assistant's.
    """
    f = {k: (fields or {}).get(k, k) for k in ("prompt", "chosen", "rejected")}
    records = read_records(source, skip_bad=skip_bad, required=[f["chosen"], f["rejected"]], report=report)
    out, bad = [], Counter()
    for r in records:
        where = r["_where"]
        try:
            chosen, rejected = (_pref_side(r[f[k]], where, k) for k in ("chosen", "rejected"))
            if type(chosen) is not type(rejected):
                raise DataError(f"{where}: 'chosen' and 'rejected' must both be text or both be turn lists")
            prompt = r.get(f["prompt"])
            if isinstance(chosen, str):
                if prompt is None:
                    raise DataError(f"{where}: field {f['prompt']!r} is missing (plain pairs need a prompt)")
                prompt = _pref_side(prompt, where, "prompt")
            else:
                for key, side in (("chosen", chosen), ("rejected", rejected)):
                    if side[-1]["role"] != "assistant":
                        raise DataError(f"{where}: field {key!r}: the last turn is {side[-1]['role']!r}, not 'assistant'")
                if prompt is None:
                    n = 0
                    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                        n += 1
                    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
                else:
                    prompt = _pref_side(prompt, where, "prompt") if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
            if chosen == rejected:
                raise DataError(f"{where}: 'chosen' and 'rejected' are identical: the pair carries no preference")
            if _squashed(chosen) == _squashed(rejected):
                raise DataError(f"{where}: 'chosen' and 'rejected' are identical after whitespace normalisation: "
                                "the pair carries no preference")
        except DataError as e:
            if not skip_bad:
                raise
            bad[str(e).split(": ", 1)[-1][:60]] += 1
            continue
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                    "form": "plain" if isinstance(chosen, str) else "chat", "_where": where})
        if limit is not None and len(out) >= limit:
            break
    if bad:
        log.warning("%s: skipped %d bad preference pairs", source, sum(bad.values()))
        if report is not None:
            report["skipped"] = report.get("skipped", 0) + sum(bad.values())
    if not out:
        raise DataError(f"{source}: no usable preference pairs")
    if len({ex["form"] for ex in out}) > 1:
        raise DataError(f"{source}: mixes plain-text and chat pairs; use one form per file")
    return out
