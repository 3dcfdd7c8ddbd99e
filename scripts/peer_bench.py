"""tfpool against service-streamer's Redis mode (its closest peer), with the same calls, in
one run, on the same model and the same Redis, next to the bare model.

    python scripts/peer_bench.py                       # mlp and mobilenet, 4 s windows
    python scripts/peer_bench.py --runs 3 --seconds 8 --json peer.json
    python scripts/peer_bench.py --model mlp --venv /tmp/peer-venv --peer-batch-size 64

Needs PyPI: service-streamer 0.1.2 is not a tfpool dependency, so the script installs it
in a virtualenv of its own (``--venv``, default ~/.cache/tfpool-peer/venv; made with
``--system-site-packages`` so that TensorFlow, numpy and redis-py are this interpreter's)
and runs service-streamer's side with that virtualenv's python
(``scripts/peer_streamer.py``). A virtualenv that already has it is reused.

For each model, in one private redis-server, ``--runs`` pairs of runs: the bare model
(``workers.bench``: a tight ``model(batch)`` loop placed as the worker is) and tfpool's
``tfpool bench`` scenario of that call (``mlp-threads-64``: 64 threads in one producer
process each calling ``Client.predict`` on one 64-float row; ``mobilenet-threads-16``: 16
threads, one float32 224x224x3 image each), then service-streamer with the same producer
(one process, the same threads, each calling ``RedisStreamer.predict([x])``) against its
own worker (``run_redis_workers_forever``). Both sides: one worker process with the same
TensorFlow threads, the same model function, the scenario's batch size and latency
budget (service-streamer's ``batch_size`` and ``max_latency``), the same windows. Each
side's median run is shown, and tfpool's req/s over service-streamer's per pair of runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import redis

from workers import bench
from workers.bench import SCENARIOS, Figures, Scenario, process_cpu, redis_cpu
from workers.embedded_redis import RedisServer
from workers.placement import cpu_count

VERSION = "0.1.2"
REPO = Path(__file__).resolve().parents[1]
#: What the virtualenv's python imports: this checkout's scripts, and the workers package
#: this process runs (the same model loader on both sides).
PEER_PATH = os.pathsep.join(dict.fromkeys([str(REPO), str(Path(bench.__file__).parents[2])]))
#: The scenario of each model: its calls, concurrency, batch size and latency budget.
SCENARIO_OF = {"mlp": "mlp-threads-64", "mobilenet": "mobilenet-threads-16"}
PEER = "service-streamer"

# The keys scripts/peer_streamer.py uses (that module imports service-streamer).
READY_KEY = "tfpool-peer:ready"
COUNTERS_KEY = "tfpool-peer:counters"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    python = ensure_venv(Path(args.venv))
    threads = args.intra_op_threads or cpu_count()
    comparisons: list[Comparison] = []
    with tempfile.TemporaryDirectory(prefix="tfpool-peer-") as models, RedisServer() as server:
        for model in args.model:
            scenario = sized(SCENARIOS[SCENARIO_OF[model]], args.seconds)
            path = bench.build_model(model, models)
            batch = args.peer_batch_size or scenario.max_batch_size
            peer = PeerWorker(python, path, server, batch=batch, scenario=scenario, threads=threads)
            with peer:
                comparisons.append(compare(scenario, peer, server, args.runs, threads, models))
    print()
    print(render(comparisons))
    if args.json:
        Path(args.json).write_text(to_json(comparisons))
        print(f"wrote {args.json}")
    return 0


@dataclass
class Comparison:
    """One model's figures: each side's median run, and tfpool's req/s over
    service-streamer's in each pair of runs (the two runs of a pair saw the same load)."""

    ours: Figures
    theirs: Figures
    per_run: list[float | None]


def compare(
    scenario: Scenario,
    peer: PeerWorker,
    server: RedisServer,
    runs: int,
    threads: int,
    models: str,
) -> Comparison:
    """``runs`` pairs of runs, tfpool's then service-streamer's, so that both sides see
    the same background load; each side's median run (by rows/s). Each tfpool run is a
    ``tfpool bench`` run of the scenario: the bare model measured afresh, a pool started,
    measured and drained, while service-streamer's worker is paused."""
    ours, theirs, per_run = [], [], []
    for i in range(runs):
        log(f"[{scenario.model}] pair {i + 1} of {runs}: tfpool, then {PEER}")
        with peer.paused():
            (f,) = bench.run([scenario.name], redis_url=server.url, runs=1, workers=1,
                             intra_op_threads=threads, model_dir=models,
                             seconds=scenario.duration_s, log=log)  # fmt: skip
        g = peer.measure(scenario, f)
        log(
            f"[{g.scenario}] run {i + 1}: {g.requests_per_s:,.0f} req/s, p50 {g.p50_ms:.2f} ms,"
            f" p99 {g.p99_ms:.2f} ms, batch {g.mean_batch:.1f}, {g.cpu_us_per_request:.0f} us"
            f" CPU/req, {g.errors} errors; tfpool / {PEER}: {_times(ratio(f, g))}"
        )
        ours.append(f)
        theirs.append(g)
        per_run.append(ratio(f, g))
    return Comparison(median(ours), median(theirs), per_run)


def median(runs: Sequence[Figures]) -> Figures:
    """The median run by rows/s (of an even count, the upper one)."""
    return sorted(runs, key=lambda f: f.rows_per_s)[len(runs) // 2]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        choices=list(SCENARIO_OF),
        help="model to compare (repeatable; default: mlp and mobilenet)",
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="pairs of runs (each side's median shown)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=4.0,
        help="measured window of each run (warm-up: at most as long); default 4",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="TensorFlow threads of the one worker on each side (default: every core)",
    )
    parser.add_argument(
        "--venv",
        default=str(Path.home() / ".cache" / "tfpool-peer" / "venv"),
        help="service-streamer's virtualenv (made and filled from PyPI if missing)",
    )
    parser.add_argument(
        "--peer-batch-size",
        type=int,
        default=0,
        help=f"{PEER}'s batch_size (default: the scenario's max_batch_size, as tfpool's)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    args.model = args.model or list(SCENARIO_OF)
    if args.runs < 1 or args.seconds <= 0 or args.peer_batch_size < 0:
        parser.error("--runs must be >= 1, --seconds > 0 and --peer-batch-size >= 0")
    return args


def ensure_venv(path: Path) -> str:
    """The python of a virtualenv holding service-streamer ``VERSION``: ``path``'s if it
    has it, else one made there (``--system-site-packages``) and filled by pip."""
    python = path / "bin" / "python"
    if python.exists() and _installed(python) == VERSION:
        return str(python)
    log(f"making {path}: service-streamer=={VERSION} from PyPI")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", f"service-streamer=={VERSION}"]
    if subprocess.run(pip).returncode != 0:
        raise SystemExit(f"could not install service-streamer=={VERSION} from PyPI into {path}")
    return str(python)


def _installed(python: Path) -> str:
    probe = "import importlib.metadata as m; print(m.version('service-streamer'))"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def sized(scenario: Scenario, seconds: float) -> Scenario:
    """``scenario`` with the window ``bench.run`` gave it for ``--seconds``."""
    return replace(scenario, duration_s=seconds, warmup_s=min(scenario.warmup_s, seconds))


class PeerWorker:
    """service-streamer's worker process (``run_redis_workers_forever``, in the virtualenv)
    serving ``path`` with ``batch`` and the scenario's latency budget, and the runs
    measured against it. A context manager: started and warm on entry, stopped on exit."""

    def __init__(
        self,
        python: str,
        path: str,
        server: RedisServer,
        *,
        batch: int,
        scenario: Scenario,
        threads: int,
    ) -> None:
        self.python = python
        self.server = server
        self.conn = redis.Redis.from_url(server.url)
        self.conn.delete(READY_KEY, COUNTERS_KEY)
        env = {
            **os.environ,
            "PYTHONPATH": PEER_PATH,
            "TFPOOL_PEER_MODEL": path,
            "TFPOOL_PEER_REDIS": f"127.0.0.1:{server.port}",
            "TFPOOL_PEER_BATCH": str(batch),
            "TFPOOL_PEER_LATENCY_MS": str(scenario.max_latency_ms),
            "TFPOOL_PEER_THREADS": str(threads),
        }
        log(
            f"[{scenario.model}] {PEER}: starting its worker (batch_size {batch}, max_latency"
            f" {scenario.max_latency_ms / 1000} s, {threads} intra-op threads)"
        )
        self.process = subprocess.Popen(
            [python, "-m", "scripts.peer_streamer", "worker"],
            cwd=REPO,
            env=env,
            start_new_session=True,  # its own process group: stopped with its spawned child
            stdout=subprocess.DEVNULL,
        )

    def __enter__(self) -> PeerWorker:
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        os.killpg(self.process.pid, signal.SIGCONT)  # a stopped process acts on it once resumed
        self.process.wait(timeout=30)
        self.conn.close()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The worker's processes stopped (SIGSTOP) inside the block: idle, service-streamer's
        worker still polls (a few percent of a core), which tfpool's runs should not pay."""
        os.killpg(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.process.pid, signal.SIGCONT)

    def _wait_ready(self) -> None:
        give_up = time.monotonic() + 600
        while not self.conn.blpop([READY_KEY], timeout=1):
            if self.process.poll() is not None:
                raise RuntimeError(f"{PEER}'s worker exited with {self.process.returncode}")
            if time.monotonic() > give_up:
                raise RuntimeError(f"{PEER}'s worker was not ready within 600 s")

    def measure(self, scenario: Scenario, ours: Figures) -> Figures:
        """One run: the producer process in the virtualenv; CPU of the worker's processes
        and Redis, and the worker's batch counters, sampled at the window's edges. The
        bare model's figures are those of ``ours`` (the tfpool run just before)."""
        start_at = time.time() + scenario.warmup_s + 1.0  # a second for the producer to start
        stop_at = start_at + scenario.duration_s
        job = {
            "broker": f"127.0.0.1:{self.server.port}",
            "shape": list(bench.MODELS[scenario.model].shape),
            "concurrency": scenario.concurrency,
            "start_at": start_at,
            "stop_at": stop_at,
            "seed": 0,
        }
        worker = self.process.pid
        pids = [p.pid for p in psutil.Process(worker).children(recursive=True)] + [worker]
        with tempfile.TemporaryDirectory(prefix="tfpool-peer-job-") as tmp:
            job_file = Path(tmp) / "job.json"
            job_file.write_text(json.dumps(job))
            producer = subprocess.Popen(
                [self.python, "-m", "scripts.peer_streamer", "producer", str(job_file)],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": PEER_PATH},
            )
            time.sleep(max(0.0, start_at - time.time()))
            before = (process_cpu(pids), redis_cpu(self.conn), _counters(self.conn))
            time.sleep(max(0.0, stop_at - time.time()))
            after = (process_cpu(pids), redis_cpu(self.conn), _counters(self.conn))
            if producer.wait(timeout=120) != 0:
                raise RuntimeError(f"{PEER}'s producer exited with {producer.returncode}")
            result = json.loads(Path(f"{job_file}.out").read_text())
        return figures_of(
            f"{PEER} {scenario.name}",
            scenario.model,
            result,
            window=stop_at - start_at,
            cpu={"workers": after[0] - before[0], "redis": after[1] - before[1]},
            batches=(after[2][0] - before[2][0], after[2][1] - before[2][1]),
            bare=ours,
        )


def _counters(conn: redis.Redis) -> tuple[int, int]:
    got: dict[bytes, bytes] = conn.hgetall(COUNTERS_KEY)  # type: ignore[assignment]
    return int(got.get(b"rows", 0)), int(got.get(b"batches", 0))


def figures_of(
    name: str,
    model: str,
    result: dict[str, Any],
    *,
    window: float,
    cpu: dict[str, float],
    batches: tuple[int, int],
    bare: Figures,
) -> Figures:
    """A producer's result (latencies in s, errors, its CPU seconds) and the other
    processes' CPU seconds over ``window`` as :class:`Figures`, as ``tfpool bench``
    computes its own; the bare model's figures from ``bare`` (measured in the same run)."""
    latencies = sorted(result["latencies"])
    count = len(latencies)
    figures = Figures(scenario=name, model=model, load="closed", requests=count,
                      errors=result["errors"])  # fmt: skip
    figures.layout = bare.layout  # one worker with the same threads on each side
    figures.bare_layout = bare.bare_layout
    figures.bare_rows_per_s = bare.bare_rows_per_s
    figures.bare_best_batch = bare.bare_best_batch
    figures.bare_one_row_ms = bare.bare_one_row_ms
    if not count:
        return figures
    figures.requests_per_s = figures.rows_per_s = count / window
    figures.p50_ms, figures.p90_ms, figures.p99_ms = (
        1000 * latencies[min(count - 1, int(q * count))] for q in (0.5, 0.9, 0.99)
    )
    figures.max_ms = 1000 * latencies[-1]
    rows, calls = batches
    figures.mean_batch = rows / calls if calls else 0.0
    split = {"producers": result["cpu"], **cpu}
    figures.cpu_split_us = {k: 1e6 * v / count for k, v in split.items()}
    figures.cpu_us_per_request = sum(figures.cpu_split_us.values())
    figures.ratio = figures.rows_per_s / bare.bare_rows_per_s if bare.bare_rows_per_s else 0.0
    return figures


def render(comparisons: Sequence[Comparison]) -> str:
    """``tfpool bench``'s table of both sides' median runs, and one line per model: tfpool
    over service-streamer, of the medians and per pair of runs."""
    table = bench.render([f for c in comparisons for f in (c.ours, c.theirs)])
    lines = [
        f"{c.ours.model}: tfpool / {PEER} = {_times(ratio(c.ours, c.theirs))} req/s"
        f" ({c.ours.requests_per_s:,.0f} / {c.theirs.requests_per_s:,.0f}; per pair of runs"
        f" {', '.join(_times(r) for r in c.per_run)}); of bare: tfpool {c.ours.ratio:.3f},"
        f" {PEER} {c.theirs.ratio:.3f}"
        + (
            f"; the calls alone (no Redis, no model) reach {c.ours.floor_requests_per_s:,.0f}"
            f" req/s: {_times(c.ours.floor_requests_per_s / c.theirs.requests_per_s)} {PEER}"
            if c.ours.floor_requests_per_s and c.theirs.requests_per_s
            else ""
        )
        for c in comparisons
    ]
    return "\n".join([table, "", *lines])


def ratio(ours: Figures, theirs: Figures) -> float | None:
    """tfpool's req/s over service-streamer's (None when service-streamer answered none)."""
    return ours.requests_per_s / theirs.requests_per_s if theirs.requests_per_s else None


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def to_json(comparisons: Sequence[Comparison]) -> str:
    return json.dumps(
        [
            {
                "model": c.ours.model,
                "tfpool": asdict(c.ours),
                PEER: asdict(c.theirs),
                "tfpool_over_peer": ratio(c.ours, c.theirs),
                "tfpool_over_peer_per_run": c.per_run,
            }
            for c in comparisons
        ],
        indent=2,
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
