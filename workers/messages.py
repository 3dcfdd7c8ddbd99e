"""What travels between the worker's threads: a request as the reader receives it, the
request in hand until it is answered, and the answer the writer posts.

Every answer is made by :class:`AnswerMaker`, which also counts it in the worker's stats:
the heartbeat's request and error counts then cover every answer, wherever it was made.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from queueing import wire
from queueing.errors import DeadLettered, RequestError

#: A stream entry as XREADGROUP and XCLAIM return it (bytes: responses are not decoded).
Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass(slots=True)
class Received:
    """A stream entry whose body decoded, on its way to being fitted to the model."""

    entry_id: bytes
    request_id: str
    reply: str
    body: wire.RequestBody
    inputs: wire.Inputs  # the body's, or what pre-processing made of them
    error: RequestError | None = None  # pre-processing failed: answered when fitted


@dataclass(eq=False, slots=True)
class InHand:
    """A request fitted to the model, in the batcher or the model, until its answer.

    A request larger than a batch runs in several; each run adds one chunk of its outputs.
    """

    entry_id: bytes
    request_id: str
    reply: str
    keep_s: int
    arrays: dict[str, np.ndarray]
    rows: int
    unbatched: bool
    group: Hashable
    arrival: float  # on time.monotonic()'s clock
    deadline: float | None
    traceparent: str | None = None  # the producer's trace context (workers.tracing)
    suspect: bool = False  # taken over from a worker that died: runs alone, attempts counted
    #: The model version it was routed to (None: a pool of one unversioned model).
    version: int | None = None
    #: (first row, outputs of the rows from there), one per run, in the order they ran.
    output_chunks: list[tuple[int, dict[str, np.ndarray]]] = field(default_factory=list)
    rows_done: int = 0
    error: RequestError | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """What the writer posts for one stream entry: a result for the request's reply stream
    (and its kept key) when its id can be read, and a copy on the dead-letter stream when
    ``dead_reason`` is set. Made by :class:`AnswerMaker` only."""

    entry_id: bytes
    request_id: str | None
    reply: str
    keep_s: int
    outputs: wire.Outputs | None = None
    error: RequestError | None = None
    dead_reason: str | None = None
    dead_fields: dict[bytes, bytes] | None = None
    suspect: bool = False  # clear its attempt count once answered
    version: int | None = None  # the model version that made ``outputs``


@dataclass
class WorkerStats:
    """Counts the heartbeat publishes. ``batches``, ``rows`` and ``model_s`` are written by
    the main thread only; ``requests`` and ``errors`` by every thread that makes answers,
    under ``lock``. The heartbeat reads them without the lock: a count one answer stale is
    fine there."""

    batches: int = 0
    requests: int = 0  # answered, results and errors alike
    rows: int = 0
    errors: int = 0
    model_s: float = 0.0  # time in the model (and post-processing), summed over batches
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class AnswerMaker:
    """The one way answers are made: each is counted in ``stats`` as it is made."""

    def __init__(self, stats: WorkerStats) -> None:
        self.stats = stats

    def result(self, request: InHand, outputs: wire.Outputs) -> Answer:
        """The outputs of a request that ran."""
        answer = Answer(request.entry_id, request.request_id, request.reply, request.keep_s,
                        outputs=outputs, suspect=request.suspect,
                        version=request.version)  # fmt: skip
        return self._count(answer)

    def error(self, request: InHand, error: RequestError) -> Answer:
        """The error of a request in hand (it failed in the model, or expired)."""
        return self.refusal(request.entry_id, request.request_id, request.reply, request.keep_s,
                            error, suspect=request.suspect)  # fmt: skip

    def refusal(
        self,
        entry_id: bytes,
        request_id: str,
        reply: str,
        keep_s: int,
        error: RequestError,
        *,
        suspect: bool = False,
    ) -> Answer:
        """The error of a request that never reached the model (or failed in it)."""
        error.request_id = request_id
        answer = Answer(entry_id, request_id, reply, keep_s, error=error, suspect=suspect)
        return self._count(answer)

    def dead_letter(
        self,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        reason: str,
        *,
        request_id: str | None,
        reply: str,
        keep_s: int = 0,
        suspect: bool = False,
    ) -> Answer:
        """A copy of the entry for the dead-letter stream, and an error for its producer
        when its id can be read."""
        error = None
        if request_id is not None:
            error = DeadLettered(f"request set aside: {reason}", request_id=request_id)
        answer = Answer(entry_id, request_id, reply, keep_s, error=error, dead_reason=reason,
                        dead_fields=fields, suspect=suspect)  # fmt: skip
        return self._count(answer)

    def _count(self, answer: Answer) -> Answer:
        with self.stats.lock:
            self.stats.requests += 1
            if answer.outputs is None:
                self.stats.errors += 1
        return answer
