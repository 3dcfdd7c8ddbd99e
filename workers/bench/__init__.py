"""``tfpool bench``: drive a pool the way perf_analyzer drives Triton, and print one table.

Each scenario starts producers in their own processes against a pool serving a model
built on the spot (random weights, real shapes), warms up, then measures a fixed window:

* closed loop: each producer keeps ``concurrency`` requests in flight;
* open loop: Poisson arrivals at a fixed rate; latency counts from the *scheduled* send
  time, so a producer that falls behind shows up as latency, not as a lower rate.

A gateway scenario (``mlp-gateway``) makes the producers TF Serving clients: gRPC
``Predict`` calls to a ``tfpool gateway`` process in front of the pool. It brings its
baseline (``mlp-closed-64``: the same load through ``queueing.Client``) into the run, and
reports its rows/s as a fraction of the baseline's.

Figures: requests/s and rows/s, latency percentiles, mean batch size (from the workers'
counters), CPU time per request summed over every process involved (producers, workers,
redis-server, the gateway), and the bare model's best rows/s with the ratio: tight
``model(batch)`` loops in fresh processes placed as workers are, in every candidate layout
of processes x intra-op threads of the machine (the layouts ``workers = "auto"`` tries), on
an otherwise idle machine; the best layout is the one compared with, named in the table.

Read in this order: :mod:`.driver` (the whole run: per model, build it, measure it bare
with :mod:`workers.probe`, start a pool, run its scenarios), :mod:`.models` (the models, by
name), :mod:`.scenarios` (one scenario's measurement and figures),
:mod:`.producers` (the producer processes' loops), :mod:`.gateway` (the gateway process
and the gRPC producers' loop).
"""

from workers.bench.driver import render, run, to_json
from workers.bench.models import MODELS, build_model
from workers.bench.scenarios import SCENARIOS, Figures, Scenario, process_cpu, redis_cpu

__all__ = [
    "MODELS",
    "SCENARIOS",
    "Figures",
    "Scenario",
    "build_model",
    "process_cpu",
    "redis_cpu",
    "render",
    "run",
    "to_json",
]
