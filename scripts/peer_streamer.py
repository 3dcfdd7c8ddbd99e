"""The service-streamer side of ``scripts/peer_bench.py``: run by the python of the
virtualenv that holds service-streamer 0.1.2 (not a tfpool dependency), never imported by
tfpool itself.

    python -m scripts.peer_streamer worker             # settings from TFPOOL_PEER_* below
    python -m scripts.peer_streamer producer JOB.json  # writes its figures to JOB.json.out

Its Redis mode as its README shows it: the model process calls
``run_redis_workers_forever(ManagedModelSubclass, batch_size, max_latency, redis_broker=)``
(it spawns the worker process and joins it), and a web service holds one ``RedisStreamer``
whose ``predict(batch)`` blocks until every item's answer is back.

What 0.1.2 needs that its README does not say: ``run_redis_workers_forever`` accepts
``model_init_args`` / ``model_init_kwargs`` but never hands them to the worker process, so
the model's settings travel in the environment (the spawned worker inherits it); and it
has no readiness signal, so ``init_model`` says so itself (a list this script pushes to).

The model runs through tfpool's own loader (``workers.model.load_model``: the traced
function the pool's worker calls too), with the same TensorFlow thread settings and
warmed up on every batch size service-streamer can form, so that the model code is the
same on both sides and only what surrounds it differs.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from typing import Any

import numpy as np
import redis
from service_streamer import (  # type: ignore[import-not-found, import-untyped, unused-ignore]
    ManagedModel,
    RedisStreamer,
    run_redis_workers_forever,
)

#: The worker's settings (environment, since service-streamer drops the init arguments).
MODEL_ENV = "TFPOOL_PEER_MODEL"  # the model file
REDIS_ENV = "TFPOOL_PEER_REDIS"  # host:port
BATCH_ENV = "TFPOOL_PEER_BATCH"  # service-streamer's batch_size
LATENCY_ENV = "TFPOOL_PEER_LATENCY_MS"  # service-streamer's max_latency, in ms
THREADS_ENV = "TFPOOL_PEER_THREADS"  # TensorFlow intra-op threads

#: The list the worker pushes its pid to once warm; the hash of its batch counters.
READY_KEY = "tfpool-peer:ready"
COUNTERS_KEY = "tfpool-peer:counters"


class PeerModel(ManagedModel):  # type: ignore[misc, unused-ignore]
    """The benchmark model as service-streamer wants it: ``init_model`` in the worker
    process, ``predict(list of inputs) -> list of outputs``."""

    def init_model(self) -> None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        from workers.model import configure_tensorflow, load_model

        configure_tensorflow(
            intra_op_threads=int(os.environ[THREADS_ENV]), inter_op_threads=1
        )  # as the pool's worker is placed (workers.placement.Slot)
        self.loaded = load_model(os.environ[MODEL_ENV])
        self.input_name = self.loaded.inputs[0].name
        self.output_name = self.loaded.output_names[0]
        self.loaded.warm_up(range(1, int(os.environ[BATCH_ENV]) + 1))
        # Written by predict (the worker's one model thread), read by _post_counters.
        self.rows = self.batches = 0
        host, port = os.environ[REDIS_ENV].split(":")
        self.redis = redis.Redis(host=host, port=int(port))
        threading.Thread(target=self._post_counters, daemon=True).start()
        self.redis.rpush(READY_KEY, os.getpid())

    def predict(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        outputs = self.loaded({self.input_name: np.stack(batch)})[self.output_name]
        self.rows += len(batch)
        self.batches += 1
        return list(outputs)

    def _post_counters(self) -> None:
        """The mean batch, for the benchmark (as the pool's heartbeat carries its own)."""
        while True:
            self.redis.hset(COUNTERS_KEY, mapping={"rows": self.rows, "batches": self.batches})
            time.sleep(0.1)


def serve() -> None:
    """The model process: service-streamer's own worker loop, forever."""
    run_redis_workers_forever(
        PeerModel,
        int(os.environ[BATCH_ENV]),
        float(os.environ[LATENCY_ENV]) / 1000,
        worker_num=1,
        redis_broker=os.environ[REDIS_ENV],
    )


def produce(job: dict[str, Any]) -> dict[str, Any]:
    """One producer process: ``concurrency`` threads sharing one ``RedisStreamer``, each
    calling ``predict([x])`` in a loop. Latencies (s) and errors count inside the window
    only; CPU seconds over the window. The same loop as the pool's ``predict()`` threads
    (workers/bench/producers.py)."""
    streamer = RedisStreamer(redis_broker=job["broker"])
    rng = np.random.default_rng(job["seed"])
    x = rng.standard_normal(job["shape"]).astype(np.float32)
    offset = time.perf_counter() - time.time()
    start, stop = job["start_at"] + offset, job["stop_at"] + offset
    latencies: list[float] = []
    errors = [0]

    def loop() -> None:
        while (sent_at := time.perf_counter()) < stop:
            try:
                streamer.predict([x])
                ok = True
            except TimeoutError:  # what predict raises when an answer never comes
                ok = False
            now = time.perf_counter()
            if sent_at >= start and now <= stop:
                if ok:
                    latencies.append(now - sent_at)
                else:
                    errors[0] += 1

    cpu: dict[str, float] = {}

    def sample_cpu() -> None:
        time.sleep(max(0.0, job["start_at"] - time.time()))
        cpu["start"] = _cpu_seconds()
        time.sleep(max(0.0, job["stop_at"] - time.time()))
        cpu["stop"] = _cpu_seconds()

    threads = [threading.Thread(target=loop) for _ in range(job["concurrency"])]
    threads.append(threading.Thread(target=sample_cpu))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors[0], "cpu": cpu["stop"] - cpu["start"]}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        serve()
    elif sys.argv[1:2] == ["producer"] and len(sys.argv) == 3:
        with open(sys.argv[2]) as f:
            result = produce(json.load(f))
        with open(sys.argv[2] + ".out", "w") as f:
            json.dump(result, f)
    else:
        sys.exit("usage: python -m scripts.peer_streamer worker | producer JOB.json")
