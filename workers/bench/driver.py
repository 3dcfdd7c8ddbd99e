"""The whole benchmark run: for each model, build it, measure it bare in every candidate
layout of the machine (as ``workers = "auto"`` does at start), then for each of its
scenarios start a pool and measure ``runs`` runs; keep the median run. And the table."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

import numpy as np

from workers.batcher import default_buckets
from workers.bench import floor
from workers.bench.gateway import GatewayProcess
from workers.bench.models import MODELS, build_model
from workers.bench.scenarios import SCENARIOS, Figures, Scenario, run_scenario
from workers.config import AUTO, PoolConfig
from workers.layouts import LayoutFigures, WorkerLayout, candidate_layouts, choose_layout
from workers.placement import cpu_count
from workers.probe import measure_layouts
from workers.supervisor import Supervisor


def run(
    names: Sequence[str],
    *,
    redis_url: str,
    runs: int = 1,
    workers: int | str = AUTO,
    intra_op_threads: int = 0,
    model_dir: str | None = None,
    metrics: bool = True,
    seconds: float | None = None,
    shards: int = 1,
    log: Callable[[str], None] = print,
) -> list[Figures]:
    """Run the named scenarios ``runs`` times each; return the median run of each (by
    rows/s, and by p50 for the lone-request scenario). A scenario compared with a
    baseline (the gateway's with the direct client's) brings its baseline along. Every
    scenario is compared with the model's best bare layout among the machine's candidates
    (measured in this run); ``workers = "auto"`` serves with that layout (as a pool would
    choose it at start), a number with that many workers of ``intra_op_threads`` (default:
    the cores divided among them).
    ``metrics``: the workers record metrics (the default, as in production); off
    measures what recording costs. ``seconds``: measure each scenario that long instead
    of its own duration (and warm up at most that long, and measure each bare batch size
    in each layout a quarter of it, at most 1.5 s): a quick look, not figures.
    ``shards``: of each pool's queue."""
    by_model: dict[str, list[Scenario]] = {}
    for name in with_baselines(names):
        scenario = SCENARIOS[name]
        if seconds is not None:
            warmup = min(scenario.warmup_s, seconds)
            scenario = replace(scenario, duration_s=seconds, warmup_s=warmup)
        by_model.setdefault(scenario.model, []).append(scenario)
    medians: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="tfpool-bench-") as tmp:
        for model, scenarios in by_model.items():
            path = build_model(model, model_dir or tmp)
            max_batch = max(s.max_batch_size for s in scenarios)
            bare_s = 1.5 if seconds is None else min(seconds / 4, 1.5)
            bare = _measure_bare(model, path, max_batch, bare_s, log)
            layout = _pool_layout(workers, intra_op_threads, bare.layout)
            log(f"[{model}] pool: {layout}")
            for scenario in scenarios:
                figures = _median_of_runs(
                    scenario,
                    path,
                    layout,
                    bare,
                    medians,
                    redis_url=redis_url,
                    runs=runs,
                    metrics=metrics,
                    shards=shards,
                    log=log,
                )
                medians.append(figures)
    by_name = {f.scenario: f for f in medians}
    for f in medians:
        if f.baseline and by_name[f.baseline].rows_per_s:
            f.vs_baseline = f.rows_per_s / by_name[f.baseline].rows_per_s
    _add_floors(medians, 2.0 if seconds is None else min(seconds, 2.0), log)
    return medians


def _add_floors(medians: list[Figures], seconds: float, log: Callable[[str], None]) -> None:
    """Each closed-loop client scenario's floor (:mod:`.floor`: its calls alone, no Redis,
    no model), and for the calls users write, their rate and ceiling as a fraction of the
    model's ``submit_many`` scenario (``<model>-closed``) in this run."""
    floors: dict[tuple[str, int, str], floor.Floor] = {}
    for f in medians:
        scenario = SCENARIOS[f.scenario]
        if scenario.via != "client" or scenario.load != "closed":
            continue
        key = (scenario.call, scenario.concurrency, scenario.model)
        if key not in floors:
            row = np.zeros(MODELS[scenario.model].shape, np.float32)
            floors[key] = floor.measure_in_process(*key[:2], seconds, row)
            log(f"[{f.scenario}] calls alone: {floors[key].requests_per_s:,.0f} req/s,"
                f" {floors[key].cpu_us_per_request:.1f} us CPU/req")  # fmt: skip
        f.floor_requests_per_s = floors[key].requests_per_s
        f.floor_cpu_us = floors[key].cpu_us_per_request
    by_name = {f.scenario: f for f in medians}
    for f in medians:
        many = by_name.get(f"{f.model}-closed")
        call = SCENARIOS[f.scenario].call
        if many is None or many is f or call == "many" or not f.floor_cpu_us:
            continue
        many_key = ("many", SCENARIOS[many.scenario].concurrency, f.model)
        if many.rows_per_s and many_key in floors:
            f.of_many = f.rows_per_s / many.rows_per_s
            f.ceiling_of_many = floor.ceiling(
                many.cpu_us_per_request,
                floors[many_key],
                floors[(call, SCENARIOS[f.scenario].concurrency, f.model)],
            )


def with_baselines(names: Sequence[str]) -> list[str]:
    """``names`` in order, each scenario's baseline just before it unless already there."""
    ordered: list[str] = []
    for name in names:
        baseline = SCENARIOS[name].baseline
        if baseline and baseline not in ordered and baseline not in names:
            ordered.append(baseline)
        if name not in ordered:
            ordered.append(name)
    return ordered


def _measure_bare(
    model: str, path: str, max_batch: int, seconds: float, log: Callable[[str], None]
) -> LayoutFigures:
    """The bare model in every candidate layout of this machine; the best one."""
    layouts = candidate_layouts(cpu_count())
    log(f"[{model}] measuring the bare model in layouts {', '.join(map(str, layouts))}")
    measured = measure_layouts(
        PoolConfig(model=path), layouts, default_buckets(max_batch), seconds=seconds, one_row=True
    )
    for figures in measured:
        log(f"[{model}] bare {figures.describe()}; one row {figures.one_row_ms:.3f} ms")
    best, why = choose_layout(measured)
    log(f"[{model}] best bare layout {best.layout}: {why}")
    return best


def _pool_layout(workers: int | str, intra_op_threads: int, best: WorkerLayout) -> WorkerLayout:
    """The pool's layout: the best bare one for "auto" (unless ``intra_op_threads`` says the
    threads), else ``workers`` processes sharing the cores."""
    cores = cpu_count()
    if workers == AUTO:
        if not intra_op_threads:
            return best
        return WorkerLayout(max(1, cores // intra_op_threads), intra_op_threads)
    processes = int(workers)
    return WorkerLayout(processes, intra_op_threads or max(1, cores // processes))


def _median_of_runs(
    scenario: Scenario,
    path: str,
    layout: WorkerLayout,
    bare: LayoutFigures,
    earlier: list[Figures],
    *,
    redis_url: str,
    runs: int,
    metrics: bool,
    shards: int,
    log: Callable[[str], None],
) -> Figures:
    """Start a pool for ``scenario``, measure it ``runs`` times, drain it; the median run.
    An open loop offers half the rate of the model's closed loop among ``earlier``."""
    config = PoolConfig(
        model=path,
        name=scenario.model,
        redis_url=redis_url,
        max_batch_size=scenario.max_batch_size,
        max_latency_ms=scenario.max_latency_ms,
        heartbeat_s=0.25,
        max_queue=0,
        metrics=metrics,
        shards=shards,
        log_level="WARNING",
    )
    saturated = max(
        (f.requests_per_s for f in earlier
         if f.model == scenario.model and f.load == "closed" and f.scenario.endswith("closed")),
        default=0.0,
    )  # fmt: skip
    supervisor = Supervisor(config, slots=layout.slots())
    supervisor.start()
    gateway = None
    try:
        if not supervisor.wait_ready(timeout=600):
            raise RuntimeError("the pool did not start")
        if scenario.via == "gateway":
            gateway = GatewayProcess(redis_url)
        results = []
        for i in range(runs):
            f = run_scenario(scenario, redis_url=redis_url, supervisor=supervisor, bare=bare,
                             saturated_rate=saturated, gateway=gateway)  # fmt: skip
            f.layout = str(layout)
            log(
                f"[{scenario.name}] run {i + 1}: {f.requests_per_s:,.0f} req/s,"
                f" p50 {f.p50_ms:.2f} ms, p99 {f.p99_ms:.2f} ms,"
                f" batch {f.mean_batch:.1f}, {f.cpu_us_per_request:.0f} us CPU/req,"
                f" ratio {f.ratio:.3f}"
            )
            results.append(f)
        return sorted(results, key=_median_key(scenario))[len(results) // 2]
    finally:
        if gateway is not None:
            gateway.stop()
        supervisor.drain()


def _median_key(scenario: Scenario) -> Callable[[Figures], float]:
    """What "the median run" is ranked by: latency where latency is the point (a lone
    request, an open loop at a fixed rate), throughput elsewhere."""
    if scenario.load == "open":
        return lambda f: f.p99_ms
    if scenario.concurrency == 1:
        return lambda f: f.p50_ms
    return lambda f: f.rows_per_s


def render(figures: Sequence[Figures]) -> str:
    """The table ``tfpool bench`` prints."""
    header = (
        "scenario",
        "layout",
        "req/s",
        "rows/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "batch",
        "CPU us/req",
        "bare rows/s",
        "bare layout",
        "pool/bare",
    )
    rows = [
        (
            f.scenario,
            f.layout,
            f"{f.requests_per_s:,.0f}",
            f"{f.rows_per_s:,.0f}",
            f"{f.p50_ms:.2f}",
            f"{f.p90_ms:.2f}",
            f"{f.p99_ms:.2f}",
            f"{f.max_ms:.2f}",
            f"{f.mean_batch:.1f}",
            f"{f.cpu_us_per_request:.0f}",
            f"{f.bare_rows_per_s:,.0f}",
            f"{f.bare_layout} b{f.bare_best_batch}",
            f"{f.ratio:.3f}",
        )
        for f in figures
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in (header, *rows)
    ]
    notes = [
        f"{f.scenario}: bare one-row call {f.bare_one_row_ms:.3f} ms; CPU us/req split "
        + ", ".join(f"{k} {v:.0f}" for k, v in f.cpu_split_us.items())
        + (f"; offered {f.rate:,.0f} req/s" if f.load == "open" else "")
        + (f"; {f.errors} errors" if f.errors else "")
        + (f"; {f.vs_baseline:.2f}x the rows/s of {f.baseline} in this run" if f.baseline else "")
        + (
            f"; calls alone (no Redis, no model) {f.floor_requests_per_s:,.0f} req/s at"
            f" {f.floor_cpu_us:.1f} us CPU/req"
            if f.floor_cpu_us
            else ""
        )
        + (
            f"; {f.of_many:.2f} of {f.model}-closed (ceiling on these cores"
            f" {f.ceiling_of_many:.2f})"
            if f.of_many
            else ""
        )
        for f in figures
    ]
    return "\n".join([*lines, "", *notes])


def to_json(figures: Sequence[Figures]) -> str:
    return json.dumps([asdict(f) for f in figures], indent=2)
