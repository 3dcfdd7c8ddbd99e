"""Pool configuration: one typed, validated object, from a TOML file, the environment
(``TFPOOL_<OPTION>``) and the command line, each overriding the one before."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from queueing.connection import as_cluster_url, is_cluster
from queueing.wire import Limits
from workers.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "TFPOOL_"

#: ``workers = "auto"``: on GPUs one worker per GPU; on the CPU the layout (processes x
#: intra-op threads) measured fastest at start (see :mod:`workers.probe`).
AUTO = "auto"

#: Options that name files: relative paths in a config file are taken from its folder.
PATH_OPTIONS = ("model", "model_repo", "labels_file")

#: Options that apply to the pool as a whole: a repository model's own table may not set
#: them.
POOL_ONLY_OPTIONS = frozenset({
    "model", "model_repo", "models", "name", "redis_url", "workers", "devices",
    "workers_per_device", "intra_op_threads", "inter_op_threads", "heartbeat_s",
    "memory_limit_mb", "preload", "allow_evicting_redis", "log_level", "poll_s", "cluster",
    "metrics_port", "metrics_host", "metrics", "trace_exporter",
})  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """Everything a supervisor and its workers need. See ``configs/example.toml``."""

    #: Model to serve: a SavedModel directory, a Keras ``.keras`` / ``.h5`` file, a TF1
    #: frozen graph ``.pb``, or ``package.module:function`` building a Keras model or a
    #: tf.Module (restored from ``checkpoint``). See the README's "Models".
    model: str = ""
    #: A model repository instead of ``model``: ``DIR/<name>/<version>/`` as TF Serving
    #: lays it out; every model in it is served by every worker (README: "Model repository").
    model_repo: str = ""
    #: Per-model settings of a repository's models: ``[models.NAME]`` tables of pool options
    #: (max_batch_size, max_latency_ms, buckets, signature, preprocess, postprocess,
    #: max_queue, version_policy, labels, ...); the top level gives the defaults.
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Which versions to serve: "latest" (the newest), "latest:N", "all", "specific:3,4".
    version_policy: str = "latest"
    #: Version labels, e.g. {stable = 3, canary = 4}: producers send to "name@canary"; the
    #: default version is "stable" if set, else the newest served.
    labels: dict[str, str] = field(default_factory=dict)
    #: Seconds between two scans of the repository for new and removed versions.
    poll_s: float = 5.0
    #: Name producers use for the model (default: the file or directory name, no suffix).
    name: str = ""
    #: SavedModel signature to serve.
    signature: str = "serving_default"
    #: For a builder: a tf.train.Checkpoint folder (its latest), a ``ckpt-N`` prefix, or a
    #: Keras ``.weights.h5`` file. Restored as ``tf.train.Checkpoint(model=...)``.
    checkpoint: str = ""
    #: For a builder whose model does not know its inputs: name -> "float32 [*, 4]".
    input_signature: dict[str, str] = field(default_factory=dict)
    #: For a frozen graph: request input name -> tensor name ("x" = "x:0").
    graph_inputs: dict[str, str] = field(default_factory=dict)
    #: For a frozen graph: result output name -> tensor name ("probs" = "probs:0").
    graph_outputs: dict[str, str] = field(default_factory=dict)
    #: "on": requests share batches (the model's rows must be independent: checked at
    #: load). "off": one request per model call, for a model that mixes rows.
    batching: str = "on"
    #: Lossless input conversions: str items UTF-8 encoded for a string input, numbers
    #: widened where numpy's can_cast(..., "safe") holds (int32 -> int64, float16 -> float32).
    convert_inputs: bool = True
    #: Redis URL. Empty: ``tfpool serve`` starts a private redis-server.
    redis_url: str = ""
    #: The Redis URL names any node of a Redis Cluster: use redis-py's cluster client (as a
    #: ``redis+cluster://`` URL does). See the README's "Scaling past one Redis".
    cluster: bool = False
    #: Worker processes: "auto" (one per GPU times ``workers_per_device``; without GPUs, the
    #: layout of processes x intra-op threads measured fastest at start), or a number (0:
    #: one per GPU, else one per 4 cores, without measuring).
    workers: int | str = AUTO
    #: GPU ids to use (e.g. ``["0", "1"]``). Empty: detected with nvidia-smi; none -> CPU.
    devices: list[str] = field(default_factory=list)
    #: Workers per GPU.
    workers_per_device: int = 1
    #: Most rows in one batch.
    max_batch_size: int = 32
    #: Longest a request waits for company, from its arrival in the queue.
    max_latency_ms: float = 5.0
    #: Batch sizes to pad to and warm up (empty: powers of two up to max_batch_size).
    buckets: list[int] = field(default_factory=list)
    #: Most requests waiting in a model's queue before producers get QueueFull (0: no cap).
    max_queue: int = 100_000
    #: Streams the model's queue is split into, each under its own hash tag: on a Redis
    #: Cluster, spread over the masters (README: "Scaling to several hosts"). Each holds
    #: up to max_queue requests.
    shards: int = 1
    #: How long results stay in Redis for a producer that has not read them.
    result_ttl_s: int = 3600
    #: TensorFlow intra-op threads per worker (0: the cores divided among CPU workers).
    intra_op_threads: int = 0
    #: TensorFlow inter-op threads per worker (0: 1 for CPU workers, TF's default on GPU).
    inter_op_threads: int = 0
    #: Largest request body accepted, in bytes.
    max_payload_bytes: int = 64 * 2**20
    #: Highest array rank accepted.
    max_rank: int = 8
    #: Most elements in one array.
    max_elements: int = 2**26
    #: Most rows in one request.
    max_rows: int = 65536
    #: Seconds between worker heartbeats (the heartbeat lives three times as long).
    heartbeat_s: float = 2.0
    #: A request another worker holds this long without progress is reclaimed.
    claim_idle_ms: int = 30_000
    #: Runs of a request that killed their worker before it is dead-lettered.
    max_deliveries: int = 3
    #: Recycle a worker whose RSS passes this many MiB (0: never).
    memory_limit_mb: int = 0
    #: Python modules each worker imports before loading the model (custom layers, ops).
    preload: list[str] = field(default_factory=list)
    #: Processing before inference: "" (none) or "image" (the image input takes encoded
    #: images or uint8 pixels of any size; decoded, resized, scaled and cast in the worker).
    preprocess: str = ""
    #: The input that takes images (default: the model's only input with rows of rank 3).
    image_input: str = ""
    #: Resize images to [height, width] (default: the model input's own height and width).
    image_size: list[int] = field(default_factory=list)
    #: tf.image.resize method: bilinear, nearest, bicubic, area, lanczos3, ...
    image_resize: str = "bilinear"
    #: Pixels (0..255) become pixel * image_scale + image_offset ...
    image_scale: float = 1.0
    image_offset: float = 0.0
    #: ... then (x - mean) / std, per channel (one value: every channel; empty: skipped).
    image_mean: list[float] = field(default_factory=list)
    image_std: list[float] = field(default_factory=list)
    #: Largest image accepted, in pixels (decompression bombs are refused before decoding).
    max_image_pixels: int = 40_000_000
    #: Processing after inference: "" (none), "argmax", "top_k" or "detections".
    postprocess: str = ""
    #: Classes top_k returns per row.
    top_k: int = 5
    #: File with one class label per line, naming the classes argmax / top_k find (for
    #: detections: line 1 names class 1, as in the Object Detection API's label maps).
    labels_file: str = ""
    #: Detections scoring below this are dropped.
    min_score: float = 0.0
    #: Detection boxes as "normalized" [0, 1] coordinates or "pixels" of the input image.
    box_units: str = "normalized"
    #: The output argmax / top_k reads (default: the model's only output).
    postprocess_output: str = ""
    #: Serve even on a Redis whose maxmemory-policy is not noeviction (it may delete queued
    #: and pending requests without an error when it fills). Logged loudly at start.
    allow_evicting_redis: bool = False
    #: Port of the supervisor's HTTP endpoint (/metrics, /healthz, /readyz). -1: none;
    #: 0: a free port, logged.
    metrics_port: int = -1
    #: Address the endpoint listens on.
    metrics_host: str = "0.0.0.0"
    #: Workers count requests, batches and latencies (for /metrics and ``tfpool status``).
    #: Off saves about a microsecond of CPU per request.
    metrics: bool = True
    #: OpenTelemetry spans for requests that carry their producer's trace context:
    #: "" (off), "console", "otlp" (OTEL_EXPORTER_OTLP_* settings), or "module:callable"
    #: returning a SpanExporter.
    trace_exporter: str = ""
    #: Log level of the supervisor and workers.
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.model and not self.model_repo:
            raise ConfigError(
                "model is required (a SavedModel directory or a .keras/.h5 file),"
                " or model_repo (a folder of models)"
            )
        if self.model and self.model_repo:
            raise ConfigError("give model or model_repo, not both")
        if not self.name:
            object.__setattr__(self, "name", default_name(self.model or self.model_repo))
        if self.poll_s <= 0:
            raise ConfigError(f"poll_s must be > 0, got {self.poll_s}")
        self._check_versions()
        self._check_cluster()
        positive = (
            "max_batch_size", "result_ttl_s", "max_deliveries", "workers_per_device", "max_rows",
            "top_k", "max_image_pixels", "shards",
        )  # fmt: skip
        for option in positive:
            if getattr(self, option) < 1:
                raise ConfigError(f"{option} must be >= 1, got {getattr(self, option)}")
        if self.workers != AUTO and (not isinstance(self.workers, int) or self.workers < 0):
            raise ConfigError(f"workers must be 'auto' or a number >= 0, got {self.workers!r}")
        non_negative = (
            "max_queue",
            "intra_op_threads",
            "inter_op_threads",
            "memory_limit_mb",
            "max_latency_ms",
            "claim_idle_ms",
        )
        for option in non_negative:
            if getattr(self, option) < 0:
                raise ConfigError(f"{option} must be >= 0, got {getattr(self, option)}")
        if self.metrics_port < -1 or self.metrics_port > 65535:
            raise ConfigError(f"metrics_port must be -1 (none), 0 (any) or a port, got"
                              f" {self.metrics_port}")  # fmt: skip
        if self.heartbeat_s <= 0:
            raise ConfigError(f"heartbeat_s must be > 0, got {self.heartbeat_s}")
        if self.buckets and (min(self.buckets) < 1 or max(self.buckets) < self.max_batch_size):
            raise ConfigError(
                f"buckets {self.buckets} must be >= 1 and reach max_batch_size"
                f" {self.max_batch_size}"
            )
        if any(c in self.name for c in ":{}@#"):
            raise ConfigError(
                f"model name {self.name!r} may not contain ':', '{{', '}}', '@' or '#'"
            )
        try:
            self.limits()
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self._check_processing()

    @property
    def fixed_workers(self) -> int:
        """``workers`` as a number: 0 for "auto" and for 0 (placement decides)."""
        return self.workers if isinstance(self.workers, int) else 0

    def _check_versions(self) -> None:
        from workers.repository import VersionPolicy, parse_labels

        VersionPolicy.parse(self.version_policy)
        parse_labels(self.labels)
        for name, table in self.models.items():
            if not isinstance(table, dict):
                raise ConfigError(f"[models.{name}] must be a table")
            wrong = sorted(set(table) & POOL_ONLY_OPTIONS | (set(table) - option_types().keys()))
            if wrong:
                raise ConfigError(f"[models.{name}]: options {wrong} cannot be set per model")

    def for_model(self, name: str, model: str) -> PoolConfig:
        """The settings of one model of the repository (its ``[models.NAME]`` table over the
        top level), loading ``model`` (a version's SavedModel folder or Keras file)."""
        overrides = {k: coerce(k, v) for k, v in self.models.get(name, {}).items()}
        return dataclasses.replace(
            self, model=model, model_repo="", models={}, name=name, **overrides
        )

    def _check_cluster(self) -> None:
        """``cluster`` and the URL's form agree (either turns the other on), so that the
        mode travels with the URL to every process of the pool."""
        if self.cluster and not self.redis_url:
            raise ConfigError("cluster needs redis_url: a node of the Redis Cluster to join")
        if self.redis_url:
            try:
                url = as_cluster_url(self.redis_url, self.cluster or None)
            except ValueError as e:
                raise ConfigError(str(e)) from e
            object.__setattr__(self, "redis_url", url)
            object.__setattr__(self, "cluster", is_cluster(url))

    def _check_processing(self) -> None:
        if self.preprocess not in ("", "image"):
            raise ConfigError(f"preprocess must be '' or 'image', got {self.preprocess!r}")
        if self.postprocess not in ("", "argmax", "top_k", "detections"):
            raise ConfigError(
                "postprocess must be '', 'argmax', 'top_k' or 'detections',"
                f" got {self.postprocess!r}"
            )
        if self.batching not in ("on", "off"):
            raise ConfigError(f"batching must be 'on' or 'off', got {self.batching!r}")
        if self.box_units not in ("normalized", "pixels"):
            raise ConfigError(f"box_units must be 'normalized' or 'pixels', got {self.box_units!r}")
        if self.image_size and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ConfigError(f"image_size must be [height, width], got {self.image_size}")
        if any(s == 0 for s in self.image_std):
            raise ConfigError(f"image_std may not contain 0, got {self.image_std}")
        if self.labels_file and not os.path.isfile(self.labels_file):
            raise ConfigError(f"labels_file {self.labels_file} is not a file")

    def limits(self) -> Limits:
        """The decode limits workers apply to requests."""
        return Limits(
            max_payload_bytes=self.max_payload_bytes,
            max_rank=self.max_rank,
            max_elements=self.max_elements,
        )

    @classmethod
    def load(
        cls,
        *,
        config_file: str | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> PoolConfig:
        """Build from a TOML file, then ``TFPOOL_*`` variables, then ``overrides`` (the
        command line; ``None`` values are skipped)."""
        values: dict[str, Any] = {}
        if config_file:
            values.update(read_toml(config_file))
        values.update(from_env(os.environ if env is None else env))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        unknown = sorted(values.keys() - option_types().keys())
        if unknown:
            raise ConfigError(f"unknown options: {unknown}")
        try:
            return cls(**{k: coerce(k, v) for k, v in values.items()})
        except TypeError as e:
            raise ConfigError(str(e)) from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_name(model_path: str) -> str:
    """``/models/resnet50.keras`` -> ``resnet50``; ``/models/resnet/`` -> ``resnet``;
    ``mypkg.models:build_model`` -> ``build_model``."""
    if ":" in model_path and not os.path.exists(model_path):
        return model_path.rsplit(":", 1)[1]
    base = Path(model_path.rstrip("/")).name
    for suffix in (".keras", ".h5", ".hdf5", ".pb"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def option_types() -> dict[str, Any]:
    """Each option's declared type."""
    hints = typing.get_type_hints(PoolConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(PoolConfig)}


def read_toml(path: str) -> dict[str, Any]:
    """Options from a TOML file: top-level keys, or the ``[pool]`` table. Relative paths
    (``PATH_OPTIONS``) are taken from the file's folder, as they read, rather than from
    wherever the command runs."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    table = data.get("pool", data)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [pool] must be a table")
    folder = Path(path).resolve().parent
    options = dict(table)
    if table is not data and "models" in data:  # [models.NAME] beside [pool]
        options.setdefault("models", data["models"])
    for option in PATH_OPTIONS:
        value = options.get(option)
        if isinstance(value, str) and value and not os.path.isabs(value):
            options[option] = str(folder / value)
    return options


def from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Options set as ``TFPOOL_<OPTION>`` (upper case) in ``env``."""
    return {
        name: env[ENV_PREFIX + name.upper()]
        for name in option_types()
        if ENV_PREFIX + name.upper() in env
    }


def coerce(option: str, value: Any) -> Any:
    """``value`` (from TOML, the environment or argparse) as the option's type."""
    kind = option_types()[option]
    try:
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind is str and isinstance(value, list):  # version_policy = [3, 4]
            return "specific:" + ",".join(str(v) for v in value)
        if kind == int | str:  # workers: a number, or a word ("auto") checked when built
            if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
                return value.strip().lower()
            kind = int
        if kind in (int, float, str):
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value} is not a whole number")
            return kind(value)
        if typing.get_origin(kind) is dict:
            if isinstance(value, str):  # from the environment or the command line
                value = json.loads(value) if value.strip() else {}
            if not isinstance(value, dict):
                raise ValueError("not a table")
            if typing.get_args(kind)[1] is not str:  # tables of tables ([models.NAME])
                return {str(k): v for k, v in value.items()}
            return {str(k): str(v) for k, v in value.items()}
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            return [item(v) for v in value]
    except (TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"option {option}: {value!r} is not a valid {_name(kind)}") from e
    raise ConfigError(f"option {option}: unsupported type {kind}")  # pragma: no cover


def _name(kind: Any) -> str:
    if isinstance(kind, (type, types.GenericAlias)):
        return str(kind) if isinstance(kind, types.GenericAlias) else kind.__name__
    return str(kind)
