"""Array files and image folders for offline scoring (:mod:`queueing.score`): the input
(``.npy`` memory-mapped, never loaded whole; ``.npz`` one array per model input; a folder
of images one file per row, in sorted order) and the output (memory-mapped ``.npy``
files written as results arrive, and the sidecar ``OUTPUT.progress.json`` of the chunks
done, so that an interrupted run resumes where it stopped)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from queueing.errors import RequestError

#: Output files ``score`` writes, by suffix: one output in ``.npy``, any number in ``.npz``.
OUTPUT_SUFFIXES = (".npy", ".npz")


def check_output_suffix(path: str) -> None:
    """Raise ValueError unless ``path`` names an output format that is written."""
    if not path.endswith(OUTPUT_SUFFIXES):
        suffix = os.path.splitext(path)[1] or "no extension"
        raise ValueError(
            f"{path}: cannot write {suffix}; the output formats are {', '.join(OUTPUT_SUFFIXES)}"
            " (.npy for a model with one output, .npz for any model)"
        )


#: Files a folder input takes, by suffix (any case): what the workers' image decoding reads.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


class ImageFolder:
    """The image files under a folder (recursively, sorted by relative path), one row each:
    a row is the file's bytes, read only when its chunk is sent. For a pool whose model
    decodes images (``preprocess = "image"``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        root = Path(path)
        self.files = sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.files:
            raise ValueError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, rows: slice) -> np.ndarray:
        """The bytes of ``rows``, read now, as a bytes array of one item per row (sliced
        like the array inputs, so that scoring reads both the same way)."""
        names = self.files[rows]
        array = np.empty(len(names), dtype=object)
        array[:] = [Path(self.path, name).read_bytes() for name in names]
        return array

    def digest(self) -> str:
        """Changes when a file is added, removed, renamed or rewritten."""
        h = hashlib.sha256()
        for name in self.files:
            stat = os.stat(os.path.join(self.path, name))
            h.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return h.hexdigest()


Input = dict[str, np.ndarray] | np.ndarray | ImageFolder


#: How numpy's files begin: ``.npy``, and ``.npz`` (a zip archive).
NUMPY_MAGIC = (b"\x93NUMPY", b"PK\x03\x04")


def numpy_kind(path: str) -> str:
    """``"npy"`` or ``"npz"``, from what the file holds (not its name). ValueError for any
    other file: numpy would take it for a pickle ("This file contains pickled (object)
    data") or fail with EOFError, neither of which says what is wrong."""
    with open(path, "rb") as file:
        head = file.read(6)
    if not head.startswith(NUMPY_MAGIC):
        raise ValueError(
            f"{path}: not a numpy file (.npy or .npz, as np.save / np.savez write them),"
            f" nor an image ({', '.join(IMAGE_SUFFIXES)}) or a folder of them"
        )
    return "npz" if head.startswith(b"PK") else "npy"


def open_input(path: str) -> tuple[Input, int]:
    """The input (``.npy`` memory-mapped; ``.npz`` one array per model input; a folder of
    images) and the number of rows."""
    if os.path.isdir(path):
        folder = ImageFolder(path)
        return folder, len(folder)
    if numpy_kind(path) == "npz":
        with np.load(path, allow_pickle=False) as archive:
            # An archive member cannot be memory-mapped: each is read once, here.
            arrays = {name: archive[name] for name in archive.files}
        rows = {len(a) for a in arrays.values()}
        if len(rows) != 1:
            raise ValueError(f"{path}: arrays disagree on the number of rows: {sorted(rows)}")
        return arrays, rows.pop()
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return array, len(array)


class VersionChanged(ValueError):
    """A resumed run got answers from a model version that the runs before it did not."""


class ArrayOutput:
    """The output files and the progress record of one run."""

    def __init__(
        self,
        path: str,
        fingerprint: dict[str, Any],
        row_names: list[str] | None = None,
        *,
        allow_version_change: bool = False,
    ) -> None:
        self.path = path
        # Provenance: the versions that answered (recorded), and those of the runs before.
        self.versions: set[int] = set()
        self.versions_before: set[int] = set()
        self.allow_version_change = allow_version_change
        self.row_names = row_names  # named in the errors file (the files of a folder)
        self.fingerprint = fingerprint
        self.sidecar = path + ".progress.json"
        self.errors_path = path + ".errors.tsv"
        self.parts_dir = path + ".parts"
        self.done: set[int] = set()
        self.failed_rows = 0  # in the chunks done
        self.single_name = "output"  # the .npz member of a one-output model
        self.layout: dict[str, list[Any]] | None = None  # name -> [dtype, shape tail]
        self.single = True
        self.arrays: dict[str, np.memmap[Any, Any]] = {}
        self._errors: TextIO | None = None

    def resume(self) -> bool:
        """Pick up an interrupted run of the same job, if there is one."""
        if not os.path.exists(self.sidecar):
            return False
        record = json.loads(Path(self.sidecar).read_text())
        if record.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{self.sidecar} is from a different run (other input, model or chunk size);"
                " delete it (and the partial output) to start over"
            )
        self.done = set(record["done"])
        self.failed_rows = int(record.get("failed_rows", 0))
        self.versions_before = set(record.get("model_versions", []))
        self.versions = set(self.versions_before)
        self.single = record["single"]
        if record["layout"] is not None:
            self._open(record["layout"], mode="r+")
        return True

    def note_version(self, version: int | None) -> None:
        """Record the version that made an answer. Raises :class:`VersionChanged` when a
        resumed run meets a version the runs before it did not (unless allowed): a file
        half from one model and half from another is rarely what was meant."""
        if version is None or version in self.versions:
            return
        if self.versions_before and not self.allow_version_change:
            before = ", ".join(map(str, sorted(self.versions_before)))
            raise VersionChanged(
                f"the earlier runs of this job were answered by version {before} of"
                f" {self.fingerprint['model']!r}, this one by version {version}: pass"
                " --allow-version-change to go on anyway, or delete"
                f" {self.sidecar} and the partial output to start over"
            )
        self.versions.add(version)

    def write(self, start: int, outputs: Any) -> None:
        bare = self.path.endswith(".npy")  # the array itself, not an archive of named ones
        if isinstance(outputs, dict) and bare:
            raise ValueError(
                f"{self.path}: the model has {len(outputs)} outputs ({', '.join(outputs)});"
                " score into a .npz to keep them all"
            )
        named = (
            outputs if isinstance(outputs, dict) else {"" if bare else self.single_name: outputs}
        )
        if self.layout is None:
            self.single = bare
            layout = {n: [a.dtype.str, list(a.shape[1:])] for n, a in named.items()}
            self._open(layout, mode="w+")
        for name, values in named.items():
            self.arrays[name][start : start + len(values)] = values

    def _open(self, layout: dict[str, list[Any]], mode: str) -> None:
        self.layout = layout
        rows = self.fingerprint["rows"]
        if not self.single:
            os.makedirs(self.parts_dir, exist_ok=True)
        for name, (dtype, tail) in layout.items():
            file = self.path if self.single else os.path.join(self.parts_dir, f"{name}.npy")
            if mode == "w+":
                array = np.lib.format.open_memmap(
                    file, mode="w+", dtype=np.dtype(dtype), shape=(rows, *tail)
                )
                # Rows that fail keep a value no answer has: NaN, or -1 for integers (a
                # top-k index of 0 is a class).
                if array.dtype.kind in "fc":
                    array[:] = np.nan
                elif array.dtype.kind in "iu":
                    array[:] = -1 if array.dtype.kind == "i" else np.iinfo(array.dtype).max
            else:
                array = np.load(file, mmap_mode="r+")
            self.arrays[name] = array

    def fail_rows(self, rows: range, error: RequestError) -> None:
        if self._errors is None:
            self._errors = open(self.errors_path, "a")  # noqa: SIM115 - kept open for the run
        message = " ".join(f"{type(error).__name__}: {error}".split())  # one line, no tabs
        for row in rows:
            name = "" if self.row_names is None else f"{self.row_names[row]}: "
            self._errors.write(f"{row}\t{name}{message}\n")

    def save(self) -> None:
        """Flush the data, then record the chunks done (in that order: a chunk recorded as
        done is on disk)."""
        for array in self.arrays.values():
            array.flush()
        if self._errors is not None:
            self._errors.flush()
            os.fsync(self._errors.fileno())
        record = {
            "fingerprint": self.fingerprint,
            "done": sorted(self.done),
            "failed_rows": self.failed_rows,
            "layout": self.layout,
            "single": self.single,
            "model_versions": sorted(self.versions),
        }
        tmp = self.sidecar + ".tmp"
        Path(tmp).write_text(json.dumps(record))
        os.replace(tmp, self.sidecar)

    def finish(self) -> None:
        self.save()
        if not self.single:
            np.savez(self.path, **self.arrays)  # type: ignore[arg-type]
        self.arrays.clear()
        if not self.single:
            shutil.rmtree(self.parts_dir)
        if self._errors is not None:
            self._errors.close()
        os.remove(self.sidecar)

    def discard(self) -> None:
        """Remove every file of a run that stopped before it wrote anything of use."""
        self.arrays.clear()
        if self._errors is not None:
            self._errors.close()
            self._errors = None
        for file in (self.path, self.sidecar, self.errors_path, self.path + ".files.txt"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(file)
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def identity(path: str, folder: ImageFolder | None) -> dict[str, Any]:
    """What changes when the input's content does: a file's size and mtime, or a digest of
    a folder's files."""
    if folder is not None:
        return {"files": folder.digest()}
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime": stat.st_mtime_ns}


def read_rows(inputs: Input, span: range) -> Any:
    """Rows ``span`` of ``inputs``, read now (from a memory map or an image folder)."""
    if isinstance(inputs, dict):
        return {k: np.ascontiguousarray(v[span.start : span.stop]) for k, v in inputs.items()}
    return np.ascontiguousarray(inputs[span.start : span.stop])  # reads just these rows
