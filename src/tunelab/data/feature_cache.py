"""The tokenization pipeline: examples -> training features, batched, cached, memory-mapped.

`features(task, examples, tokenizer, cfg, max_length)` returns a `Features` sequence (``feats[i]`` a
feature dict, ``feats.lengths`` a numpy array, ``feats.stats`` the counts) that the training loop
indexes by batch. Two paths:

- Arrow examples (what the ``chat`` and ``text`` families read, `ArrowExamples`): the task's
  ``encode_batch(columns, tokenizer, cfg, max_length) -> columns`` runs through ``datasets.map(
  batched=True, num_proc=...)`` into an Arrow file under ``cache_dir()/features``, named by a key over
  the data fingerprint, the tokenizer, the task and its config, max_length and this module's version.
  A later run with the same key memory-maps that file and starts at once. Rows are never Python
  lists in bulk: lengths come from the Arrow column as numpy.
- Plain lists (every other family): the task's per-row ``encode``, exactly as before; lists of
  ``CACHE_MIN_ROWS`` rows or more also go through the cache (keyed by a hash of the examples).

Encoders report each row's fate in a ``status`` column (0 kept, 1 truncated, 2 dropped); dropped rows
stay in the file with length 0 and are left out of the index, and the counts go to ``stats`` (the
loop writes them into the run facts). ``pack=True`` packs lazily (same first-fit rule as
`tunelab.data.encoding.pack_plan`), so packing a million rows builds index lists, not token lists.
Worker processes: the config's ``data.num_proc`` when set, else ``TUNELAB_NUM_PROC``, else 1 under 20k
rows or on 2 cores, else half the cores up to 4. Environment:
``TUNELAB_FEATURE_CACHE=0`` to skip the disk cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence

import numpy as np

from tunelab.data.encoding import pack_plan, pack_row

log = logging.getLogger(__name__)
VERSION = "2"  # 2: the examples key hashes rows in chunks
CACHE_MIN_ROWS = 2000
KEPT, TRUNCATED, DROPPED = 0, 1, 2
# "truncated" (a per-row encoder's flag) is kept as the row's status
KNOWN = {"input_ids", "labels", "scalar", "prompt_len", "token_type_ids", "prompt_mask", "length", "status", "truncated"}


class ArrowExamples(Sequence):
    """Examples held in a `datasets.Dataset` (memory-mapped); ``ex[i]`` is a plain dict with ``_where``."""

    def __init__(self, ds, where, fingerprint: str):
        self.ds, self._where, self.fingerprint = ds, where, fingerprint

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = dict(self.ds[int(i)])
        row["_where"] = self._where(int(i))
        return row


def tokenizer_key(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("chat_template", "bos_token", "eos_token", "pad_token", "padding_side"):
        h.update(repr(getattr(tokenizer, attr, None)).encode())
    return h.hexdigest()[:16]


def _examples_key(examples) -> str:
    if isinstance(examples, ArrowExamples):
        return examples.fingerprint
    h = hashlib.sha256()
    for s in range(0, len(examples), 1000):  # one dumps per 1000 rows: a tenth of the time of one per row
        h.update(json.dumps(examples[s:s + 1000], sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(task, examples, tokenizer, cfg, max_length: int) -> str:
    parts = [VERSION, task.name, cfg.model_dump_json(), str(max_length), tokenizer_key(tokenizer), _examples_key(examples)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def num_proc(rows: int, requested: int | None = None) -> int:
    """Worker processes: ``requested`` (the config's ``data.num_proc``), else $TUNELAB_NUM_PROC, else
    1 under 20k rows or on 2 cores, else half the cores up to 4."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"data.num_proc must be >= 1, got {requested}")
        return requested
    env = os.environ.get("TUNELAB_NUM_PROC")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"TUNELAB_NUM_PROC must be a whole number >= 1, got {env!r}") from None
        if value < 1:
            raise ValueError(f"TUNELAB_NUM_PROC must be a whole number >= 1, got {env!r}")
        return value
    cpus = os.cpu_count() or 1
    # a worker costs seconds of imports, and the fast tokenizer already uses every core of a small machine
    return 1 if rows < 20000 or cpus <= 2 else min(4, cpus // 2)


_workers = num_proc  # `features` has a parameter of that name


def _per_row(task, examples, tokenizer, cfg, max_length):
    """Adapts a per-row ``encode`` to a batched function over an index column. Optional keys are kept
    (``prompt_len`` -1, empty ``token_type_ids`` / ``prompt_mask`` when a feature has none) and a
    sequence head's one label is stored as a one-element list with ``scalar`` set."""
    from tunelab.data.batched_tokenizer import Prefetching

    fast = Prefetching(tokenizer) if getattr(tokenizer, "is_fast", False) else None

    def fn(batch):
        out = {k: [] for k in ("input_ids", "labels", "scalar", "prompt_len", "token_type_ids", "prompt_mask",
                               "length", "status")}
        rows = [examples[i] for i in batch["i"]]
        feats = encode_rows(task, rows, tokenizer, cfg, max_length, fast)
        extra = sorted(set().union(*(f.keys() for f in feats)) - KNOWN)  # a family's own keys (a pair's rejected side)
        for f in feats:
            for key in extra:
                out.setdefault(key, []).append(f.get(key))
            n = len(f["input_ids"])
            scalar = not isinstance(f["labels"], list | tuple)
            out["input_ids"].append(list(f["input_ids"]))
            out["labels"].append([f["labels"]] if scalar else list(f["labels"]))
            out["scalar"].append(scalar)
            out["prompt_len"].append(f.get("prompt_len", -1))
            out["token_type_ids"].append(list(f.get("token_type_ids", [])))
            out["prompt_mask"].append(list(f.get("prompt_mask", [])))
            out["length"].append(n)
            out["status"].append(TRUNCATED if _truncated(f, max_length) else KEPT)
        return out
    return fn


def encode_rows(task, rows: list, tokenizer, cfg, max_length: int, fast=None) -> list[dict]:
    """``[task.encode(ex, ...) for ex in rows]``, batched: the family's own ``encode_many`` (`tunelab.data.prompt_splicing`)
    when it has one for this config, else the per-row encoder with its tokenizer calls prefetched."""
    many = getattr(task, "encode_many", None)
    feats = many(rows, tokenizer, cfg, max_length) if many is not None else None
    if feats is not None:
        return feats
    if fast is not None:  # the same features, with the tokenizer calls batched (tunelab.data.batched_tokenizer)
        return fast.encode_rows(lambda ex, tok: task.encode(ex, tok, cfg, max_length), rows)
    return [task.encode(ex, tokenizer, cfg, max_length) for ex in rows]


def _truncated(f: dict, max_length: int) -> bool:
    """Per-row encoders say so with a ``truncated`` flag on the feature (`tunelab.data.encoding.encode_lm`)."""
    return bool(f.get("truncated"))


def _encode_to_arrow(task, examples, tokenizer, cfg, max_length, path, desc, procs):
    import datasets

    if isinstance(examples, ArrowExamples):
        src = examples.ds

        skip_bad = getattr(examples, "skip_bad", False)

        def fn(batch, idx):
            batch = dict(batch, _where=[examples._where(i) for i in idx])
            return task.encode_batch(batch, tokenizer, cfg, max_length, skip_bad=skip_bad)
        remove, indices = src.column_names, True
        ids = datasets.Sequence(datasets.Value("int32"))  # half the bytes of the default int64
        kinds = {"input_ids": ids, "labels": ids, "prompt_len": datasets.Value("int32"),
                 "length": datasets.Value("int32"), "status": datasets.Value("int8")}
        features = datasets.Features(kinds)
    else:
        src = datasets.Dataset.from_dict({"i": np.arange(len(examples))})
        fn, remove, indices = _per_row(task, examples, tokenizer, cfg, max_length), ["i"], False
        features = None
    ds = src.map(fn, batched=True, with_indices=indices, batch_size=1000, num_proc=procs if procs > 1 else None, remove_columns=remove,
                 cache_file_name=str(path), desc=desc, new_fingerprint=path.stem, features=features)
    return ds


def features(task, examples, tokenizer, cfg, max_length: int, *, pack: bool = False, desc: str = "tokenizing",
             cache: bool | None = None, num_proc: int | None = None) -> Features:
    """Training features of ``examples``; see the module docstring. ``num_proc``: `num_proc`'s ``requested``."""
    from tunelab.models.loading import cache_dir

    procs = _workers(len(examples), num_proc)  # checked before any work

    t0 = time.perf_counter()
    arrow = isinstance(examples, ArrowExamples)
    if cache is None:
        cache = os.environ.get("TUNELAB_FEATURE_CACHE", "1") != "0" and len(examples) >= CACHE_MIN_ROWS
    stats = {"rows": len(examples), "cached": False}
    if not cache:
        if arrow:  # small Arrow sets: encode in memory, in one batch per 1000 rows
            cols = _columns_in_memory(task, examples, tokenizer, cfg, max_length)
            base = _ListRows(cols)
        else:
            base = encode_rows(task, list(examples), tokenizer, cfg, max_length)
            status = np.array([TRUNCATED if _truncated(f, max_length) else KEPT for f in base], dtype=np.int8)
            base = _ListRows.from_features(base, status)
    else:
        folder = cache_dir() / "features"
        folder.mkdir(parents=True, exist_ok=True)
        key = cache_key(task, examples, tokenizer, cfg, max_length)
        meta = folder / f"{key}.json"
        from filelock import FileLock

        with FileLock(str(folder / f"{key}.lock")):  # several processes (torchrun ranks): one encodes, the rest wait
            if meta.exists():
                import datasets

                files = json.loads(meta.read_text())["files"]
                ds = datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
                stats["cached"] = True
            else:
                ds = _encode_to_arrow(task, examples, tokenizer, cfg, max_length, folder / f"{key}.arrow", desc, procs)
                meta.write_text(json.dumps({"files": [c["filename"] for c in ds.cache_files]}))
        base = _ArrowRows(ds)
    status = base.status
    stats.update(dropped=int((status == DROPPED).sum()), truncated=int((status == TRUNCATED).sum()))
    feats: Features = Features(base, np.nonzero(status != DROPPED)[0])
    if pack:
        feats = Packed(feats, max_length)
    stats["features"] = len(feats)
    stats["seconds"] = time.perf_counter() - t0
    stats["rows_per_s"] = stats["rows"] / stats["seconds"] if stats["seconds"] else 0.0
    feats.stats = stats
    if stats["dropped"] or stats["truncated"]:
        log.warning("%s: %d of %d rows dropped, %d truncated to max_length %d", desc, stats["dropped"], stats["rows"],
                    stats["truncated"], max_length)
    return feats


def _columns_in_memory(task, examples, tokenizer, cfg, max_length) -> dict:
    cols: dict = {}
    for s in range(0, len(examples), 1000):
        batch = dict(examples.ds[s:s + 1000], _where=[examples._where(i) for i in range(s, min(s + 1000, len(examples)))])
        out = task.encode_batch(batch, tokenizer, cfg, max_length, skip_bad=getattr(examples, "skip_bad", False))
        for k, v in out.items():
            cols.setdefault(k, []).extend(v)
    return cols


class _ListRows:
    def __init__(self, cols: dict):
        self.cols = cols
        self.status = np.asarray(cols["status"], dtype=np.int8)
        self.length = np.asarray(cols["length"], dtype=np.int64)

    @classmethod
    def from_features(cls, feats: list[dict], status: np.ndarray):
        obj = cls.__new__(cls)
        obj.feats, obj.status = feats, status
        obj.length = np.array([len(f["input_ids"]) for f in feats], dtype=np.int64)
        return obj

    def row(self, i: int) -> dict:
        if hasattr(self, "feats"):
            return self.feats[i]
        return {"input_ids": list(self.cols["input_ids"][i]), "labels": list(self.cols["labels"][i]),
                "prompt_len": int(self.cols["prompt_len"][i])}


class _ArrowRows:
    def __init__(self, ds):
        self.ds = ds.with_format(None)
        self.status = ds.data.column("status").to_numpy().astype(np.int8)
        self.length = ds.data.column("length").to_numpy().astype(np.int64)
        self.extra = [c for c in ds.column_names if c not in KNOWN]

    def row(self, i: int) -> dict:
        r = self.ds[int(i)]
        f = {"input_ids": r["input_ids"], "labels": r["labels"][0] if r.get("scalar") else r["labels"]}
        if r["prompt_len"] >= 0:
            f["prompt_len"] = r["prompt_len"]
        for key in ("token_type_ids", "prompt_mask"):
            if r.get(key):
                f[key] = r[key]
        for key in self.extra:
            f[key] = r[key]
        return f


class Features(Sequence):
    """Kept rows of an encoded set: ``feats[i]`` a feature dict, ``feats.lengths`` numpy token counts."""

    stats: dict

    def __init__(self, base, index: np.ndarray):
        self.base, self.index = base, index
        self.lengths = base.length[index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.base.row(int(self.index[i]))


class Packed(Sequence):
    """`Features` packed into rows of at most ``max_length`` tokens, built when indexed."""

    stats: dict

    def __init__(self, feats: Features, max_length: int):
        self.feats = feats
        self.plan = pack_plan(feats.lengths, max_length)
        self.lengths = np.array([int(feats.lengths[p].sum()) for p in self.plan], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return pack_row([self.feats[j] for j in self.plan[i]])
