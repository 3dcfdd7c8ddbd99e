"""The dataset formats ``tfpool score`` reads and writes, by file suffix: the one list that
both the scoring code and its error messages use.

No import of pyarrow here: a producer without the ``datasets`` extra can still ask which
formats exist and be told what to install.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    """One dataset format: its name, the suffixes that select it (lower case), and whether
    it holds a table of named columns (read and written through pyarrow) or arrays."""

    name: str
    suffixes: tuple[str, ...]
    table: bool
    description: str


#: Every format, in the order help texts list them.
FORMATS: tuple[Format, ...] = (
    Format("npy", (".npy",), False, "one array, memory-mapped"),
    Format("npz", (".npz",), False, "named arrays, one per model input or output"),
    Format("parquet", (".parquet", ".pq"), True, "Parquet, read in record batches"),
    Format("csv", (".csv",), True, "CSV with a header row"),
    Format("jsonl", (".jsonl", ".ndjson"), True, "JSON Lines, one object per row"),
    Format("tfrecord", (".tfrecord", ".tfrecords"), True, "TFRecord of tf.train.Example"),
)

#: What a folder input can be besides a folder of table files.
IMAGE_FOLDER = "a folder of images (JPEG/PNG/GIF/BMP)"


def format_of(path: str) -> Format | None:
    """The format a path's suffix names (any case), or None."""
    lower = path.lower().rstrip("/" + os.sep)
    for fmt in FORMATS:
        if lower.endswith(fmt.suffixes):
            return fmt
    return None


def supported(*, outputs: bool = False) -> str:
    """The supported formats, for an error message: e.g. ``.npy, .npz, .parquet, ...``."""
    text = ", ".join(s for fmt in FORMATS for s in fmt.suffixes)
    folders = ", or a folder of these" if outputs else f", a folder of these or {IMAGE_FOLDER}"
    return text + folders


def table_format_of_folder(path: str) -> Format | None:
    """The table format of a folder's files, if every data file in it has one (a folder of
    Parquet files, say). None for a folder of anything else (images)."""
    found = {
        fmt.name: fmt
        for name in os.listdir(path)
        if not name.startswith((".", "_")) and (fmt := format_of(name)) is not None and fmt.table
    }
    if len(found) > 1:
        raise ValueError(f"{path}: files of several formats ({', '.join(sorted(found))})")
    return next(iter(found.values()), None)


def is_table_path(path: str) -> bool:
    """Whether a path names a table format by its suffix, or is a folder of table files."""
    fmt = format_of(path)
    if fmt is not None:
        return fmt.table
    return os.path.isdir(path) and table_format_of_folder(path) is not None
