"""Reading raw records: local json / jsonl / parquet files or folders, `datasets`, synthetic.

A source spec is one of:

- ``synthetic`` or ``synthetic:<kind>`` (kind: prompt, sft, pairwise, all): the demo task;
- a ``.jsonl`` / ``.json`` / ``.parquet`` file, or a folder of them (read in name order);
- a folder written by ``datasets.Dataset.save_to_disk`` (``folder`` or ``folder:split``);
- a Hugging Face dataset name, ``name`` or ``name:split`` (split defaults to ``train``).
"""
from __future__ import annotations

import json
import os
from typing import Any

from rlhf.data import synthetic

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def load_source(spec: str, *, num_synthetic: int = 2000, seed: int = 1234) -> list[dict]:
    """All records of one source, as dicts in file / dataset order.

    Args:
        spec: see the module docstring.
        num_synthetic, seed: size and seed of the ``synthetic`` source.

    Raises:
        ValueError: a malformed file (naming the file and, for jsonl, the 1-based line), a record
            that is not an object, or a source with no records.
        FileNotFoundError: a path with a data-file suffix that does not exist.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a data source must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    name, _, kind = spec.partition(":")
    if name == "synthetic":
        records = synthetic.make_records(num_synthetic, seed, kind or "all")
    elif os.path.isdir(spec) and _is_saved_dataset(spec):
        records = _read_saved_dataset(spec, None)
    elif os.path.isdir(spec):
        records = _read_folder(spec)
    elif os.path.isfile(spec):
        records = _read_file(spec)
    elif spec.endswith(FILE_SUFFIXES):
        raise FileNotFoundError(f"data source {spec!r}: no such file")
    else:
        base, split = _split_spec(spec)
        if os.path.isdir(base) and _is_saved_dataset(base):
            records = _read_saved_dataset(base, split)
        else:
            records = _read_hub_dataset(base, split)
    if not records:
        raise ValueError(f"data source {spec!r} has no records")
    return records


def _split_spec(spec: str) -> tuple[str, str | None]:
    base, colon, split = spec.rpartition(":")
    return (base, split) if colon and base and split else (spec, None)


def _read_folder(folder: str) -> list[dict]:
    files = sorted(f for f in os.listdir(folder) if f.endswith(FILE_SUFFIXES))
    if not files:
        raise ValueError(f"data source {folder!r}: folder holds no {'/'.join(FILE_SUFFIXES)} files")
    records = []
    for name in files:
        records.extend(_read_file(os.path.join(folder, name)))
    return records


def _read_file(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    if path.endswith(".json"):
        return _read_json(path)
    if path.endswith(".parquet"):
        return _read_parquet(path)
    raise ValueError(f"data source {path!r}: unsupported file type (expected "
                     f"{', '.join(FILE_SUFFIXES)})")


def _not_utf8(path: str, data: bytes, err: UnicodeDecodeError, first_line: int = 1) -> ValueError:
    """ValueError naming the file, line and column of the first byte that is not UTF-8."""
    start = data.rfind(b"\n", 0, err.start) + 1
    lineno = first_line + data.count(b"\n", 0, err.start)
    return ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{data[err.start]:02x}, byte "
                      f"{err.start - start + 1} of the line); save the file as UTF-8")


def _read_jsonl(path: str) -> list[dict]:
    records = []
    with open(path, "rb") as fh:  # decoded line by line: an encoding error names its line
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, raw, err, lineno) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
            records.append(_as_record(record, f"{path}:{lineno}"))
    return records


def _read_json(path: str) -> list[dict]:
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, data, err) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # many ".json" datasets are JSON lines
            return _read_jsonl(path)
        raise ValueError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise ValueError(f"{path}: expected a list of objects or {{\"data\": [...]}}, "
                         f"got {type(doc).__name__}")
    return [_as_record(r, f"{path} item {i}") for i, r in enumerate(doc)]


def _read_parquet(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a broken file
        raise ValueError(f"{path}: cannot read parquet ({err})") from err
    return table.to_pylist()


def _as_record(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _is_saved_dataset(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, f))
               for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _pick_split(data, split: str | None, spec: str):
    """A Dataset from a Dataset or DatasetDict, by split name (default "train")."""
    if not hasattr(data, "keys"):  # already a Dataset
        if split is not None:
            raise ValueError(f"data source {spec!r} has no splits, cannot take {split!r}")
        return data
    want = split or "train"
    if want not in data:
        raise ValueError(f"data source {spec!r} has no split {want!r}; "
                         f"splits: {', '.join(data.keys())}")
    return data[want]


def _read_saved_dataset(folder: str, split: str | None) -> list[dict]:
    import datasets

    return _pick_split(datasets.load_from_disk(folder), split, folder).to_list()


def _read_hub_dataset(name: str, split: str | None) -> list[dict]:
    import datasets

    try:
        data = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # offline, unknown name, bad split: say which source failed
        raise ValueError(f"data source {name!r}: datasets.load_dataset failed: {err}") from err
    return _pick_split(data, None, name).to_list()
