"""One worker process: load the model once, then batch, run and answer, until told to stop.

Three threads, so that the model never waits on Redis (TensorFlow releases the GIL):

* the reader: ``XREADGROUP`` -> decode -> check against the model's spec -> the batcher;
* the main thread: take a due batch -> pad to its bucket -> run the model -> the writer;
* the writer: encode results -> one pipeline of replies -> ``XACK`` + ``XDEL``.

A request that cannot be decoded or does not fit the model is answered with an error by
the reader and never reaches a batch. A batch the model fails on is re-run request by
request so that only the request at fault gets the error.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import queue
import re
import signal
import socket
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import psutil
import redis
from redis.typing import EncodableT, FieldT

from queueing import keys, liveness, wire
from queueing.errors import (
    DeadLettered,
    DeadlineExceeded,
    InvalidInput,
    ModelError,
    RequestError,
)
from workers.batcher import Batch, Batcher
from workers.claims import Claims
from workers.config import PoolConfig
from workers.memory import keep_large_buffers
from workers.placement import Slot
from workers.quiet import native_stderr_silenced, quiet_tensorflow_logging
from workers.spec import InputFitter, TensorSpec

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

    from workers.model import LoadedModel
    from workers.postprocess import TopK
    from workers.preprocess import ImagePreprocessor

log = logging.getLogger(__name__)

#: XREADGROUP's BLOCK: how long the reader waits for work before it looks at its flags.
READ_BLOCK_MS = 100

#: recv() size of the reader's connection (redis-py's default is 64 KiB).
READ_BUFFER_BYTES = 1 << 20

#: Entries as XREADGROUP returns them (bytes: the clients do not decode responses).
Entries = list[tuple[bytes, dict[bytes, bytes]]]

#: A request delivered this many times max_deliveries without an answer is set aside even
#: if none of its own runs was under way when its workers died (a safety net: it should not
#: happen unless workers keep dying for reasons of their own).
SAFETY_DELIVERIES = 10

#: Exit codes a worker reports to its supervisor.
EXIT_OK = 0
EXIT_LOAD_FAILED = 3
EXIT_RECYCLE = 4


@dataclass(eq=False, slots=True)
class Pending:
    """A request in this worker's hands, from its read to its answer."""

    entry_id: bytes
    request_id: str
    reply: str
    keep_s: int
    arrays: dict[str, np.ndarray]
    rows: int
    unbatched: bool
    group: Hashable
    arrival: float
    deadline: float | None
    suspect: bool = False  # taken over from a worker that died: runs alone, attempts counted
    parts: list[tuple[int, dict[str, np.ndarray]]] = field(default_factory=list)
    rows_done: int = 0
    error: RequestError | None = None


@dataclass(slots=True)
class Received:
    """A request whose body decoded, on its way to the batcher."""

    entry_id: bytes
    request_id: str
    reply: str
    body: wire.RequestBody
    inputs: wire.Inputs  # the body's, or what pre-processing made of them
    error: RequestError | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """What the writer posts for one stream entry: a result for the request's reply list
    (and its kept key) when its id can be read, and a copy on the dead-letter stream when
    ``dead_reason`` is set."""

    entry_id: bytes
    request_id: str | None
    reply: str
    keep_s: int
    outputs: wire.Outputs | None = None
    error: RequestError | None = None
    dead_reason: str | None = None
    dead_fields: dict[bytes, bytes] | None = None
    suspect: bool = False  # clear its attempt count once answered


@dataclass
class WorkerStats:
    batches: int = 0
    requests: int = 0
    rows: int = 0
    errors: int = 0
    model_s: float = 0.0  # time in the model (and post-processing), summed over batches


class Worker:
    """The worker loop. ``run()`` returns the process's exit code."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        worker_id: str,
        slot: int = 0,
        device: str | None = None,
        inherit_from: Sequence[str] = (),
        settings: Mapping[FieldT, EncodableT] | None = None,
        ready: Synchronized[int] | None = None,
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.slot = slot
        self.device = device
        self.inherit_from = list(inherit_from)
        self.settings: dict[FieldT, EncodableT] = dict(settings or {})
        self.stream = keys.stream(config.name)
        self.limits = config.limits()
        self.stats = WorkerStats()
        self._ready_flag = ready
        self._stopping = threading.Event()
        self._reader_done = threading.Event()
        self._cond = threading.Condition()
        self._answers: queue.Queue[list[Answer] | None] = queue.Queue()
        self._clock_offset = 0.0  # Redis time minus time.monotonic(), in seconds
        self.model: LoadedModel | None = None
        self._fitter: InputFitter | None = None
        self.preprocess: ImagePreprocessor | None = None
        self.postprocess: TopK | None = None
        self.output_names: list[str] = []
        self.single_output = False  # one output, sent as an array rather than a dict
        self.redis = redis.Redis.from_url(config.redis_url, socket_timeout=10)
        self.batcher: Batcher[Pending] = Batcher(
            max_rows=config.max_batch_size,
            max_latency_s=config.max_latency_ms / 1000,
            buckets=config.buckets or None,
        )
        # The reader takes at most this many rows ahead of the model: enough to fill the
        # next batch while this one runs, not so many that other workers go idle.
        self._max_rows_held = 2 * config.max_batch_size
        self.claims = Claims(
            stream=self.stream,
            consumer=worker_id,
            claim_idle_ms=config.claim_idle_ms,
            max_deliveries=config.max_deliveries,
            batch=config.max_batch_size,
        )
        # Entries read and not yet acked: renewed while held, so never taken from us.
        self._in_hand: set[bytes] = set()
        self._hand_lock = threading.Lock()
        self._parent_pid = os.getppid()
        self._started = time.time()
        self._process = psutil.Process()

    # --- the steps --------------------------------------------------------------------

    def run(self) -> int:
        """Load, warm up, register, serve until stopped, drain. Returns the exit code."""
        self.model = self._load()
        self._register()
        self._sync_clock()
        threads = [
            threading.Thread(target=self._read_loop, name="tfpool-reader", daemon=True),
            threading.Thread(target=self._write_loop, name="tfpool-writer", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="tfpool-heartbeat", daemon=True),
        ]
        for thread in threads:
            thread.start()
        self._heartbeat("ready")
        if self._ready_flag is not None:
            self._ready_flag.value = 1
        log.info(
            "worker %s ready: model %s on %s",
            self.worker_id,
            self.config.name,
            self.device or "cpu",
        )
        self._serve()
        self._answers.put(None)  # the writer flushes what it has, then exits
        threads[1].join(timeout=30)
        with contextlib.suppress(redis.RedisError):
            self.claims.release_if_idle(self.redis)
        self._heartbeat("stopped")
        log.info(
            "worker %s stopped after %d batches, %d requests",
            self.worker_id,
            self.stats.batches,
            self.stats.requests,
        )
        return EXIT_OK

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Stop reading; finish and answer what is in hand; then ``run()`` returns."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def _load(self) -> LoadedModel:
        from workers.model import load_model

        started = time.monotonic()
        model = load_model(self.config.model, signature=self.config.signature)
        model.warm_up(self.batcher.buckets)
        self.output_names = model.output_names
        if self.config.preprocess == "image":
            from workers.preprocess import ImagePreprocessor

            self.preprocess = ImagePreprocessor(self.config, model.inputs)
            self.preprocess.warm_up()
        if self.config.postprocess:
            from workers.postprocess import TopK

            self.postprocess = TopK.from_config(self.config, model.output_names)
            scores = model(model.example(1))[self.postprocess.output]
            self.postprocess.check(scores.shape[-1] if scores.ndim > 1 else 0)
            self.output_names = self.postprocess.output_names
        self.single_output = len(self.output_names) == 1 and self.postprocess is None
        log.info(
            "loaded %s in %.1fs; warmed batch sizes %s",
            model.source,
            time.monotonic() - started,
            self.batcher.buckets,
        )
        return model

    @property
    def _fit(self) -> InputFitter:
        if self._fitter is None:
            assert self.model is not None
            self._fitter = InputFitter(self.model.inputs)
        return self._fitter

    def _register(self) -> None:
        """Create the stream and group if needed; publish the model's info, whose presence
        tells producers that the model is served here."""
        try:
            self.redis.xgroup_create(self.stream, keys.GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        assert self.model is not None
        inputs = [
            self.preprocess.describe()
            if self.preprocess is not None and s.name == self.preprocess.name
            else f"{s.name}: {s.describe()}"
            for s in self.model.inputs
        ]
        info: dict[FieldT, EncodableT] = {
            "max_queue": self.config.max_queue,
            "inputs": ", ".join(inputs),
            "outputs": ", ".join(self.output_names),
        }
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.model_info(self.config.name), mapping=info)
        pipe.sadd(keys.MODELS, self.config.name)
        pipe.execute()

    def _sync_clock(self) -> None:
        """Learn the offset of Redis's clock, the clock of stream entry ids, from ours."""
        before = time.monotonic()
        seconds, micros = self.redis.time()
        after = time.monotonic()
        self._clock_offset = seconds + micros / 1e6 - (before + after) / 2

    def _serve(self) -> None:
        """The main loop: wait for a due batch, run it, hand its results to the writer."""
        while True:
            batch, expired = self._next_batch()
            if expired:
                self._answers.put([self._answer_error(p, _deadline_error(p)) for p in expired])
            if batch is None:
                if self._stopping.is_set() and self._reader_done.is_set() and not self.batcher:
                    return
                continue
            answers = self._run_batch(batch)
            if not answers:
                continue
            if any(part.item.suspect for part in batch.parts):
                # Post now, not through the writer: the next batch may be the request that
                # killed the last worker, and this answer must not die with it.
                self._post(answers)
            else:
                self._answers.put(answers)

    def _next_batch(self) -> tuple[Batch[Pending] | None, list[Pending]]:
        with self._cond:
            expired = self.batcher.pop_expired()
            if self._stopping.is_set() and self._reader_done.is_set():
                self.batcher.drained = True  # nothing more is coming: run what is here
            batch = self.batcher.next_batch()
            if batch is None and not expired:
                due = self.batcher.next_due()
                timeout = 0.1 if due is None else min(0.1, max(0.0, due - time.monotonic()))
                self._cond.wait(timeout)
            else:
                self._cond.notify_all()  # room for the reader
            return batch, expired

    def _run_batch(self, batch: Batch[Pending]) -> list[Answer]:
        """Run one batch; return the answers of the requests it completed."""
        assert self.model is not None
        suspects = [part.item.entry_id for part in batch.parts if part.item.suspect]
        if suspects:
            # Count this run before it starts: if it kills us, the count says so.
            pipe = self.redis.pipeline(transaction=False)
            for entry_id in suspects:
                pipe.hincrby(keys.attempts(self.config.name), entry_id, 1)
            pipe.execute()
        try:
            self._store_outputs(batch, self._infer(_assemble(batch, self.model.inputs)))
        except Exception as e:
            log.warning("batch of %d failed (%s); running its requests one by one", batch.rows, e)
            self._run_parts_alone(batch)
        self.stats.batches += 1
        self.stats.rows += batch.rows
        answers = []
        for part in batch.parts:
            p = part.item
            if p.rows_done == p.rows:
                answers.append(self._finish(p))
        return answers

    def _infer(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model, then the post-processing, on one batch."""
        assert self.model is not None
        started = time.perf_counter()
        try:
            outputs = self.model(arrays)
            return outputs if self.postprocess is None else self.postprocess(outputs)
        finally:
            self.stats.model_s += time.perf_counter() - started

    def _store_outputs(self, batch: Batch[Pending], outputs: dict[str, np.ndarray]) -> None:
        offset = 0
        for part in batch.parts:
            rows = part.rows
            part.item.parts.append(
                (part.start, {k: v[offset : offset + rows] for k, v in outputs.items()})
            )
            part.item.rows_done += rows
            offset += rows

    def _run_parts_alone(self, batch: Batch[Pending]) -> None:
        assert self.model is not None
        for part in batch.parts:
            single = Batch(
                parts=[part], rows=part.rows, padded_rows=self.batcher.bucket_for(part.rows)
            )
            try:
                self._store_outputs(single, self._infer(_assemble(single, self.model.inputs)))
            except Exception as e:
                part.item.error = ModelError(f"model failed: {describe_model_error(e)}")
                part.item.rows_done += part.rows

    def _finish(self, p: Pending) -> Answer:
        if p.error is not None:
            return self._answer_error(p, p.error)
        p.parts.sort(key=lambda item: item[0])
        if len(p.parts) == 1:
            merged = p.parts[0][1]
        else:
            merged = {
                name: np.concatenate([chunk[name] for _, chunk in p.parts])
                for name in self.output_names
            }
        if p.unbatched:
            merged = {name: value[0] for name, value in merged.items()}
        outputs: wire.Outputs = merged[self.output_names[0]] if self.single_output else merged
        self.stats.requests += 1
        return Answer(p.entry_id, p.request_id, p.reply, p.keep_s, outputs=outputs,
                      suspect=p.suspect)  # fmt: skip

    def _answer_error(self, p: Pending, error: RequestError) -> Answer:
        self.stats.requests += 1
        self.stats.errors += 1
        return Answer(p.entry_id, p.request_id, p.reply, p.keep_s, error=error,
                      suspect=p.suspect)  # fmt: skip

    # --- reader -----------------------------------------------------------------------

    def _read_loop(self) -> None:
        """Read entries while not stopping; the rest stay in the stream for other workers."""
        # Its own connection (it blocks), held rather than checked out of a pool per call.
        conn = redis.Redis.from_url(
            self.config.redis_url,
            socket_timeout=READ_BLOCK_MS / 1000 + 10,
            single_connection_client=True,
            # A read of many image requests is megabytes: take it in large gulps.
            socket_read_size=READ_BUFFER_BYTES,
        )
        count = self.config.max_batch_size
        backoff = 0.05
        # Take over entries of dead workers this often (and the idle consumers now and then).
        claim_every = max(0.1, self.config.claim_idle_ms / 2000)
        next_claim = time.monotonic() + claim_every
        next_prune = time.monotonic() + 60
        try:
            self._take_over(conn, self.claims.inherit(conn, self.inherit_from))
            while not self._stopping.is_set():
                if not self._wait_for_room():
                    continue
                try:
                    now = time.monotonic()
                    if now >= next_claim:
                        next_claim = now + claim_every
                        self._take_over(conn, self.claims.autoclaim(conn))
                    if now >= next_prune:
                        next_prune = now + 60
                        self.claims.prune_consumers(conn)
                    reply = conn.xreadgroup(
                        keys.GROUP,
                        self.worker_id,
                        {self.stream: ">"},
                        count=count,
                        block=READ_BLOCK_MS,
                    )
                    backoff = 0.05
                except redis.ResponseError as e:
                    if "NOGROUP" not in str(e):
                        raise
                    # Redis lost our stream and group (restarted without persistence, or
                    # flushed): register again and go on reading.
                    log.warning("reader: %s; registering the model again", e)
                    self._register_quietly()
                    continue
                except redis.RedisError as e:
                    log.warning("reader: %s; retrying in %.2fs", e, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                entries = cast(Entries, cast(Any, reply)[0][1]) if reply else []
                self._accept(entries, drained=len(entries) < count)
        finally:
            conn.close()
            self._reader_done.set()
            with self._cond:
                self._cond.notify_all()

    def _take_over(self, conn: redis.Redis, entries: Entries) -> None:
        """Entries taken from dead workers: dead-letter those delivered too many times,
        batch the rest like new ones."""
        if not entries:
            return
        counts = self.claims.delivery_counts(conn, entries)
        runs = self.claims.fatal_runs(conn, keys.attempts(self.config.name), entries)
        limit = self.config.max_deliveries
        fresh: Entries = []
        dead: list[Answer] = []
        for (entry_id, fields), count, fatal in zip(entries, counts, runs, strict=True):
            if fatal >= limit:
                reason = (
                    f"delivered {count} times; {fatal} runs of it killed their worker"
                    f" (max_deliveries={limit})"
                )
            elif count > SAFETY_DELIVERIES * limit:
                reason = f"delivered {count} times without an answer (max_deliveries={limit})"
            else:
                fresh.append((entry_id, fields))
                continue
            dead.append(self._dead_letter(entry_id, fields, reason))
        if dead:
            log.error("dead-lettering %d requests: their workers kept dying", len(dead))
            with self._hand_lock:
                self._in_hand.update(a.entry_id for a in dead)
            self._answers.put(dead)
        self._accept(fresh, drained=None, suspect=True)

    def _dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> Answer:
        request_id, reply = _header(fields)
        keep_s = 0
        with contextlib.suppress(InvalidInput):  # only to honour keep; the body may be bad
            keep_s = wire.decode_request_body(fields.get(keys.FIELD_BODY), self.limits).keep_s
        error = DeadLettered(f"request set aside: {reason}", request_id=request_id)
        return Answer(entry_id, request_id, reply, keep_s, error=error, dead_reason=reason,
                      dead_fields=fields, suspect=True)  # fmt: skip

    def _wait_for_room(self) -> bool:
        with self._cond:
            if self.batcher.rows_waiting < self._max_rows_held:
                return True
            self._cond.wait(0.1)
            return False

    def _accept(self, entries: Entries, *, drained: bool | None, suspect: bool = False) -> None:
        """Decode entries into the batcher (or answer them with an error). ``drained``: what
        the read that brought them says of the queue (None: it says nothing). ``suspect``:
        they were taken over from a worker that died, perhaps because of one of them; each
        then runs in a batch of its own, so a request that kills its worker cannot take
        its batch-mates to the dead-letter stream with it."""
        with self._hand_lock:
            self._in_hand.update(entry_id for entry_id, _ in entries)
        received: list[Received] = []
        rejected: list[Answer] = []
        for entry_id, fields in entries:
            outcome = self._receive(entry_id, fields)
            if isinstance(outcome, Received):
                received.append(outcome)
            else:
                rejected.append(outcome)
        if self.preprocess is not None and received:
            self._preprocess(received)
        accepted: list[Pending] = []
        for r in received:
            try:
                accepted.append(self._pending(r, suspect=suspect))
            except RequestError as e:
                e.request_id = r.request_id
                rejected.append(Answer(r.entry_id, r.request_id, r.reply, r.body.keep_s, error=e))
        if rejected:
            self._answers.put(rejected)
        with self._cond:
            for p in accepted:
                self.batcher.add(p)
            if drained is not None:
                self.batcher.drained = drained
            self._cond.notify_all()

    def _receive(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Received | Answer:
        """Decode an entry's header and body; an answer when it cannot be served."""
        request_id, reply_key = _header(fields)
        if not request_id:
            return Answer(entry_id, None, "", 0, dead_reason="unreadable request id",
                          dead_fields=fields)  # fmt: skip
        keep_s = 0
        try:
            body = wire.decode_request_body(fields.get(keys.FIELD_BODY), self.limits)
            keep_s = body.keep_s
            if body.model != self.config.name:
                raise InvalidInput(
                    f"request for model {body.model!r} on the queue of {self.config.name!r}"
                )
        except InvalidInput as e:
            e.request_id = request_id
            return Answer(entry_id, request_id, reply_key, keep_s, error=e)
        return Received(entry_id, request_id, reply_key, body, body.inputs)

    def _preprocess(self, received: list[Received]) -> None:
        """Images -> the model's image input, for all of one read's requests at once. A
        request whose images fail keeps its inputs and gets the error when it is fitted."""
        assert self.preprocess is not None and self.model is not None
        name = self.preprocess.name
        single = len(self.model.inputs) == 1
        # A lone array is the image when the model has one input; without the image the
        # fitter says what is missing.
        chosen = [
            r for r in received if (name in r.inputs if isinstance(r.inputs, dict) else single)
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

    def _pending(self, r: Received, *, suspect: bool) -> Pending:
        """The request, fitted to the model, for the batcher. Raises its RequestError."""
        if r.error is not None:
            raise r.error
        fitted = self._fit(r.inputs)
        if fitted.rows > self.config.max_rows:
            raise InvalidInput(
                f"{fitted.rows} rows is over the limit of {self.config.max_rows} per request"
            )
        arrival = int(r.entry_id.split(b"-", 1)[0]) / 1000 - self._clock_offset
        deadline_ms = r.body.deadline_ms
        return Pending(
            entry_id=r.entry_id,
            request_id=r.request_id,
            reply=r.reply,
            keep_s=r.body.keep_s,
            arrays=fitted.arrays,
            rows=fitted.rows,
            unbatched=fitted.unbatched,
            group=("alone", r.entry_id) if suspect else fitted.group,
            suspect=suspect,
            arrival=arrival,
            deadline=None if deadline_ms is None else arrival + deadline_ms / 1000,
        )

    # --- writer -----------------------------------------------------------------------

    def _write_loop(self) -> None:
        """Post answers: replies first, then XACK + XDEL, in one pipeline per round. A crash
        between the two means a second delivery and a duplicate result, which the client
        drops by id: never a lost one."""
        conn = redis.Redis.from_url(
            self.config.redis_url, socket_timeout=10, single_connection_client=True
        )
        done = False
        while not done:
            answers = self._answers.get()
            if answers is None:
                break
            while True:  # take whatever else is ready: one round trip for all of it
                try:
                    more = self._answers.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                    break
                answers.extend(more)
            self._post(answers, conn)
        conn.close()

    def _post(self, answers: list[Answer], conn: redis.Redis | None = None) -> None:
        """Post answers on ``conn`` (the writer's own connection; default: the shared
        client, for the main thread's rare direct posts)."""
        conn = conn or self.redis
        if not answers:  # a batch that only started a split request completes nothing
            return
        payloads = [self._encode(a) for a in answers]
        replies: dict[str, list[bytes]] = {}  # one RPUSH per reply list, not per result
        for a, payload in zip(answers, payloads, strict=True):
            if a.reply and payload is not None:
                replies.setdefault(a.reply, []).append(payload)
        entry_ids = [a.entry_id for a in answers]
        for attempt in range(6):
            # A pipeline is emptied by execute(), even a failed one: fill a new one each time.
            pipe = conn.pipeline(transaction=False)
            for a, payload in zip(answers, payloads, strict=True):
                if a.dead_reason is not None:
                    fields: dict[Any, Any] = {**(a.dead_fields or {})}
                    fields.update({b"reason": a.dead_reason, b"entry": a.entry_id})
                    pipe.xadd(keys.dead_letters(self.config.name), fields)
                if payload is not None and a.keep_s:
                    kept = keys.kept_result(cast(str, a.request_id))
                    pipe.delete(kept)
                    pipe.rpush(kept, payload)
                    pipe.expire(kept, a.keep_s)
            for key, results in replies.items():
                pipe.rpush(key, *results)
                pipe.expire(key, self.config.result_ttl_s)
            suspects = [a.entry_id for a in answers if a.suspect]
            if suspects:
                pipe.hdel(keys.attempts(self.config.name), *suspects)
            pipe.xack(self.stream, keys.GROUP, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            try:
                pipe.execute()
                break
            except (redis.ConnectionError, redis.TimeoutError) as e:
                # Unposted entries stay pending, are taken over later: nothing is lost.
                log.warning("writer: %s (attempt %d)", e, attempt + 1)
                time.sleep(0.1 * 2**attempt)
            except redis.RedisError:
                # Not a passing fault: retrying the same commands cannot help.
                log.exception("writer: Redis refused a round of %d answers", len(answers))
                break
        with self._hand_lock:
            self._in_hand.difference_update(entry_ids)

    def _encode(self, a: Answer) -> bytes | None:
        if a.request_id is None:
            return None
        if a.error is not None:
            return wire.encode_error(a.request_id, a.error)
        try:
            return wire.encode_result(a.request_id, cast(wire.Outputs, a.outputs))
        except Exception as e:  # e.g. an output dtype the wire does not carry
            error = ModelError(f"cannot send the result: {e}", request_id=a.request_id)
            return wire.encode_error(a.request_id, error)

    # --- heartbeat --------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Heartbeat, renew the claims on what we hold, keep the clock offset fresh, and
        stop if the supervisor is gone (an orphan worker would serve on unsupervised)."""
        interval = min(self.config.heartbeat_s, self.config.claim_idle_ms / 3000 or 1.0)
        self._process.cpu_percent(None)  # starts the CPU measurement
        while not self._stopping.wait(interval):
            if os.getppid() != self._parent_pid:
                log.error("supervisor (pid %d) is gone; draining", self._parent_pid)
                self.stop()
                return
            try:
                with self._hand_lock:
                    held = list(self._in_hand)
                self.claims.renew(self.redis, held)
                self._heartbeat("ready")
                self._sync_clock()
                if not self.redis.exists(keys.model_info(self.config.name)):
                    log.warning("the model's registration is gone from Redis; registering again")
                    self._register()
            except redis.RedisError as e:
                log.warning("heartbeat: %s", e)

    def _register_quietly(self) -> None:
        try:
            self._register()
        except redis.RedisError as e:
            log.warning("registering: %s", e)
            self._stopping.wait(0.5)

    def _heartbeat(self, state: str) -> None:
        key = keys.worker_heartbeat(self.worker_id)
        fields: dict[FieldT, EncodableT] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slot": self.slot,
            "device": self.device or "cpu",
            "model": self.config.name,
            "state": "draining" if self._stopping.is_set() and state == "ready" else state,
            "batches": self.stats.batches,
            "requests": self.stats.requests,
            "rows": self.stats.rows,
            "errors": self.stats.errors,
            "model_s": round(self.stats.model_s, 3),
            "rss_mb": round(self._process.memory_info().rss / 2**20, 1),
            "cpu_percent": self._process.cpu_percent(None),
            "started": self._started,
            "updated": time.time(),
            **self.settings,
        }
        ttl_s = max(1, int(self.config.heartbeat_s * 3 + 0.999))
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, ttl_s)
        if fields["state"] == "ready":  # what a producer that times out is told
            redis_now = time.monotonic() + self._clock_offset
            stamp = liveness.heartbeat_fields(redis_now, ttl_s)
            pipe.hset(keys.last_alive(self.config.name), mapping=stamp)  # type: ignore[arg-type]
        pipe.execute()


def _assemble(batch: Batch[Pending], spec: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """One array per input: the batch's rows in order, zero-padded to its bucket."""
    if len(batch.parts) == 1 and batch.padded_rows == batch.rows:
        part = batch.parts[0]
        return {s.name: part.item.arrays[s.name][part.start : part.stop] for s in spec}
    arrays = {}
    for s in spec:
        first = batch.parts[0].item.arrays[s.name]
        out = np.empty((batch.padded_rows, *first.shape[1:]), dtype=first.dtype)
        offset = 0
        for part in batch.parts:
            out[offset : offset + part.rows] = part.item.arrays[s.name][part.start : part.stop]
            offset += part.rows
        # Padding repeats the last row: valid input for any model (zeros may not be, for
        # a model of strings), and its outputs are dropped.
        out[offset:] = out[offset - 1]
        arrays[s.name] = out
    return arrays


def _deadline_error(p: Pending) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"deadline passed before the request ran ({(time.monotonic() - p.arrival) * 1000:.0f} ms"
        " after it was queued)",
        request_id=p.request_id,
    )


def describe_model_error(error: BaseException) -> str:
    """One line for a model's exception. TensorFlow's messages run to a page of graph
    trace; keep their first line and the Python exception underneath, if one is named."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    summary = f"{type(error).__name__}: {lines[0] if lines else ''}"
    cause = next((line for line in reversed(lines) if _PYTHON_ERROR.match(line)), None)
    if cause is not None and cause not in summary:
        summary += f" ({cause})"
    return summary[:500]


_PYTHON_ERROR = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): \S")


def _header(fields: dict[bytes, bytes]) -> tuple[str | None, str]:
    """The request id (None if unreadable) and reply list of a stream entry."""
    try:
        raw_id = fields.get(keys.FIELD_ID)
        request_id = raw_id.decode() if isinstance(raw_id, bytes) else None
        reply = fields.get(keys.FIELD_REPLY, b"").decode()
    except UnicodeDecodeError:
        return None, ""
    return request_id, reply


def worker_main(
    config: PoolConfig, slot: Slot, inherit_from: list[str], ready: Synchronized[int]
) -> None:
    """Entry point of a spawned worker process. Sets the device environment *before*
    TensorFlow is imported, so that a worker sees only its own GPU. SIGTERM drains (the
    supervisor's way to stop or recycle it); a second SIGTERM exits at once."""
    # An empty CUDA_VISIBLE_DEVICES keeps a CPU worker off every GPU.
    os.environ["CUDA_VISIBLE_DEVICES"] = slot.device if slot.device is not None else ""
    debug = config.log_level.upper() == "DEBUG"
    quiet_tensorflow_logging(debug=debug)
    worker_id = consumer_name(os.getpid())
    keep_large_buffers()
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s %(levelname)s [worker {worker_id}] %(name)s: %(message)s",
    )
    worker = Worker(
        config, worker_id=worker_id, slot=slot.index, device=slot.device,
        inherit_from=inherit_from, ready=ready,
    )  # fmt: skip

    def on_term(signum: int, frame: object) -> None:
        if worker.stopping:
            os._exit(EXIT_OK)
        worker.stop()

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C reaches the whole process group; the supervisor decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # TensorFlow starts (imported by a preload module, or here) and looks for GPUs
    # with its start-up lines kept off the terminal (see workers.quiet).
    with native_stderr_silenced(enabled=not debug):
        for module in config.preload:  # custom layers and ops register themselves on import
            importlib.import_module(module)
        from workers.model import configure_tensorflow

        settings = configure_tensorflow(
            intra_op_threads=slot.intra_op_threads or None,
            inter_op_threads=slot.inter_op_threads or None,
        )
    worker.settings.update(settings)
    try:
        code = worker.run()
    except Exception:
        log.exception("worker %s failed", worker_id)
        code = EXIT_LOAD_FAILED if worker.model is None else 1
    raise SystemExit(code)


def consumer_name(pid: int) -> str:
    """A worker's consumer name in the group (and heartbeat id): host and pid, so that the
    supervisor can name the consumer of a worker it saw die."""
    return f"{socket.gethostname()}:{pid}"
