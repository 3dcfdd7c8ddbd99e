"""New versions live: one thread per model in each worker scans the model's folder of the
repository, loads and warms the versions its policy wants beside those serving, then moves
traffic and retires the versions no longer wanted (they drain, then unload).

The order is the point (TF Serving's "availability preserving" policy): a new version
takes requests only once it is loaded and warm, and an old one stops taking them only once
its replacement does. A version that fails to load or warm is marked failed (shown in
``tfpool status`` and logged), the old one keeps serving, and the folder is tried again
only after its contents change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from queueing import connection, keys
from workers.repository import Fingerprint, ModelWatch, VersionPolicy, version_folders
from workers.versions import FAILED, LOADING, WARMING, Version, Versions

log = logging.getLogger(__name__)

#: How often a watcher looks at the reload key (and at its wake-up event) between scans.
RELOAD_CHECK_S = 1.0

#: Builds a loaded, warmed version: (number, path to load, call when warming starts).
Build = Callable[[int, str, Callable[[], None]], Version]


class VersionWatcher:
    """Scans one model's folder and keeps its :class:`Versions` in step with it. ``run``
    is the thread's body; :meth:`refresh` is one scan (the worker calls it at start)."""

    def __init__(
        self,
        *,
        folder: Path,
        policy: VersionPolicy,
        versions: Versions,
        build: Build,
        poll_s: float,
        stopping: threading.Event,
        redis_url: str = "",
    ) -> None:
        self.watch = ModelWatch(folder)
        self.policy = policy
        self.versions = versions
        self.build = build
        self.poll_s = poll_s
        self.stopping = stopping
        self.redis_url = redis_url
        #: Set (by SIGHUP, or a change of the reload key) to scan now.
        self.wake = threading.Event()
        self._failed: dict[int, Fingerprint] = {}  # version -> contents that failed to load

    def run(self) -> None:
        """Scan every ``poll_s`` seconds, or at once when woken, until stopping."""
        conn = connection.connect(self.redis_url, socket_timeout=5) if self.redis_url else None
        reload_seen = _reload_count(conn)
        next_scan = time.monotonic() + self.poll_s
        try:
            while not self.stopping.is_set():
                woken = self.wake.wait(min(RELOAD_CHECK_S, max(0.0, next_scan - time.monotonic())))
                count = _reload_count(conn)
                if count != reload_seen:
                    reload_seen, woken = count, True
                if woken or time.monotonic() >= next_scan:
                    self.wake.clear()
                    next_scan = time.monotonic() + self.poll_s
                    try:
                        self.refresh()
                    except Exception:  # a fault of ours must not end the rollouts for good
                        log.exception("model %s: scanning the repository failed",
                                      self.versions.name)  # fmt: skip
        finally:
            if conn is not None:
                conn.close()

    def refresh(self) -> None:
        """One scan: load what the policy wants and is not served, then retire what it
        no longer wants."""
        name = self.versions.name
        complete = {c.number: c for c in self.watch.scan()}
        on_disk = set(version_folders(self.watch.folder))
        for number in list(self._failed):
            candidate = complete.get(number)
            if candidate is not None and candidate.fingerprint != self._failed[number]:
                del self._failed[number]  # changed since it failed: try it again
            elif number not in on_disk:
                del self._failed[number]
                self.versions.forget(number)
        loadable = {n for n in complete if n not in self._failed}
        serving = set(self.versions.serving())
        # A serving version stays a candidate while its folder is there, even while it is
        # being touched (and so not "complete" at this scan).
        wanted = set(self.policy.select(sorted(loadable | (serving & on_disk))))
        for number in sorted(wanted - serving):
            candidate = complete[number]
            self.versions.set_state(number, LOADING)
            started = time.monotonic()
            log.info("model %s: loading version %d from %s", name, number, candidate.path)
            try:
                version = self.build(number, candidate.path, self._warming(number))
            except Exception as e:
                self._failed[number] = candidate.fingerprint
                reason = f"{type(e).__name__}: {e}".splitlines()[0]
                self.versions.set_state(number, FAILED, reason)
                log.error("model %s: version %d failed to load (%s); the versions serving"
                          " (%s) keep serving", name, number, reason,
                          ", ".join(map(str, sorted(serving))) or "none")  # fmt: skip
                continue
            self.versions.add(version)
            log.info("model %s: version %d loaded and warmed in %.1fs", name, number,
                     time.monotonic() - started)  # fmt: skip
        # Recomputed without the versions that just failed: the ones they were to
        # replace stay.
        serving = set(self.versions.serving())
        still = (loadable - set(self._failed)) | (serving & on_disk)
        wanted = set(self.policy.select(sorted(still)))
        for number in sorted(serving - wanted):
            self.versions.retire(number)

    def _warming(self, number: int) -> Callable[[], None]:
        return lambda: self.versions.set_state(number, WARMING)


def _reload_count(conn: redis.Redis | None) -> bytes | None:
    if conn is None:
        return None
    try:
        value = conn.get(keys.RELOAD)
    except connection.REDIS_ERRORS:
        return None
    return value if isinstance(value, bytes) else None
