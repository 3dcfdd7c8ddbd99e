"""The supervisor: start one worker process per slot, keep them running, stop them well.

It never imports TensorFlow (placement is decided before any worker starts, and a worker
sets ``CUDA_VISIBLE_DEVICES`` before its own import; with ``workers = "auto"`` on the CPU,
the layout is measured first, in processes of its own: :mod:`workers.probe`). The loop,
in the manner of rq's: reap exited workers, restart the ones that crashed (with backoff),
recycle the ones whose memory passed the limit, and on SIGTERM/SIGINT drain: every worker
stops reading, finishes and answers the batches in hand, acks and exits. A second signal
stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from workers.config import PoolConfig
from workers.errors import ConfigError
from workers.handles import (
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    HEALTHY_AFTER_S,
    SPAWN,
    WorkerHandle,
    describe_exit,
    new_flag,
)
from workers.metrics import Layout
from workers.placement import Slot, cpu_count, describe_slots, plan
from workers.probe import ProbeError, choose, why_not_measure
from workers.process import worker_main
from workers.redis_checks import check_redis, check_redis_url, wait_for_redis
from workers.repository import model_names
from workers.running import RunningBatch
from workers.worker import EXIT_LOAD_FAILED, EXIT_OK, consumer_name

if TYPE_CHECKING:
    from workers.exporter import MetricsServer

log = logging.getLogger(__name__)

#: Exit codes of ``tfpool serve``.
EXIT_DRAINED = 0  # stopped by a signal after draining
EXIT_WORKER_LOAD_FAILED = 3  # a worker could not load the model: nothing to serve
EXIT_FORCED = 130  # a second signal: stopped without draining


class Supervisor:
    """Runs the workers of one pool on this host."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        slots: list[Slot] | None = None,
        on_ready: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not config.redis_url:
            raise ValueError("the supervisor needs a Redis URL (start an embedded one first)")
        check_redis_url(config.redis_url)
        self.config = config
        #: Called once, with the number of workers, when every worker first serves.
        self.on_ready = on_ready
        #: What restart times, backoff and health are measured with (tests step it).
        self._clock = clock
        self._announced = False
        self.slots = slots if slots is not None else plan(config)
        #: None: ``start`` measures the layouts (``workers = "auto"`` on the CPU) and takes
        #: the fastest. Else why not, for the log ("" when there is no question: slots, a
        #: number of workers, or GPUs).
        self._not_measured = (
            "" if slots is not None else why_not_measure(config, self.slots, cpu_count())
        )
        self.layout = Layout.for_config(config)
        #: A repository pool's models (as found now) and the layout of each one's counters.
        self.model_layouts = model_layouts(config)
        self.handles = self._new_handles()
        #: What happened to workers, in order: (kind, slot, pid); kind is "crash" (an exit
        #: code other than 0), "recycle" (drained and exited 0 at the memory watchdog's
        #: request) or "exit" (exited 0 unasked).
        self.events: list[tuple[str, int, int]] = []
        self._draining = threading.Event()
        self.exit_code = EXIT_DRAINED
        self.metrics_server: MetricsServer | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Check Redis's settings, start the metrics endpoint if the config asks for one,
        measure the layout (``workers = "auto"`` on the CPU), then spawn every worker (they
        load and warm up in parallel). Raises RedisSettingsError on a Redis that would lose
        requests, ConfigError when the endpoint cannot listen."""
        self.check_redis()
        if self.config.metrics_port >= 0 and self.metrics_server is None:
            self.serve_metrics()
        if self._not_measured is None:
            self.measure_layout()
        elif self._not_measured:
            log.info("workers = auto: %s", self._not_measured)
        self._not_measured = ""  # once
        if self._draining.is_set():  # a signal while measuring: nothing to start
            return
        what = f"models of {self.config.model_repo}" if self.config.model_repo else "model"
        log.info("%s %s: %s", what, self.config.name, describe_slots(self.slots))
        for handle in self.handles:
            self._spawn(handle)

    def measure_layout(self) -> None:
        """Measure the layouts of this machine on the model and take the fastest (see
        :mod:`workers.probe`). If they cannot be measured, say why and keep the default:
        the workers then meet the same failure and report it as they always do."""
        try:
            choice = choose(self.config, stop=self._draining)
        except ProbeError as e:
            if self._draining.is_set():
                return
            log.warning(
                "workers = auto: could not measure the layouts (%s); starting the default"
                " layout, %s", e, describe_slots(self.slots),
            )  # fmt: skip
            return
        self.slots = choice.layout.slots(self.config.inter_op_threads or 1)
        self.handles = self._new_handles()  # nothing runs in the default's handles yet

    def _new_handles(self) -> list[WorkerHandle]:
        return [
            WorkerHandle(
                slot,
                SPAWN.RawArray("d", self.layout.size),
                model_metrics={
                    name: SPAWN.RawArray("d", layout.size)
                    for name, layout in self.model_layouts.items()
                },
                running=RunningBatch(SPAWN, max_requests=self.config.max_batch_size),
            )
            for slot in self.slots
        ]

    def serve_metrics(self, port: int | None = None) -> int:
        """Start the HTTP endpoint (``/metrics``, ``/healthz``, ``/readyz``) on ``port``
        (default: the config's; 0: a free one). Returns the port bound."""
        from workers.exporter import MetricsServer  # prometheus_client: only when asked

        port = max(0, self.config.metrics_port if port is None else port)
        host = self.config.metrics_host
        try:
            self.metrics_server = MetricsServer(self, host=host, port=port)
        except OSError as e:  # a port in use, most often: one line and exit 2, no traceback
            raise ConfigError(f"metrics_port: cannot listen on {host}:{port}: {e}") from e
        self.metrics_server.start()
        return self.metrics_server.port

    @property
    def ready(self) -> bool:
        """What ``/readyz`` says: a worker of the model serves, and the pool is not
        draining."""
        return not self._draining.is_set() and any(
            h.is_ready and h.process is not None and h.process.is_alive() for h in self.handles
        )

    def check_redis(self) -> None:
        """See :func:`workers.redis_checks.check_redis`."""
        check_redis(self.config)

    def wait_for_redis(self) -> bool:
        """See :func:`workers.redis_checks.wait_for_redis`; a signal stops the wait."""
        return wait_for_redis(self.config, self._draining)

    def wait_ready(self, timeout: float = 300.0) -> bool:
        """Wait until every worker has loaded and warmed its model. False if one exited
        without getting there, or on timeout."""
        give_up = time.monotonic() + timeout
        for handle in self.handles:
            while not handle.is_ready:
                time.sleep(0.05)
                if handle.process is not None and not handle.process.is_alive():
                    return False
                if time.monotonic() > give_up:
                    return False
            handle.ever_ready = True
        return True

    def run_forever(self) -> int:
        """Serve until a signal: the loop of ``tfpool serve``. Returns the exit code."""
        self._install_signal_handlers()
        if not self.wait_for_redis():
            return self.exit_code  # a signal came first: nothing was started
        self.start()
        self.monitor()
        self.drain()
        return self.exit_code

    def monitor(self, until: threading.Event | None = None) -> None:
        """Keep the workers running (``poll`` every 0.2 s) until ``until`` is set or the
        pool starts draining."""
        while not self._draining.is_set() and not (until is not None and until.is_set()):
            self.poll()
            self._draining.wait(0.2)

    def poll(self) -> None:
        """One round: reap exited workers, restart them when their backoff is up, and
        recycle one whose memory is over the limit."""
        now = self._clock()
        for handle in self.handles:
            if handle.is_ready and not handle.ever_ready:
                handle.ever_ready = True
                log.info("worker %s (slot %d) is ready", handle.worker_id, handle.slot.index)
        if not self._announced and all(h.ever_ready for h in self.handles):
            self._announced = True
            if self.on_ready is not None:
                self.on_ready(len(self.handles))
        for handle in self.handles:
            process = handle.process
            if process is not None and not process.is_alive():
                self._reap(handle, now)
            due = handle.restart_at is not None and now >= handle.restart_at
            if handle.process is None and due:
                self._spawn(handle)
        if self.config.memory_limit_mb:
            self._watch_memory()

    def drain(self, timeout: float = 60.0) -> None:
        """Ask every worker to finish what it holds and exit; kill any still up after
        ``timeout`` (their unanswered requests stay pending and are reclaimed later)."""
        self._draining.set()
        for handle in self.handles:
            handle.terminate()
        give_up = time.monotonic() + timeout
        for handle in self.handles:
            if handle.process is None:
                continue
            handle.process.join(max(0.0, give_up - time.monotonic()))
            if handle.process.is_alive():
                log.warning(
                    "worker %s did not drain in %.0fs; killing it", handle.worker_id, timeout
                )
                handle.process.kill()
                handle.process.join()
        log.info("all workers stopped")
        self.close_metrics()

    def close_metrics(self) -> None:
        """Stop the HTTP endpoint, if it runs."""
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    def kill(self) -> None:
        """Stop every worker at once, without draining."""
        self._draining.set()
        for handle in self.handles:
            if handle.process is not None and handle.is_up:
                handle.process.kill()
        for handle in self.handles:
            if handle.process is not None:
                handle.process.join()

    def serving_pids(self) -> list[int]:
        """The pids of the workers that are up and ready (not loading, not dead)."""
        up = [h.process for h in self.handles if h.is_ready and h.is_up]
        return [p.pid for p in up if p is not None and p.pid is not None]

    # --- internals ----------------------------------------------------------------------

    def _spawn(self, handle: WorkerHandle) -> None:
        handle.ready = new_flag()
        handle.recycling = False
        slot = handle.slot
        args = (self.config, slot, list(handle.predecessors), handle.ready, handle.metrics,
                handle.running, handle.suspects, handle.model_metrics)  # fmt: skip
        process = SPAWN.Process(
            target=worker_main, args=args, name=f"tfpool-worker-{slot.index}", daemon=False
        )
        process.start()
        assert process.pid is not None
        if handle.worker_id:  # the slot had a process before this one
            handle.restarts += 1
        handle.process = process
        handle.worker_id = consumer_name(process.pid)
        handle.predecessors = []
        handle.suspects = set()
        handle.started_at = self._clock()
        handle.restart_at = None
        log.info(
            "worker %s started (slot %d, %s, %d intra-op threads)",
            handle.worker_id, slot.index, slot.device or "cpu", slot.intra_op_threads,
        )  # fmt: skip

    def _reap(self, handle: WorkerHandle, now: float) -> None:
        code, pid = handle.reap()
        if self._draining.is_set():
            return
        # A recycle is a drain that ended well: a recycled worker that died is a crash.
        kind = "crash" if code != EXIT_OK else "recycle" if handle.recycling else "exit"
        self.events.append((kind, handle.slot.index, pid))
        if code == EXIT_LOAD_FAILED and not handle.ever_ready:
            log.error("worker %s could not load the model; stopping the pool", handle.worker_id)
            self.exit_code = EXIT_WORKER_LOAD_FAILED
            self._draining.set()
            return
        if now - handle.started_at > HEALTHY_AFTER_S:
            handle.backoff_s = BACKOFF_START_S
        delay = 0.0 if code == EXIT_OK else handle.backoff_s
        if delay:
            handle.backoff_s = min(handle.backoff_s * 2, BACKOFF_MAX_S)
        log.warning(
            "worker %s exited with %s; restarting in %.1fs",
            handle.worker_id,
            describe_exit(code),
            delay,
        )
        handle.restart_at = now + delay

    def _watch_memory(self) -> None:
        """Drain and replace a worker whose RSS is over the limit, one at a time, so that
        the others keep serving while it reloads."""
        # One out at a time: none while a worker drains, or while its successor (or any
        # other worker) still loads: recycling then could leave no worker serving.
        if any(h.recycling or (h.process is not None and not h.is_ready) for h in self.handles):
            return
        limit = self.config.memory_limit_mb * 2**20
        for handle in self.handles:
            rss = handle.rss()
            if rss is not None and rss > limit:
                log.warning(
                    "worker %s uses %.0f MiB (limit %d MiB): recycling it",
                    handle.worker_id, rss / 2**20, self.config.memory_limit_mb,
                )  # fmt: skip
                handle.recycling = True
                handle.terminate()
                return

    def _install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self._draining.is_set():
                log.warning("second signal: stopping at once")
                self.exit_code = EXIT_FORCED
                self.kill()
                os._exit(EXIT_FORCED)
            log.info("%s: draining (send it again to stop at once)", signal.Signals(signum).name)
            self._draining.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            # Re-scan the model repository now: each worker's watchers scan on SIGHUP.
            log.info("SIGHUP: workers re-scan the model repository")
            for handle in self.handles:
                if handle.process is not None and handle.process.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(handle.process.pid, signal.SIGHUP)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hup)


def model_layouts(config: PoolConfig) -> dict[str, Layout]:
    """The models of a repository pool, found in its folder now, and the layout of each
    one's counters, built from its own settings as its worker lane builds it (they may set
    their own batch sizes). Empty for a pool of one model."""
    if not config.model_repo:
        return {}
    return {
        name: Layout.for_config(config.for_model(name, str(Path(config.model_repo) / name)))
        for name in model_names(config.model_repo)
    }
