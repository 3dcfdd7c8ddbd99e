"""Keeping TensorFlow's start-up noise off a worker's terminal.

Importing TensorFlow on a machine without a GPU prints about ten lines (``oneDNN custom
operations are on``, ``Could not find cuda drivers``, ``E0000 ... failed call to cuInit``)
that look like failures and are not. Most are written by absl before TensorFlow's logging
is set up, so ``TF_CPP_MIN_LOG_LEVEL`` does not reach them: the only way to keep them off
the terminal is to point file descriptor 2 elsewhere while TensorFlow starts. tfpool then
says in its own words what it found (``no GPU found: 2 CPU workers``). ``--debug`` (log
level DEBUG) keeps them all.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def quiet_tensorflow_logging(*, debug: bool) -> None:
    """Set TensorFlow's C++ log level before it is imported: errors only, unless ``debug``
    (a value the user set in the environment wins)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if debug else "3")


@contextlib.contextmanager
def native_stderr_silenced(*, enabled: bool = True) -> Iterator[None]:
    """File descriptor 2 goes to /dev/null for the block (Python's ``sys.stderr`` too,
    since it writes there). An exception raised inside is reported after the block, so
    a failed import still shows its traceback."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
