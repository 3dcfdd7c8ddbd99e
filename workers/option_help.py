"""What each pool option does, in one line, for ``tfpool serve --help``. The defaults are
appended from :class:`PoolConfig` itself, so that the help cannot drift from the code.
``configs/example.toml`` says the same at more length."""

from __future__ import annotations

import dataclasses
from typing import Any

from workers.config import PoolConfig

OPTION_HELP: dict[str, str] = {
    "checkpoint": "checkpoint to restore into a `module:callable` model: a folder (its"
    " latest), a ckpt-N prefix, or a .weights.h5 file",
    "input_signature": "input specs for a builder's model that has none, as a JSON object"
    ' of name -> "dtype [*, dims]"',
    "graph_inputs": "frozen graph (.pb): request input names -> tensor names",
    "graph_outputs": "frozen graph (.pb): result output names -> tensor names",
    "batching": "on, or off to run each request in its own call (for a model that mixes"
    " the rows of a batch)",
    "convert_inputs": "convert inputs where nothing is lost (int32 -> int64, float16 ->"
    " float32, str -> UTF-8 bytes)",
    "min_score": "postprocess detections: drop detections scoring below this",
    "box_units": "postprocess detections: boxes as 'normalized' coordinates or 'pixels'",
    "allow_evicting_redis": "serve even if Redis's maxmemory-policy may evict queued requests"
    " (loudly)",
    "model": "SavedModel directory, or .keras / .h5 file (required)",
    "name": "name producers use",
    "model_repo": "a model repository DIR/<name>/<version>/ instead of --model",
    "models": "per-model settings of the repository's models (name -> options)",
    "version_policy": "versions to serve: latest, latest:N, all, specific:3,4",
    "labels": 'version labels, e.g. {"stable": 3, "canary": 4}',
    "poll_s": "seconds between scans of the model repository",
    "signature": "SavedModel signature to serve",
    "redis_url": "Redis URL: redis://, rediss:// or unix:// (also TFPOOL_REDIS_URL)",
    "cluster": "the Redis URL names a node of a Redis Cluster (also TFPOOL_CLUSTER, or a"
    " redis+cluster:// URL)",
    "workers": "worker processes: auto (one per GPU; on the CPU the layout of processes x"
    " intra-op threads measured fastest at start) or a number (0: one per GPU, else one per 4"
    " cores, not measured)",
    "devices": "GPU ids to use, e.g. 0,1",
    "workers_per_device": "worker processes per GPU",
    "max_batch_size": "most rows in a batch",
    "max_latency_ms": "longest a request waits for company, counted from its arrival",
    "buckets": "batch sizes padded to and warmed up before serving",
    "max_queue": "requests waiting before producers get QueueFull (0: no cap)",
    "shards": "streams the model's queue is split into (spread over a cluster's masters)",
    "result_ttl_s": "seconds a result stays in Redis for a producer that has not read it",
    "intra_op_threads": "TensorFlow intra-op threads per worker",
    "inter_op_threads": "TensorFlow inter-op threads per worker",
    "max_payload_bytes": "largest request body accepted, in bytes",
    "max_rank": "highest array rank accepted",
    "max_elements": "most elements in one array",
    "max_rows": "most rows in one request",
    "heartbeat_s": "seconds between worker heartbeats (a heartbeat lives 3 times as long)",
    "claim_idle_ms": "a request held this long by a silent worker is taken over",
    "max_deliveries": "runs that killed their worker before a request is dead-lettered",
    "memory_limit_mb": "recycle a worker whose resident memory passes this (0: never)",
    "preload": "Python modules each worker imports first (custom layers, ops)",
    "preprocess": "'image': the worker decodes, resizes and scales images ('': nothing)",
    "image_input": "the input that takes images",
    "image_size": "resize images to HEIGHT,WIDTH",
    "image_resize": "tf.image.resize method: bilinear, nearest, bicubic, area, lanczos3, ...",
    "image_scale": "pixels (0..255) become pixel * image_scale + image_offset",
    "image_offset": "added to pixel * image_scale",
    "image_mean": "then (x - mean) / std: the mean, one value or one per channel",
    "image_std": "then (x - mean) / std: the std, one value or one per channel",
    "max_image_pixels": "largest image accepted, in pixels (checked before decoding)",
    "postprocess": "'argmax' or 'top_k': classes instead of scores ('': the raw outputs)",
    "top_k": "classes top_k returns per row",
    "labels_file": "file of class labels, one per line, for argmax / top_k",
    "postprocess_output": "the output argmax / top_k reads",
    "metrics_port": "serve /metrics, /healthz, /readyz on this port (-1: no endpoint; 0: any"
    " free port, logged)",
    "metrics_host": "address the /metrics, /healthz, /readyz endpoint listens on",
    "metrics": "workers count requests, batches and latencies for /metrics and tfpool status"
    " (false saves about a microsecond of CPU per request)",
    "trace_exporter": "OpenTelemetry spans for traced requests: console, otlp, or"
    " module:callable returning a SpanExporter ('': off)",
    "log_level": "log level of the supervisor and workers: DEBUG, INFO, WARNING, ERROR",
}

#: What an empty default means, where it is not simply "none".
_EMPTY_DEFAULTS = {
    "name": "the model's file name",
    "models": "the top level's settings",
    "redis_url": "a private redis-server",
    "devices": "detected with nvidia-smi",
    "buckets": "1, 2, 4, ... up to max_batch_size",
    "intra_op_threads": "the cores divided among CPU workers",
    "inter_op_threads": "1 on the CPU, TensorFlow's own on a GPU",
    "image_input": "the model's only image-shaped input",
    "image_size": "the model input's own size",
    "postprocess_output": "the model's only output",
}


def help_for(option: str) -> str:
    """The ``--help`` text of ``option``: what it does, and its default."""
    if option == "model":
        return OPTION_HELP[option]
    return f"{OPTION_HELP[option]} (default: {_default(option)})"


def _default(option: str) -> str:
    if option in _EMPTY_DEFAULTS:
        return _EMPTY_DEFAULTS[option]
    field = next(f for f in dataclasses.fields(PoolConfig) if f.name == option)
    value: Any = (
        field.default_factory()
        if field.default_factory is not dataclasses.MISSING
        else field.default
    )
    if value in ("", []):
        return "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
