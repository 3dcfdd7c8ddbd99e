"""Errors of the worker side (the supervisor, the workers, the CLI)."""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of the worker side's errors."""


class ConfigError(WorkerError):
    """A configuration value is missing or out of range."""


class ModelLoadError(WorkerError):
    """The model could not be loaded, or its signature cannot be served."""


class RedisServerError(WorkerError):
    """The embedded redis-server could not be found or started."""


class RedisSettingsError(WorkerError):
    """Redis is set up in a way that would lose requests (an evicting maxmemory-policy)."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (TensorFlow's run to pages)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()[:400]
    return type(error).__name__
