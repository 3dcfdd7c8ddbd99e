"""A model repository on disk, as TF Serving lays it out: ``REPO/<name>/<version>/``, a
version being a positive integer folder that holds a SavedModel (``saved_model.pb``) or one
Keras file (``.keras`` / ``.h5``). No TensorFlow and no Redis here: what is on disk, which
versions are complete, and which of them a model's version policy serves.

A version folder is taken once it is complete: it holds a ``READY`` file, or its contents
(every file's name, size and modification time) were the same at two scans in a row. A
copy in progress changes between scans, so it is not taken; a deploy script that writes
``READY`` last is taken at the next scan without waiting for a second one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workers.errors import ConfigError

#: The file that marks a version folder as complete (its content is not read).
READY_MARKER = "READY"

#: Model files a version folder may hold, besides a SavedModel's ``saved_model.pb``.
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")

#: A folder's contents at one scan: (relative path, size, mtime in ns) of every file.
Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class VersionPolicy:
    """Which complete versions to serve, as TF Serving's ``model_version_policy``: the
    ``latest`` N (the default, N = 1), ``all``, or ``specific`` ones."""

    kind: str = "latest"
    latest: int = 1
    specific: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: object) -> VersionPolicy:
        """``"latest"``, ``"latest:2"``, ``"all"``, ``"specific:3,4"``, or a list of
        version numbers (``[3, 4]``, as TOML gives it: specific versions)."""
        if isinstance(value, (list, tuple)):
            return cls("specific", specific=tuple(sorted(_version(v) for v in value)))
        text = str(value).strip().lower()
        if text.startswith("[") and text.endswith("]"):  # "[3, 4]" from the command line
            text = "specific:" + text[1:-1]
        kind, _, arg = text.partition(":")
        if kind == "latest":
            count = int(arg) if arg.strip().isdigit() else 1 if not arg.strip() else 0
            if count < 1:
                raise ConfigError(f"version_policy {value!r}: latest takes a count >= 1")
            return cls("latest", latest=count)
        if kind == "all" and not arg:
            return cls("all")
        if kind == "specific" and arg:
            return cls("specific", specific=tuple(sorted(_version(v) for v in arg.split(","))))
        raise ConfigError(
            f"version_policy {value!r} is not 'latest', 'latest:N', 'all', 'specific:3,4'"
            " or a list of versions"
        )

    def select(self, versions: Sequence[int]) -> list[int]:
        """The versions to serve among ``versions`` (complete, loadable ones), ascending."""
        ordered = sorted(set(versions))
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.specific]
        return ordered[-self.latest :]


def _version(value: object) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"version {value!r} is not a whole number") from None
    if number < 1:
        raise ConfigError(f"version {number} must be >= 1")
    return number


def parse_labels(labels: Mapping[str, object]) -> dict[str, int]:
    """``{"stable": "3", "canary": 4}`` -> label -> version number. A label may not be a
    number (``resnet@4`` means version 4)."""
    parsed = {}
    for label, version in labels.items():
        if not label or label.isdigit():
            raise ConfigError(f"label {label!r} must be a name, not a number")
        parsed[label] = _version(version)
    return parsed


def model_path(folder: Path) -> str | None:
    """What to load from a version folder: the folder for a SavedModel, the file for one
    Keras file; None when it holds neither (yet)."""
    if (folder / "saved_model.pb").is_file():
        return str(folder)
    files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(KERAS_SUFFIXES)]
    return str(files[0]) if len(files) == 1 else None


def fingerprint(folder: Path) -> Fingerprint:
    """Every file under ``folder``: relative path, size, mtime (ns); sorted."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            try:
                stat = path.stat()
            except OSError:  # removed while we looked: the folder is still changing
                continue
            found.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(found))


def version_folders(model_dir: Path) -> dict[int, Path]:
    """The version folders of one model: positive integer names only (TF Serving ignores
    others, such as a ``tmp`` folder a copy is staged in)."""
    if not model_dir.is_dir():
        return {}
    return {
        int(p.name): p
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    }


def model_names(repo: str) -> list[str]:
    """The models of a repository: its sub-folders (hidden ones skipped), sorted."""
    root = Path(repo)
    if not root.is_dir():
        raise ConfigError(f"model_repo {repo} is not a folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass
class Candidate:
    """A complete version folder: what to load from it, and its contents when seen."""

    number: int
    path: str
    fingerprint: Fingerprint


@dataclass
class ModelWatch:
    """Scans one model's folder, scan after scan, and says which versions are complete.
    Used by one thread (the model's watcher)."""

    folder: Path
    _seen: dict[int, Fingerprint] = field(default_factory=dict)

    def scan(self) -> list[Candidate]:
        """The complete versions now: with a READY file, or unchanged since the last scan."""
        complete = []
        seen: dict[int, Fingerprint] = {}
        for number, folder in sorted(version_folders(self.folder).items()):
            try:
                now = fingerprint(folder)
                path = model_path(folder)
            except OSError:  # removed as we looked
                continue
            seen[number] = now
            marked = (folder / READY_MARKER).is_file()
            stable = self._seen.get(number) == now
            if path is not None and (marked or stable):
                complete.append(Candidate(number, path, now))
        self._seen = seen
        return complete
