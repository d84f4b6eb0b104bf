"""Reading data sources: local files and folders, and hub datasets, as datasets.Dataset.

A local source is read whole or refused: every file of a folder's split is read by its type's
datasets builder, and files must share their columns. A file that does not parse is named with
its first bad line; an empty file, and file types that disagree on a column's type, are named
too. Each refusal is a UserError naming the recipe key (`label`) and the source as written.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

from .errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _quiet_datasets() -> None:
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # per-map progress bars on small data are noise around the plan


def load_source(source: dict, label: str):
    """One dataset from a local file or folder, or a hub dataset. `label` names the recipe key."""
    from datasets import load_dataset

    _quiet_datasets()
    spec = source["path"]
    path = Path(spec).expanduser()
    local = path.suffix in BUILDERS or spec.startswith((".", "/", "~")) or path.exists()
    if local and path.is_dir():
        split = source["split"]
        # A slice such as train[:10%] applies to each file type's rows.
        return load_files(
            folder_files(path, split, label, spec), label, spec, split[len(split.split("[")[0]) :]
        )
    if local:
        if not path.is_file():
            raise UserError(
                f"{label}: file not found: {spec}",
                [f"give an existing {'/'.join(BUILDERS)} file or folder, or a hub dataset name"],
            )
        if path.suffix not in BUILDERS:
            raise UserError(
                f"{label}: cannot read {path.suffix!r} files: {spec}",
                [f"use one of {', '.join(BUILDERS)}"],
            )
        return load_files([path], label, spec)
    try:
        return load_dataset(
            spec, source["subset"], split=source["split"], revision=source["revision"]
        )
    except Exception as exc:  # noqa: BLE001 (datasets raises many types for unreachable or unreadable data)
        raise UserError(
            f"{label}: cannot load {spec!r}: {_cause(exc)}",
            ["check the dataset name, subset, split and network"],
        ) from None


def _cause(exc: BaseException) -> str:
    """The first line of the innermost error: datasets wraps each reader's own, clearer message."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def folder_files(folder: Path, split: str, label: str, spec: str) -> list[Path]:
    """The data files of one split of a folder, found by datasets' own rules (train/test file names,
    README and hidden files left out). Raises UserError for a missing split or an unreadable type."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        base = str(folder.resolve())
        by_split = DataFilesDict.from_patterns(get_data_patterns(base), base_path=base)
    except EmptyDatasetError:
        raise UserError(
            f"{label}: the folder {spec} holds no data files",
            [f"put {'/'.join(BUILDERS)} files in it, or give a file or a hub dataset"],
        ) from None
    name = split.split("[")[0]
    if name not in by_split:
        raise UserError(
            f"{label}: the folder {spec} has no {name!r} split; its file names make the splits "
            f"{', '.join(map(str, by_split))}",
            ["set data.split (or the source's split) to one of them"],
        )
    # Named as the recipe names the folder, so messages show paths the user recognises.
    files = [folder / Path(f).relative_to(folder.resolve()) for f in by_split[name]]
    unreadable = sorted({f.suffix or f.name for f in files} - set(BUILDERS))
    if unreadable:
        names = ", ".join(str(f) for f in files if (f.suffix or f.name) in unreadable)
        raise UserError(
            f"{label}: the folder {spec} holds files of types lora-tune cannot read "
            f"({', '.join(unreadable)}): {names}",
            [
                (
                    f"move them out of the folder, or list the files to use in {label}; "
                    f"readable types: {', '.join(BUILDERS)}"
                )
            ],
        )
    return files


def load_files(files: list[Path], label: str, spec: str, rows: str = ""):
    """Local files as one dataset: each file type read by its datasets builder, then concatenated.

    Refuses (UserError naming the file) an empty file, a malformed line, and files whose columns differ.
    """
    from datasets import concatenate_datasets

    for file in files:
        if _is_empty(file):
            raise UserError(
                f"{label}: cannot load {spec!r}: {file}: the file is empty",
                ["add rows to the file, or remove it from the data"],
            )
    groups: dict[str, list[Path]] = {}
    for file in files:
        groups.setdefault(BUILDERS[file.suffix], []).append(file)
    parts = [
        (_load_group(builder, group, label, spec, rows), group) for builder, group in groups.items()
    ]
    _check_columns_agree([(group, dataset.column_names) for dataset, group in parts], label, spec)
    first = parts[0][0]
    try:  # each builder types columns its own way (large_string, int64 for a CSV column of digits)
        rest = [
            dataset.select_columns(first.column_names).cast(first.features)
            for dataset, _ in parts[1:]
        ]
    except ValueError as exc:
        raise UserError(
            f"{label}: cannot load {spec!r}: its file types disagree on a column's type: {_cause(exc)}",
            ["make the column hold the same kind of value in every file"],
        ) from None
    return concatenate_datasets([first, *rest]) if rest else first


def _is_empty(file: Path) -> bool:
    """True for a file of nothing but whitespace; reads only up to the first other byte."""
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _load_group(builder: str, files: list[Path], label: str, spec: str, rows: str):
    """Files of one type with their datasets builder; a failure is diagnosed file by file."""
    from datasets import load_dataset

    try:
        with _builder_errors_unlogged():
            dataset = load_dataset(
                builder, data_files=[str(f) for f in files], split="train" + rows
            )
    except Exception as exc:  # noqa: BLE001 (datasets wraps each reader's errors in many types; diagnosed here)
        problem = next(filter(None, (_bad_line(builder, f) for f in files)), None)
        if problem:
            raise UserError(
                f"{label}: cannot load {spec!r}: {problem}", [_LINE_FIXES[builder]]
            ) from None
        if len(files) > 1:
            _check_columns_agree([([f], _columns(builder, f)) for f in files], label, spec)
        raise UserError(
            f"{label}: cannot load {spec!r}: {_some(files)}: {_cause(exc)}",
            [f"check that the file is valid {builder} data"],
        ) from None
    if builder == "json" and len(files) > 1:
        # The json builder merges differing keys of several files into one table, filling gaps
        # with None, so a file without the trained column would be skipped row by row, silently.
        # A file whose first row has every column has them all: only the others are read in full.
        merged = dataset.column_names
        _check_columns_agree(
            [
                ([f], merged if _first_keys(f) == set(merged) else _columns(builder, f))
                for f in files
            ],
            label,
            spec,
        )
    return dataset


@contextlib.contextmanager
def _builder_errors_unlogged():
    """Builders log a failure before raising it; lora-tune reports it once, diagnosed, instead."""
    from datasets.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _first_keys(file: Path) -> set[str] | None:
    """The keys of a JSON-lines file's first row; None when its first line is not a whole row."""
    with file.open(encoding="utf-8", errors="replace") as handle:
        line = next((line for line in handle if line.strip()), "")
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return set(row) if isinstance(row, dict) else None


_LINE_FIXES = {
    "json": "fix the file there: one JSON object per line (.jsonl), or an array of objects (.json)",
    "csv": 'fix that line: quote fields that contain the delimiter, as in "a, b"',
}


def _bad_line(builder: str, file: Path) -> str | None:
    """'FILE:LINE: what is wrong' for the first malformed line of a JSON or CSV file, else None."""
    if builder not in _LINE_FIXES:
        return None
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return f"{file}:{line}: not UTF-8 text ({exc.reason})"
    return _bad_json_line(file, text) if builder == "json" else _bad_csv_line(file, text)


def _bad_json_line(file: Path, text: str) -> str | None:
    try:
        document = json.loads(text)  # one JSON document, such as a .json array of rows
        return None if document else f"{file}: the file holds no rows: {text.strip()}"
    except json.JSONDecodeError as exc:
        if (
            exc.msg != "Extra data"
        ):  # "Extra data" after the first line: JSON lines, checked one by one
            return f"{file}:{exc.lineno}: not valid JSON, column {exc.colno}: {exc.msg}"
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"{file}:{number}: not valid JSON, column {exc.colno}: {exc.msg}"
        if not isinstance(row, dict):
            return f"{file}:{number}: expected a JSON object (one row), got {type(row).__name__} {line.strip()[:40]}"
    return None


def _bad_csv_line(file: Path, text: str) -> str | None:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        for row in reader:
            if len(row) > len(header):
                return (
                    f"{file}:{reader.line_num}: {len(row)} fields, but the header has {len(header)}"
                )
    except csv.Error as exc:
        return f"{file}:{reader.line_num}: not valid CSV: {exc}"
    return None


def _columns(builder: str, file: Path) -> list[str]:
    """A file's columns, read directly: what the builder would make of that file alone."""
    if builder == "text":
        return ["text"]
    if builder == "parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_schema(file).names
    text = file.read_text(encoding="utf-8", errors="replace")
    if builder == "csv":
        return next(csv.reader(io.StringIO(text, newline="")), [])
    try:
        document = json.loads(text)
        rows = document if isinstance(document, list) else [document]
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    return list(dict.fromkeys(key for row in rows if isinstance(row, dict) for key in row))


def _check_columns_agree(files: list[tuple[list[Path], list[str]]], label: str, spec: str) -> None:
    """Raise UserError listing each file's columns unless all files have the same ones."""
    if len({frozenset(columns) for _, columns in files}) <= 1:
        return
    listed = [f"{_some(group)}: columns {', '.join(columns)}" for group, columns in files]
    raise UserError(
        f"{label}: the files of {spec} have different columns",
        [
            *listed,
            (
                f"give every file the same columns, or list the files as separate sources of "
                f"{label} (each is formatted by its own columns)"
            ),
        ],
    )


def _some(files: list[Path], shown: int = 3) -> str:
    """The first few of many file names, and how many more there are."""
    names = ", ".join(map(str, files[:shown]))
    if len(files) > shown:
        names += f" and {len(files) - shown} more"
    return names
