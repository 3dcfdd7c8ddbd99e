"""One worker process: load the model once, then batch, run and answer, until told to stop.

Read this first. A request meets, in order: the reader (:mod:`workers.reader`: read,
take over from dead workers), the intake (:mod:`workers.intake`: decode, check, fit,
pre-process; no Redis), the batcher (:mod:`workers.batcher`), the runner
(:mod:`workers.runner`: assemble, pad, run, split; no Redis), the writer
(:mod:`workers.writer`: answers -> Redis commands, kept until stored). The types they pass
along are in :mod:`workers.messages`; registration and the heartbeat in
:mod:`workers.presence`.

Four threads (more readers with ``shards``), so that the model never waits on Redis
(TensorFlow releases the GIL):

* the reader: ``XREADGROUP`` -> the intake -> the batcher (refusals -> the writer); one
  per shard of the model's queue, each with its own stream and claims, handing over to
  the intake one at a time (``accept_lock``), as one reader would;
* the main thread (:meth:`Worker.serve`): a due batch -> the runner -> the writer;
* the writer: replies, then ``XACK`` + ``XDEL``, in one MULTI/EXEC per round (when the
  queue is dry and the writer has nothing to post, the main thread posts a batch's
  answers itself: a lone request does not wait for the writer to wake);
* the heartbeat: publishes the worker's state and renews its claim on what it holds, so
  that correctness depends on it (a long batch would otherwise be taken over).

Who shares what (every other object belongs to one thread):

============== ================================ ===================== =====================
object         written by                       read by               guarded by
============== ================================ ===================== =====================
``desk``       readers (add), main (takes)      all                   its condition
intake         readers (admit)                  readers               ``accept_lock``
``held``       reader (adds), writer (removes)  heartbeat (renews)    its lock
``clock``      heartbeat (sync)                 reader (arrivals)     none: a float, swapped
``stats``      main (batches); reader, main,    heartbeat             ``stats.lock`` for
               writer's callers (answers)                             answer counts
``writer``     reader, main (submit)            writer thread         its queue
``stopping``   signal handler, heartbeat        all                   an Event
``metrics``    main (batches), writer and main  heartbeat (window),   its lock
               (answers stored), heartbeat      the supervisor
               (GPU memory)                     (scrapes)
``running``    main (before and after a batch)  the supervisor, once  shared memory, read
                                                the process is gone   only after its death
``versions``   watcher (adds, retires), reader  all                   its lock
               (in hand), main (answered)
============== ================================ ===================== =====================

``metrics`` is the slot's block of shared memory (:mod:`workers.metrics`): it outlives
this process, so what it counted survives a crash.

With ``model_repo``, one process serves every model of the repository: one
:class:`Worker` (a lane) per model, each with the threads above and a watcher
(:mod:`workers.rollout`), all in one process (see :func:`workers.process.run_models`).
The lanes share the slot's ``metrics`` (each counts its own model's too, in the
model's block of shared memory, which ``/metrics`` and its heartbeat read:
:class:`workers.metrics.LaneRecorder`) and ``running`` (the union of the lanes' batches:
:class:`workers.running.RunningLanes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from redis.typing import EncodableT, FieldT

from queueing import connection
from workers.batcher import Batcher
from workers.claims import ShardClaims
from workers.config import PoolConfig
from workers.errors import ModelLoadError
from workers.intake import Intake, deadline_error
from workers.messages import AnswerMaker, InHand, WorkerStats
from workers.metrics import Cells, LaneRecorder, Layout, Recorder
from workers.presence import Presence
from workers.reader import Reader
from workers.repository import VersionPolicy, parse_labels
from workers.rollout import VersionWatcher
from workers.runner import Runner, load
from workers.running import LaneRunning, RunningBatch
from workers.shared import BatchDesk, HeldEntries, StreamClock
from workers.versions import Version, VersionRouter, Versions
from workers.writer import Writer

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

    from workers.model import LoadedModel
    from workers.tracing import BatchTracer

log = logging.getLogger(__name__)

#: Exit codes a worker reports to its supervisor.
EXIT_OK = 0
EXIT_LOAD_FAILED = 3
EXIT_READER_FAILED = 1  # the reader thread died: restarted by the supervisor, as a crash

#: Longest wait for the writer to store earlier answers before a suspect's run.
SETTLE_S = 5.0


class Worker:
    """The worker: its parts, wired together. ``run()`` returns the process's exit code."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        worker_id: str,
        slot: int = 0,
        device: str | None = None,
        inherit_from: Sequence[str] = (),
        settings: Mapping[FieldT, EncodableT] | None = None,
        ready: Synchronized[int] | None = None,
        metrics: Cells | None = None,
        running: RunningBatch | LaneRunning | None = None,
        suspects: set[bytes] | None = None,
        repo_folder: Path | None = None,
        heartbeat_id: str | None = None,
        slot_metrics: Recorder | None = None,
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.slot = slot
        self.device = device
        self.inherit_from = list(inherit_from)
        # What the predecessors were running when they died (None: unknown, all suspect).
        self.suspects = suspects
        self.running = running
        self.settings: dict[FieldT, EncodableT] = dict(settings or {})
        self._batches_fixed = False  # the desk's batcher is set from the first version
        self.stats = WorkerStats()
        self.answers = AnswerMaker(self.stats)
        self.stopping = threading.Event()
        self.redis = connection.connect(config.redis_url, socket_timeout=10)
        self.clock = StreamClock()
        self.held = HeldEntries()
        # The slot's counters in the supervisor's shared memory; a private array without.
        # One model of several (slot_metrics given): its own counts (``metrics``: the
        # model's counters in the supervisor's shared memory), added to the slot's.
        layout = Layout.for_config(config)
        self.metrics: Recorder = (
            LaneRecorder(layout, slot=slot_metrics, cells=metrics) if slot_metrics is not None
            else Recorder(layout, [0.0] * layout.size if metrics is None else metrics,
                          enabled=config.metrics)
        )  # fmt: skip
        self.reader_failed = False  # set by the main loop: run() then exits non-zero
        self.tracer: BatchTracer | None = None  # set in run() when trace_exporter is
        batcher: Batcher[InHand] = Batcher(
            max_rows=config.max_batch_size,
            max_latency_s=config.max_latency_ms / 1000,
            buckets=config.buckets or None,
        )
        # The reader takes at most this many rows ahead of the model: enough to fill the
        # next batch while this one runs, not so many that other workers go idle.
        self.desk = BatchDesk(batcher, max_rows_held=2 * config.max_batch_size)
        # One reader, with its claims, per shard of the model's queue (workers.shards).
        self.claims = ShardClaims.of_model(config, consumer=worker_id)
        self.writer = Writer(
            redis_url=config.redis_url, model=config.name, result_ttl_s=config.result_ttl_s,
            shard_count=config.shards, held=self.held, shared=self.redis,
            metrics=self.metrics, clock=self.clock,
        )  # fmt: skip
        self._ready_flag = ready
        #: The heartbeat's key: the worker id, or ``id/model`` for one model of several.
        self.heartbeat_id = heartbeat_id or worker_id
        self.versions = Versions(config.name, parse_labels(config.labels))
        #: Keeps the versions in step with the repository (None: one model file, version 1).
        self.watcher: VersionWatcher | None = None
        if repo_folder is not None:
            self.watcher = VersionWatcher(
                folder=repo_folder, policy=VersionPolicy.parse(config.version_policy),
                versions=self.versions, build=self._build, poll_s=config.poll_s,
                stopping=self.stopping, redis_url=config.redis_url,
            )  # fmt: skip
        #: Set once the first load was tried (whether or not a version loaded).
        self.first_attempt = threading.Event()

    def run(self) -> int:
        """Load, warm up, register, serve until stopped, drain. Returns the exit code."""
        if self.config.trace_exporter:  # before any version's runner is built
            from workers.tracing import BatchTracer

            self.tracer = BatchTracer(
                self.config.trace_exporter, model=self.config.name, worker_id=self.worker_id
            )
        try:
            first = self._load_first()
        finally:
            self.first_attempt.set()
        if first is None:
            self._close_tracer()
            return EXIT_OK  # stopped before any version could load
        self.desk.batcher = first.served.batcher  # the batches the model allows
        self._batches_fixed = True
        presence, readers = self._assemble(first)
        presence.register()
        presence.sync_clock()
        writer = threading.Thread(target=self.writer.run, name="tfpool-writer", daemon=True)
        threads = [
            *(threading.Thread(target=reader.run, name=f"tfpool-reader-{i}", daemon=True)
              for i, reader in enumerate(readers)),
            writer,
            threading.Thread(target=presence.run, name="tfpool-heartbeat", daemon=True),
        ]  # fmt: skip
        if self.watcher is not None:
            threads.append(
                threading.Thread(target=self.watcher.run, name="tfpool-watcher", daemon=True)
            )
        for thread in threads:
            thread.start()
        presence.heartbeat("ready")
        if self._ready_flag is not None:
            self._ready_flag.value = 1
        log.info("worker %s ready: model %s (version %s) on %s", self.worker_id,
                 self.config.name, first.number, self.device or "cpu")  # fmt: skip
        self.serve([reader.done for reader in readers])
        self.writer.close()  # the writer posts what it has, then exits
        writer.join(timeout=30)
        with contextlib.suppress(redis.RedisError):
            self.claims.release_if_idle(self.redis)
        presence.heartbeat("stopped")
        self._close_tracer()
        log.info("worker %s stopped after %d batches, %d requests", self.worker_id,
                 self.stats.batches, self.stats.requests)  # fmt: skip
        return EXIT_READER_FAILED if self.reader_failed else EXIT_OK

    @property
    def model(self) -> LoadedModel | None:
        """The default version's model (None before one is loaded). Not kept otherwise: a
        retired version is dropped once drained."""
        version = self.versions.default_version()
        return None if version is None else version.served.model

    def _close_tracer(self) -> None:
        if self.tracer is not None:
            self.tracer.close()  # sends the spans still buffered

    def stop(self) -> None:
        """Stop reading; finish and answer what is in hand; then ``run()`` returns."""
        self.stopping.set()
        self.desk.wake()

    def serve(self, readers_done: list[threading.Event]) -> None:
        """The main loop: wait for a due batch, run it on its version, hand its answers to
        the writer."""
        while True:
            if not self.stopping.is_set() and any(done.is_set() for done in readers_done):
                # A bug, or a Redis reply nobody foresaw: without a reader this worker
                # would look alive and serve nothing. Finish what is in hand and exit, so
                # that the supervisor starts a fresh one.
                log.error("worker %s: its reader stopped unexpectedly; draining so that it"
                          " is restarted", self.worker_id)  # fmt: skip
                self.reader_failed = True
                self.stop()
            closing = self.stopping.is_set() and all(done.is_set() for done in readers_done)
            batch, expired = self.desk.next_batch(closing=closing, max_wait=0.1)
            if expired:
                self.writer.submit([self.answers.error(r, deadline_error(r)) for r in expired])
                self.versions.answered(Counter(r.version or 0 for r in expired))
            if batch is None:
                if closing and self.desk.is_empty():
                    return
                continue
            alone = [part.item.entry_id for part in batch.parts if part.item.suspect]
            if alone:  # counted before the run: if it kills us, the count says so
                self.claims.record_runs(self.redis, alone)
                # The answers of earlier batches must not die with this one.
                self.writer.settle(timeout=SETTLE_S)
            version = self.versions.get(batch.parts[0].item.version or 0)
            if self.running is not None:
                self.running.start(part.item.entry_id for part in batch.parts)
            answers = version.runner.run(batch)
            if self.running is not None:
                self.running.clear()
            if alone:
                # The next batch may be the request that killed the last worker: these
                # answers must not die with it.
                self.writer.post_now(answers)
            elif self.desk.quiet() and self.writer.idle():
                # Nothing else to run, nothing else to post: post on this thread rather
                # than wake the writer's (what a lone request would wait for).
                self.writer.post_now(answers)
            else:
                self.writer.submit(answers)
            # After the answers are handed on: a drained version may be dropped now.
            self.versions.answered(Counter({version.number: len(answers)}))

    def _load_first(self) -> Version | None:
        """The first version to serve: the model file (version 1), or what the repository
        holds (waiting for a loadable version; None if stopped first)."""
        if self.watcher is None:
            self.versions.add(self._build(1, self.config.model, lambda: None))
        else:
            # Two scans before judging: a folder counts as complete once seen unchanged
            # twice (or marked READY).
            self.watcher.refresh()
            if not self.versions.serving() and not self.stopping.wait(self.config.poll_s):
                self.watcher.refresh()
            self.first_attempt.set()
            while not self.versions.serving():
                if self.stopping.wait(self.config.poll_s):
                    return None
                self.watcher.refresh()
        return self.versions.default_version()

    def _build(self, number: int, path: str, on_warming: Callable[[], None]) -> Version:
        """Load and warm one version; its intake and runner. Raises if it cannot serve."""
        config = self.config
        if path != config.model:
            config = dataclasses.replace(config, model=path)
        template: Batcher[InHand] = Batcher(
            max_rows=config.max_batch_size,
            max_latency_s=config.max_latency_ms / 1000,
            buckets=config.buckets or None,
        )
        served = load(config, template, on_warming)
        if self._batches_fixed and served.batcher.buckets != self.desk.batcher.buckets:
            raise ModelLoadError(
                f"version {number} takes batches of {served.batcher.buckets} rows, the"
                f" versions before it {self.desk.batcher.buckets}: serve it under a new name"
            )
        intake = Intake(
            model_name=config.name, inputs=served.model.inputs, limits=config.limits(),
            max_rows=config.max_rows, clock=self.clock, answers=self.answers,
            preprocess=served.preprocess, convert=config.convert_inputs,
            alone=config.batching == "off",
        )  # fmt: skip
        runner = Runner(
            model=served.model, inputs=served.model.inputs, output_names=served.output_names,
            bucket_for=served.batcher.bucket_for, stats=self.stats, answers=self.answers,
            metrics=self.metrics, postprocess=served.postprocess, tracer=self.tracer,
        )  # fmt: skip
        return Version(number, path, served, intake, runner)

    def _assemble(self, first: Version) -> tuple[Presence, list[Reader]]:
        """The parts that need a loaded version."""
        info = self.versions.model_info
        details = None if self.watcher is None else self.versions.heartbeat_fields
        presence = Presence(
            self.config, self.redis, worker_id=self.heartbeat_id, slot=self.slot,
            device=self.device, settings=self.settings, model_info=info(self.config.max_queue),
            stats=self.stats, held=self.held, claims=self.claims, clock=self.clock,
            stopping=self.stopping, stop=self.stop, metrics=self.metrics, details=details,
        )  # fmt: skip
        self.versions.on_change = lambda: presence.update_info(info(self.config.max_queue))
        router = VersionRouter(self.versions, self.answers, fallback=first.intake)
        accept_lock = threading.Lock()
        readers = [
            Reader(
                self.config, consumer=self.worker_id, inherit_from=self.inherit_from,
                suspects=self.suspects, claims=claims, intake=router, desk=self.desk,
                writer=self.writer, held=self.held, stopping=self.stopping,
                register=presence.register_quietly, accept_lock=accept_lock,
            )
            for claims in self.claims.each
        ]  # fmt: skip
        return presence, readers


def consumer_name(pid: int) -> str:
    """A worker's consumer name in the group (and heartbeat id): host and pid, so that the
    supervisor can name the consumer of a worker it saw die."""
    return f"{socket.gethostname()}:{pid}"
