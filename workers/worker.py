"""One worker process: load the model once, then batch, run and answer, until told to stop.

Read this first. A request meets, in order: the reader (:mod:`workers.reader`: read,
take over from dead workers), the intake (:mod:`workers.intake`: decode, check, fit,
pre-process; no Redis), the batcher (:mod:`workers.batcher`), the runner
(:mod:`workers.runner`: assemble, pad, run, split; no Redis), the writer
(:mod:`workers.writer`: answers -> Redis commands, kept until stored). The types they pass
along are in :mod:`workers.messages`; registration and the heartbeat in
:mod:`workers.presence`.

Four threads, so that the model never waits on Redis (TensorFlow releases the GIL):

* the reader: ``XREADGROUP`` -> the intake -> the batcher (refusals -> the writer);
* the main thread (:meth:`Worker.serve`): a due batch -> the runner -> the writer;
* the writer: replies, then ``XACK`` + ``XDEL``, in one MULTI/EXEC per round;
* the heartbeat: publishes the worker's state and renews its claim on what it holds, so
  that correctness depends on it (a long batch would otherwise be taken over).

Who shares what (every other object belongs to one thread):

============== ================================ ===================== =====================
object         written by                       read by               guarded by
============== ================================ ===================== =====================
``desk``       reader (adds), main (takes)      both                  its condition
``held``       reader (adds), writer (removes)  heartbeat (renews)    its lock
``clock``      heartbeat (sync)                 reader (arrivals)     none: a float, swapped
``stats``      main (batches); reader, main,    heartbeat             ``stats.lock`` for
               writer's callers (answers)                             answer counts
``writer``     reader, main (submit)            writer thread         its queue
``stopping``   signal handler, heartbeat        all                   an Event
``metrics``    main (batches), writer and main  heartbeat (window),   its lock for answers
               (answers stored), heartbeat      the supervisor        (batches: main only)
               (GPU memory)                     (scrapes)
``running``    main (before and after a batch)  the supervisor, once  shared memory, read
                                                the process is gone   only after its death
============== ================================ ===================== =====================

``metrics`` is the slot's block of shared memory (:mod:`workers.metrics`): it outlives
this process, so what it counted survives a crash.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import redis
from redis.typing import EncodableT, FieldT

from queueing import connection, keys
from workers.batcher import Batcher
from workers.claims import Claims
from workers.config import PoolConfig
from workers.errors import ModelLoadError, WorkerError
from workers.intake import Intake, deadline_error
from workers.memory import keep_large_buffers
from workers.messages import AnswerMaker, InHand, WorkerStats
from workers.metrics import Cells, Layout, Recorder
from workers.placement import Slot
from workers.presence import Presence
from workers.quiet import native_stderr_silenced, quiet_tensorflow_logging
from workers.reader import Reader
from workers.runner import Runner, Served, load
from workers.running import RunningBatch
from workers.shared import BatchDesk, HeldEntries, StreamClock
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
        running: RunningBatch | None = None,
        suspects: set[bytes] | None = None,
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
        self.model: LoadedModel | None = None  # set once loaded
        self.stats = WorkerStats()
        self.answers = AnswerMaker(self.stats)
        self.stopping = threading.Event()
        self.redis = connection.connect(config.redis_url, socket_timeout=10)
        self.clock = StreamClock()
        self.held = HeldEntries()
        # The slot's counters in the supervisor's shared memory; a private array without.
        layout = Layout.for_config(config)
        self.metrics = Recorder(layout, [0.0] * layout.size if metrics is None else metrics,
                                enabled=config.metrics)  # fmt: skip
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
        self.claims = Claims(
            stream=keys.stream(config.name), consumer=worker_id,
            claim_idle_ms=config.claim_idle_ms, max_deliveries=config.max_deliveries,
            batch=config.max_batch_size,
        )  # fmt: skip
        self.writer = Writer(
            redis_url=config.redis_url, model=config.name, result_ttl_s=config.result_ttl_s,
            held=self.held, shared=self.redis, metrics=self.metrics, clock=self.clock,
        )  # fmt: skip
        self._ready_flag = ready

    def run(self) -> int:
        """Load, warm up, register, serve until stopped, drain. Returns the exit code."""
        served = load(self.config, self.desk.batcher)
        self.desk.batcher = served.batcher  # the batches the model allows
        self.model = served.model
        if self.config.trace_exporter:
            from workers.tracing import BatchTracer

            self.tracer = BatchTracer(
                self.config.trace_exporter, model=self.config.name, worker_id=self.worker_id
            )
        presence, reader, runner = self._assemble(served)
        presence.register()
        presence.sync_clock()
        writer = threading.Thread(target=self.writer.run, name="tfpool-writer", daemon=True)
        for thread in (
            threading.Thread(target=reader.run, name="tfpool-reader", daemon=True),
            writer,
            threading.Thread(target=presence.run, name="tfpool-heartbeat", daemon=True),
        ):
            thread.start()
        presence.heartbeat("ready")
        if self._ready_flag is not None:
            self._ready_flag.value = 1
        log.info("worker %s ready: model %s on %s", self.worker_id, self.config.name,
                 self.device or "cpu")  # fmt: skip
        self.serve(runner, reader.done)
        self.writer.close()  # the writer posts what it has, then exits
        writer.join(timeout=30)
        with contextlib.suppress(redis.RedisError):
            self.claims.release_if_idle(self.redis)
        presence.heartbeat("stopped")
        if self.tracer is not None:
            self.tracer.close()  # sends the spans still buffered
        log.info("worker %s stopped after %d batches, %d requests", self.worker_id,
                 self.stats.batches, self.stats.requests)  # fmt: skip
        return EXIT_READER_FAILED if self.reader_failed else EXIT_OK

    def stop(self) -> None:
        """Stop reading; finish and answer what is in hand; then ``run()`` returns."""
        self.stopping.set()
        self.desk.wake()

    def serve(self, runner: Runner, reader_done: threading.Event) -> None:
        """The main loop: wait for a due batch, run it, hand its answers to the writer."""
        while True:
            if reader_done.is_set() and not self.stopping.is_set():
                # A bug, or a Redis reply nobody foresaw: without a reader this worker
                # would look alive and serve nothing. Finish what is in hand and exit, so
                # that the supervisor starts a fresh one.
                log.error("worker %s: its reader stopped unexpectedly; draining so that it"
                          " is restarted", self.worker_id)  # fmt: skip
                self.reader_failed = True
                self.stop()
            closing = self.stopping.is_set() and reader_done.is_set()
            batch, expired = self.desk.next_batch(closing=closing, max_wait=0.1)
            self.writer.submit([self.answers.error(r, deadline_error(r)) for r in expired])
            if batch is None:
                if closing and self.desk.is_empty():
                    return
                continue
            alone = [part.item.entry_id for part in batch.parts if part.item.suspect]
            if alone:  # counted before the run: if it kills us, the count says so
                self.claims.record_runs(self.redis, keys.attempts(self.config.name), alone)
                # The answers of earlier batches must not die with this one.
                self.writer.settle(timeout=SETTLE_S)
            if self.running is not None:
                self.running.start(part.item.entry_id for part in batch.parts)
            answers = runner.run(batch)
            if self.running is not None:
                self.running.clear()
            if alone:
                # The next batch may be the request that killed the last worker: these
                # answers must not die with it.
                self.writer.post_now(answers)
            else:
                self.writer.submit(answers)

    def _assemble(self, served: Served) -> tuple[Presence, Reader, Runner]:
        """The parts that need the loaded model."""
        info: dict[FieldT, EncodableT] = {
            "max_queue": self.config.max_queue,
            "inputs": served.describe_inputs(),
            "outputs": ", ".join(served.output_names),
            # Their dtypes and shapes, as "inputs" gives the inputs' (the gateway's metadata).
            "output_specs": ", ".join(f"{s.name}: {s.describe()}" for s in served.output_specs()),
        }
        presence = Presence(
            self.config, self.redis, worker_id=self.worker_id, slot=self.slot, device=self.device,
            settings=self.settings, model_info=info, stats=self.stats, held=self.held,
            claims=self.claims, clock=self.clock, stopping=self.stopping, stop=self.stop,
            metrics=self.metrics,
        )  # fmt: skip
        intake = Intake(
            model_name=self.config.name, inputs=served.model.inputs, limits=self.config.limits(),
            max_rows=self.config.max_rows, clock=self.clock, answers=self.answers,
            preprocess=served.preprocess, convert=self.config.convert_inputs,
            alone=self.config.batching == "off",
        )  # fmt: skip
        reader = Reader(
            self.config, consumer=self.worker_id, inherit_from=self.inherit_from,
            suspects=self.suspects, claims=self.claims, intake=intake, desk=self.desk,
            writer=self.writer, held=self.held, stopping=self.stopping,
            register=presence.register_quietly,
        )  # fmt: skip
        runner = Runner(
            model=served.model, inputs=served.model.inputs, output_names=served.output_names,
            bucket_for=self.desk.batcher.bucket_for, stats=self.stats, answers=self.answers,
            metrics=self.metrics, postprocess=served.postprocess, tracer=self.tracer,
        )  # fmt: skip
        return presence, reader, runner


def worker_main(
    config: PoolConfig,
    slot: Slot,
    inherit_from: list[str],
    ready: Synchronized[int],
    metrics: Cells | None = None,
    running: RunningBatch | None = None,
    suspects: set[bytes] | None = None,
) -> None:
    """Entry point of a spawned worker process. Sets the device environment *before*
    TensorFlow is imported, so that a worker sees only its own GPU. SIGTERM drains (the
    supervisor's way to stop or recycle it); a second SIGTERM exits at once. ``running``
    and ``suspects``: see :mod:`workers.running`."""
    # An empty CUDA_VISIBLE_DEVICES keeps a CPU worker off every GPU.
    os.environ["CUDA_VISIBLE_DEVICES"] = slot.device if slot.device is not None else ""
    debug = config.log_level.upper() == "DEBUG"
    quiet_tensorflow_logging(debug=debug)
    worker_id = consumer_name(os.getpid())
    keep_large_buffers()
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s %(levelname)s [worker {worker_id}] %(name)s: %(message)s",
    )
    worker = Worker(
        config, worker_id=worker_id, slot=slot.index, device=slot.device,
        inherit_from=inherit_from, ready=ready, metrics=metrics, running=running,
        suspects=suspects,
    )  # fmt: skip

    def on_term(signum: int, frame: object) -> None:
        if worker.stopping.is_set():
            os._exit(EXIT_OK)
        worker.stop()

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C reaches the whole process group; the supervisor decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # A module that cannot be imported never will be: a load failure (exit 3 stops the
        # pool), not a crash to restart with backoff forever.
        # TensorFlow starts (imported by a preload module, or here) and looks for GPUs
        # with its start-up lines kept off the terminal (see workers.quiet).
        with native_stderr_silenced(enabled=not debug):
            preload(config.preload)
            from workers.model import configure_tensorflow

            settings = configure_tensorflow(
                intra_op_threads=slot.intra_op_threads or None,
                inter_op_threads=slot.inter_op_threads or None,
            )
        worker.settings.update(settings)
        code = worker.run()
    except WorkerError as e:  # says what is wrong and what to do: no traceback needed
        log.error("worker %s cannot serve the model: %s", worker_id, e)
        code = EXIT_LOAD_FAILED if worker.model is None else 1
    except Exception:
        log.exception("worker %s failed", worker_id)
        code = EXIT_LOAD_FAILED if worker.model is None else 1
    raise SystemExit(code)


def preload(modules: Sequence[str]) -> None:
    """Import the preload modules (custom layers and ops register themselves on import).
    Raises :class:`ModelLoadError` naming the module that failed."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or whatever the module's own code raises
            raise ModelLoadError(f"cannot import preload module {module!r}: {e!r}") from e


def consumer_name(pid: int) -> str:
    """A worker's consumer name in the group (and heartbeat id): host and pid, so that the
    supervisor can name the consumer of a worker it saw die."""
    return f"{socket.gethostname()}:{pid}"
