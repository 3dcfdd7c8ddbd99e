"""Dataset formats for offline scoring: array files and image folders
(:mod:`queueing.datasets.arrays`), Parquet, CSV, JSON Lines and TFRecord sources and
sinks (one module per family), the registry of formats (:mod:`queueing.datasets.formats`),
and the engine that scores a source into a sink (:mod:`queueing.datasets.engine`).

Everything but the registry needs pyarrow: ``pip install tfpool[datasets]``.
"""

from queueing.datasets.formats import FORMATS, Format, format_of, supported

__all__ = ["FORMATS", "Format", "format_of", "supported"]
