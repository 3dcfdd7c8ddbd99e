"""How the ``tfpool`` command reports an expected failure: one line on stderr and an exit
code that scripts can test (the README lists them). ``--debug`` shows the traceback instead.

A failure is expected when it comes from outside the program: the arguments, the files,
Redis, the pool, the requests. Anything else is a bug, and keeps its traceback.
"""

from __future__ import annotations

import redis

from queueing.errors import RequestError, RequestTimeout, Unavailable
from workers.errors import WorkerError

#: Exit codes of every ``tfpool`` command.
EXIT_OK = 0
#: Done, but not all of it: ``score`` had failed rows past ``--allow-failed-rows``;
#: ``status`` found a model with no live worker; ``demo`` got wrong results.
EXIT_INCOMPLETE = 1
#: Bad arguments, configuration or input file, or a request the pool refused.
EXIT_USAGE = 2
#: ``serve``: a worker could not load the model.
EXIT_LOAD_FAILED = 3
#: Redis could not be reached.
EXIT_NO_REDIS = 4
#: No result within the timeout.
EXIT_TIMEOUT = 5
#: Interrupted (Ctrl-C), or a second signal stopped ``serve`` at once.
EXIT_INTERRUPTED = 130
#: The reader of the output went away (``tfpool status | head``).
EXIT_BROKEN_PIPE = 141


def describe(error: BaseException) -> tuple[str, int] | None:
    """One line and the exit code for an expected failure; None for a bug."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(error, RequestTimeout):
        return _line(f"RequestTimeout: {error}"), EXIT_TIMEOUT
    if isinstance(error, Unavailable):
        return _line(f"Unavailable: {error}"), EXIT_NO_REDIS
    if isinstance(error, RequestError):
        return _line(f"{type(error).__name__}: {error}"), EXIT_USAGE
    if isinstance(error, redis.AuthenticationError):
        return _line(f"Redis refused the credentials: {error}"), EXIT_USAGE
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return _line(f"cannot reach Redis: {error}"), EXIT_NO_REDIS
    if isinstance(error, redis.ResponseError):
        return _line(f"Redis refused: {error}"), EXIT_USAGE
    if isinstance(error, redis.RedisError):  # e.g. something else listens on that port
        return _line(f"cannot talk to Redis: {type(error).__name__}: {error}"), EXIT_NO_REDIS
    if isinstance(error, WorkerError):
        return _line(str(error)), EXIT_USAGE
    if isinstance(error, OSError) and error.filename is not None:
        return _line(f"{error.filename}: {error.strerror or error}"), EXIT_USAGE
    if isinstance(error, ValueError):  # bad input data, a bad URL, a mismatched resume
        return _line(str(error)), EXIT_USAGE
    return None


def _line(text: str) -> str:
    return " ".join(text.split())
