"""From stream entries to requests in hand, or to their answers: decode, check, pre-process,
fit to the model's inputs; and, for entries taken over from dead workers, which go to the
dead-letter stream. No Redis here: the reader does the I/O and hands entries in.

A request that cannot be decoded or does not fit the model is answered with an error now
and never reaches a batch; an entry whose request id cannot be read is dead-lettered.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from queueing import keys, wire
from queueing.errors import DeadlineExceeded, InvalidInput, ModelError, RequestError
from workers.messages import Answer, AnswerMaker, Entry, InHand, Received
from workers.shared import StreamClock
from workers.spec import InputFitter, TensorSpec

if TYPE_CHECKING:
    from workers.preprocess import ImagePreprocessor

log = logging.getLogger(__name__)

#: A request delivered more than this many times max_deliveries is set aside even when
#: none of its runs was under way as its workers died: a safety net, for workers that
#: keep dying of causes other than their requests.
SAFETY_DELIVERIES = 10


class Intake:
    """Turns the entries of one read into requests for the batcher and answers for the
    writer. Used by the reader thread only."""

    def __init__(
        self,
        *,
        model_name: str,
        inputs: Sequence[TensorSpec],
        limits: wire.Limits,
        max_rows: int,
        clock: StreamClock,
        answers: AnswerMaker,
        preprocess: ImagePreprocessor | None = None,
        convert: bool = True,
        alone: bool = False,
    ) -> None:
        self.model_name = model_name
        self.limits = limits
        self.max_rows = max_rows
        self.clock = clock
        self.answers = answers
        self.preprocess = preprocess
        self._single_input = len(inputs) == 1
        self._fit = InputFitter(inputs, convert=convert)
        # batching = "off": every request is a group of its own (a batch of one request).
        self._alone = alone

    def admit(self, entries: list[Entry], *, suspect: bool) -> tuple[list[InHand], list[Answer]]:
        """The requests to batch, and the answers of those that cannot run. ``suspect``:
        taken over from a worker that died, perhaps because of one of them; each then runs
        in a batch of its own, so a request that kills its worker cannot take its
        batch-mates to the dead-letter stream with it."""
        received, refused = self.receive_all(entries)
        accepted, unfit = self.admit_received(received, suspect=suspect)
        return accepted, refused + unfit

    def receive_all(self, entries: list[Entry]) -> tuple[list[Received], list[Answer]]:
        """:meth:`receive` for each entry: the requests decoded, the answers of the rest."""
        received: list[Received] = []
        refused: list[Answer] = []
        for entry_id, fields in entries:
            outcome = self.receive(entry_id, fields)
            if isinstance(outcome, Received):
                received.append(outcome)
            else:
                refused.append(outcome)
        return received, refused

    def admit_received(
        self, received: list[Received], *, suspect: bool
    ) -> tuple[list[InHand], list[Answer]]:
        """Decoded requests, pre-processed and fitted to the model: those to batch, and
        the answers of those that do not fit."""
        refused: list[Answer] = []
        if self.preprocess is not None and received:
            self._preprocess(received)
        accepted: list[InHand] = []
        for r in received:
            try:
                accepted.append(self.fit(r, suspect=suspect))
            except RequestError as e:
                refused.append(self.answers.refusal(r.entry_id, r.request_id, r.reply,
                                                    r.body.keep_s, e))  # fmt: skip
        return accepted, refused

    def receive(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Received | Answer:
        """Decode an entry's header and body; an answer when it cannot be served."""
        request_id, reply = read_header(fields)
        if not request_id:
            return self.answers.dead_letter(entry_id, fields, "unreadable request id",
                                            request_id=None, reply="")  # fmt: skip
        keep_s = 0
        try:
            body = wire.decode_request_body(fields.get(keys.FIELD_BODY), self.limits)
            keep_s = body.keep_s
            if keys.split_address(body.model)[0] != self.model_name:
                raise InvalidInput(
                    f"request for model {body.model!r} on the queue of {self.model_name!r}"
                )
        except InvalidInput as e:
            return self.answers.refusal(entry_id, request_id, reply, keep_s, e)
        return Received(entry_id, request_id, reply, body, body.inputs)

    def fit(self, r: Received, *, suspect: bool) -> InHand:
        """The request, fitted to the model, for the batcher. Raises its RequestError."""
        if r.error is not None:
            raise r.error
        fitted = self._fit(r.inputs)
        if fitted.rows > self.max_rows:
            raise InvalidInput(
                f"{fitted.rows} rows is over the limit of {self.max_rows} per request"
            )
        arrival = self.clock.arrival(r.entry_id)
        deadline_ms = r.body.deadline_ms
        return InHand(
            entry_id=r.entry_id,
            request_id=r.request_id,
            reply=r.reply,
            keep_s=r.body.keep_s,
            arrays=fitted.arrays,
            rows=fitted.rows,
            unbatched=fitted.unbatched,
            group=("alone", r.entry_id) if suspect or self._alone else fitted.group,
            suspect=suspect,
            arrival=arrival,
            deadline=None if deadline_ms is None else arrival + deadline_ms / 1000,
            traceparent=r.body.traceparent,
        )

    def dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> Answer:
        """The answer of an entry taken over and set aside (see :func:`triage`)."""
        request_id, reply = read_header(fields)
        keep_s = 0
        with contextlib.suppress(InvalidInput):  # only to honour keep; the body may be bad
            keep_s = wire.decode_request_body(fields.get(keys.FIELD_BODY), self.limits).keep_s
        return self.answers.dead_letter(entry_id, fields, reason, request_id=request_id,
                                        reply=reply, keep_s=keep_s, suspect=True)  # fmt: skip

    def _preprocess(self, received: list[Received]) -> None:
        """Images -> the model's image input, for all of one read's requests at once. A
        request whose images fail keeps its inputs and gets the error when it is fitted."""
        assert self.preprocess is not None
        name = self.preprocess.name
        # A lone array is the image when the model has one input; without the image the
        # fitter says what is missing.
        chosen = [
            r
            for r in received
            if (name in r.inputs if isinstance(r.inputs, dict) else self._single_input)
        ]
        values = [r.inputs if isinstance(r.inputs, np.ndarray) else r.inputs[name] for r in chosen]
        try:
            results: list[np.ndarray | RequestError] = list(self.preprocess.run(values))
        except Exception as e:  # a fault of ours, not of the images: never the reader's end
            log.exception("pre-processing failed on %d requests", len(chosen))
            results = [ModelError(f"pre-processing failed: {e}") for _ in chosen]
        for r, result in zip(chosen, results, strict=True):
            if isinstance(result, RequestError):
                r.error = result
            elif isinstance(r.inputs, np.ndarray):
                r.inputs = result
            else:
                r.inputs = {**r.inputs, name: result}


def triage(
    entries: list[Entry], deliveries: list[int], fatal_runs: list[int], *, max_deliveries: int
) -> tuple[list[Entry], list[tuple[Entry, str]]]:
    """Entries taken over from dead workers: those to batch again, and those to set aside
    with the reason why. ``deliveries`` and ``fatal_runs`` are per entry, as
    :meth:`Claims.delivery_counts` and :meth:`Claims.fatal_runs` count them."""
    fresh: list[Entry] = []
    dead: list[tuple[Entry, str]] = []
    limit = max_deliveries
    for entry, count, fatal in zip(entries, deliveries, fatal_runs, strict=True):
        if fatal >= limit:
            reason = (
                f"delivered {count} times; {fatal} runs of it killed their worker"
                f" (max_deliveries={limit})"
            )
        elif count > SAFETY_DELIVERIES * limit:
            reason = f"delivered {count} times without an answer (max_deliveries={limit})"
        else:
            fresh.append(entry)
            continue
        dead.append((entry, reason))
    return fresh, dead


def plan_takeover(
    entry_ids: list[bytes], recorded: list[int], known_fatal: set[bytes] | None
) -> tuple[list[int], list[bool], list[bytes]]:
    """For entries just taken over from dead workers: how many runs of each killed a worker
    (for :func:`triage`), whether each runs alone, and the entries whose fatal run is to be
    recorded now. ``recorded``: runs in the attempts hash (:meth:`Claims.recorded_runs`);
    ``known_fatal``: the entries of the batches the dead workers were running, when their
    supervisor knew (:mod:`workers.running`); None when nobody knows (a whole pool or host
    died, or a worker took them over by idle time), and then every entry may have been in it.

    An entry that may have been in the fatal batch and has no recorded run ran *in* that
    batch (a suspect's runs are recorded before they start): that run is recorded now, and
    the entry runs alone from here on, each run recorded. An entry the dead worker only held,
    waiting, batches as a new one.
    """
    fatal: list[int] = []
    alone: list[bool] = []
    record: list[bytes] = []
    for entry_id, runs in zip(entry_ids, recorded, strict=True):
        in_fatal_batch = known_fatal is None or entry_id in known_fatal
        if in_fatal_batch and runs == 0:
            record.append(entry_id)
            runs = 1
        fatal.append(runs)
        alone.append(runs > 0)
    return fatal, alone, record


def read_header(fields: dict[bytes, bytes]) -> tuple[str | None, str]:
    """The request id (None if unreadable) and reply stream of a stream entry."""
    try:
        raw_id = fields.get(keys.FIELD_ID)
        request_id = raw_id.decode() if isinstance(raw_id, bytes) else None
        reply = fields.get(keys.FIELD_REPLY, b"").decode()
    except UnicodeDecodeError:
        return None, ""
    return request_id, reply


def deadline_error(request: InHand, now: float | None = None) -> DeadlineExceeded:
    """The error of a request whose deadline passed before it ran."""
    waited_ms = ((time.monotonic() if now is None else now) - request.arrival) * 1000
    return DeadlineExceeded(
        f"deadline passed before the request ran ({waited_ms:.0f} ms after it was queued)",
        request_id=request.request_id,
    )
