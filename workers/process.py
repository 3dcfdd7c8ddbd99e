"""A worker process: its entry point (:func:`worker_main`, what the supervisor spawns), which
sets the device up before TensorFlow is imported, and the lanes of a model repository
(:func:`run_models`: one :class:`workers.worker.Worker` per model, in one process)."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from workers.config import PoolConfig
from workers.errors import ModelLoadError, WorkerError
from workers.memory import keep_large_buffers
from workers.metrics import Cells, Layout, Recorder
from workers.placement import Slot
from workers.quiet import native_stderr_silenced, quiet_tensorflow_logging
from workers.repository import model_names
from workers.running import RunningBatch, RunningLanes
from workers.worker import EXIT_LOAD_FAILED, EXIT_OK, Worker, consumer_name

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

log = logging.getLogger("workers.worker")  # as the worker's own lines


def worker_main(
    config: PoolConfig,
    slot: Slot,
    inherit_from: list[str],
    ready: Synchronized[int],
    metrics: Cells | None = None,
    running: RunningBatch | None = None,
    suspects: set[bytes] | None = None,
    model_metrics: Mapping[str, Cells] | None = None,
) -> None:
    """Entry point of a spawned worker process. Sets the device environment *before*
    TensorFlow is imported, so that a worker sees only its own GPU. SIGTERM drains (the
    supervisor's way to stop or recycle it); a second SIGTERM exits at once. ``running``
    and ``suspects``: see :mod:`workers.running`. ``metrics``: the slot's counters;
    ``model_metrics``: a repository pool's, each model's own in this slot."""
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
    if config.model_repo:
        # The slot's shared memory (laid out for the pool's config, as the supervisor
        # reads it) counts every lane; each lane also counts its own model's figures, in
        # the model's shared memory (a model found after the supervisor started has none).
        model_metrics = model_metrics or {}
        layout = Layout.for_config(config)
        slot_metrics = Recorder(layout, [0.0] * layout.size if metrics is None else metrics,
                                enabled=config.metrics)  # fmt: skip
        shared_running = None if running is None else RunningLanes(running)
        lanes = [
            Worker(
                config.for_model(name, str(Path(config.model_repo) / name)),
                worker_id=worker_id,
                slot=slot.index,
                device=slot.device,
                inherit_from=inherit_from,
                # Shared: each lane's reader takes over its own stream's entries, and the
                # ids are those of every lane's batch (see RunningLanes).
                suspects=suspects,
                running=None if shared_running is None else shared_running.lane(name),
                slot_metrics=slot_metrics,
                metrics=model_metrics.get(name),
                repo_folder=Path(config.model_repo) / name,
                heartbeat_id=f"{worker_id}/{name}",
            )
            for name in model_names(config.model_repo)
        ]
    else:
        lanes = [
            Worker(
                config,
                worker_id=worker_id,
                slot=slot.index,
                device=slot.device,
                inherit_from=inherit_from,
                ready=ready,
                metrics=metrics,
                running=running,
                suspects=suspects,
            )
        ]
    worker = lanes[0]

    def on_term(signum: int, frame: object) -> None:
        if worker.stopping.is_set():
            os._exit(EXIT_OK)
        for lane in lanes:
            lane.stop()

    def on_hup(signum: int, frame: object) -> None:
        for lane in lanes:
            if lane.watcher is not None:
                lane.watcher.wake.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_hup)
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
        for lane in lanes:
            lane.settings.update(settings)
        code = worker.run() if not config.model_repo else run_models(lanes, ready)
    except WorkerError as e:  # says what is wrong and what to do: no traceback needed
        log.error("worker %s cannot serve the model: %s", worker_id, e)
        code = EXIT_LOAD_FAILED if worker.model is None else 1
    except Exception:
        log.exception("worker %s failed", worker_id)
        code = EXIT_LOAD_FAILED if worker.model is None else 1
    raise SystemExit(code)


def run_models(lanes: list[Worker], ready: Synchronized[int]) -> int:
    """Serve several models in this process: each model (a lane) with its own reader,
    writer, heartbeat, watcher and serving thread, all sharing the process's TensorFlow
    (which releases the GIL while a model runs). Ready once every model has tried its
    first load; exit code 3 when none of them could load any version."""
    codes: dict[str, int] = {}

    def run(lane: Worker) -> None:
        try:
            codes[lane.config.name] = lane.run()
        except Exception:
            log.exception("model %s failed", lane.config.name)
            codes[lane.config.name] = 1
            lane.first_attempt.set()

    threads = [
        threading.Thread(target=run, args=(lane,), name=f"tfpool-model-{lane.config.name}")
        for lane in lanes
    ]
    for thread in threads:
        thread.start()
    for lane in lanes:
        lane.first_attempt.wait()
    if not any(lane.versions.serving() for lane in lanes):
        log.error("no model of the repository could load a version")
        for lane in lanes:
            lane.stop()
        for thread in threads:
            thread.join()
        return EXIT_LOAD_FAILED
    ready.value = 1
    for thread in threads:
        thread.join()
    return max(codes.values(), default=EXIT_OK)


def preload(modules: Sequence[str]) -> None:
    """Import the preload modules (custom layers and ops register themselves on import).
    Raises :class:`ModelLoadError` naming the module that failed."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or whatever the module's own code raises
            raise ModelLoadError(f"cannot import preload module {module!r}: {e!r}") from e
