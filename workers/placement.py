"""Where workers run: one per GPU (or several), else N on the CPU with TensorFlow's thread
pools sized so that the workers together do not oversubscribe the cores. Never imports
TensorFlow: the supervisor decides this before any worker starts."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from workers.config import AUTO, PoolConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Slot:
    """One worker process to run: its index, its GPU (None: CPU) and its thread pools."""

    index: int
    device: str | None
    intra_op_threads: int
    inter_op_threads: int


def detect_gpus() -> list[str]:
    """GPU indices from ``nvidia-smi -L`` (no TensorFlow, no CUDA context); [] if none."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        listing = subprocess.run(
            [binary, "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("nvidia-smi -L failed (%s); using the CPU", e)
        return []
    return re.findall(r"^GPU (\d+):", listing, flags=re.MULTILINE)


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_cpu_workers(cores: int) -> int:
    """One worker per 4 cores, at least one: a TensorFlow worker uses several cores well
    (intra-op parallelism), and every extra process costs a model's memory."""
    return max(1, cores // 4)


def plan(
    config: PoolConfig, *, gpus: list[str] | None = None, cores: int | None = None
) -> list[Slot]:
    """The workers to start. ``gpus``: the devices (default: ``config.devices``, else
    detected). With GPUs, ``workers_per_device`` per GPU unless ``workers`` says how many in
    all (spread over the GPUs in turn). On the CPU, ``workers`` of them, else one per 4
    cores; with ``workers = "auto"`` that is the default that measuring the layouts at
    start (:mod:`workers.probe`) replaces, unless ``intra_op_threads`` is set: then as
    many workers with that many threads as fill the cores."""
    cores = cores or cpu_count()
    devices = list(config.devices) if config.devices else (detect_gpus() if gpus is None else gpus)
    if devices:
        total = config.fixed_workers or len(devices) * config.workers_per_device
        intra = config.intra_op_threads or max(1, cores // total)
        inter = config.inter_op_threads  # 0: TensorFlow's default, which suits GPUs
        return [Slot(i, devices[i % len(devices)], intra, inter) for i in range(total)]
    if config.workers == AUTO and config.intra_op_threads:  # the cores, in such workers
        total = max(1, cores // config.intra_op_threads)
    else:
        total = config.fixed_workers or default_cpu_workers(cores)
    intra = config.intra_op_threads or max(1, cores // total)
    inter = config.inter_op_threads or 1
    return [Slot(i, None, intra, inter) for i in range(total)]


def describe_slots(slots: list[Slot]) -> str:
    """E.g. ``no GPU found: 2 CPU workers`` or ``GPUs 0, 1: 2 workers``."""
    plural = "" if len(slots) == 1 else "s"
    devices = sorted({s.device for s in slots if s.device is not None})
    if not devices:
        return f"no GPU found: {len(slots)} CPU worker{plural}"
    return f"GPU{'s' if len(devices) > 1 else ''} {', '.join(devices)}: {len(slots)} worker{plural}"
