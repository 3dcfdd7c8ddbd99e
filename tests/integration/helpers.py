"""Helpers for tests that run the ``tfpool`` command or read the pool's state in Redis."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, cast

import redis

from queueing import keys, wire

#: How to run the ``tfpool`` command: the installed script, else the module.
TFPOOL = (
    [shutil.which("tfpool") or ""]
    if shutil.which("tfpool")
    else [sys.executable, "-m", "workers.cli"]
)

#: What ``serve`` and ``demo`` print when they start a private redis-server.
URL_LINE = re.compile(r"started a private redis-server at (redis://\S+)")


def redis_is_up(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def heartbeats(url: str, model: str, state: str | None = "ready") -> list[dict[str, str]]:
    """The heartbeat hashes of ``model``'s workers (in ``state``, unless None)."""
    client = redis.Redis.from_url(url)
    try:
        found = []
        for key in client.scan_iter(keys.WORKER_PATTERN):
            raw = cast(dict[bytes, bytes], client.hgetall(key))
            beat = {k.decode(): v.decode() for k, v in raw.items()}
            if beat.get("model") == model and (state is None or beat.get("state") == state):
                found.append(beat)
        return found
    finally:
        client.close()


def start_serve(*args: str, new_session: bool = False) -> subprocess.Popen[str]:
    """``tfpool serve ARGS`` as a child process, its output piped. The checkout's root
    is on its PYTHONPATH, so that its workers can ``--preload`` the tests' modules."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(
        [*TFPOOL, "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
        env={**os.environ, "PYTHONPATH": path},
    )


def stop_process(process: subprocess.Popen[str]) -> str:
    """Kill ``process`` if still running; return what it wrote to stderr."""
    if process.poll() is None:
        process.kill()
    _, err = process.communicate(timeout=30)
    return err or ""


def first_line(process: subprocess.Popen[str]) -> str:
    return cast(IO[str], process.stdout).readline()


def read_results(
    conn: redis.Redis, reply: str, count: int, timeout: float = 30
) -> list[wire.Result]:
    """The first ``count`` results posted on the reply stream ``reply``, waiting up to
    ``timeout`` seconds for them (fewer if they do not come)."""
    results: list[wire.Result] = []
    last: Any = "0-0"
    give_up = time.monotonic() + timeout
    while len(results) < count and time.monotonic() < give_up:
        found: Any = conn.xread({reply: last}, count=count - len(results), block=500)
        for entry_id, fields in found[0][1] if found else []:
            last = entry_id
            results += [wire.decode_result(data) for data in fields.values()]
    return results
