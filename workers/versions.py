"""The versions of one model a worker serves, and which one each request goes to.

A request names a model, ``"resnet"``, or a model and a version or label, ``"resnet@4"``,
``"resnet@canary"`` (see ``queueing.keys.split_address``). Every version of a model shares
the model's stream: a request is bound to a version only when a worker reads it, so a
request queued before a rollout is answered by the version that is the default when it is
read, and a swap never strands a queue. Batches never mix versions (the batcher's groups
carry the version).

A version retired (replaced, or its folder removed) stops taking requests at once but is
kept until every request routed to it is answered: then it is dropped (unloaded). No
TensorFlow and no Redis here.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from redis.typing import EncodableT, FieldT

from queueing import keys
from queueing.errors import UnknownModel
from workers.intake import Intake
from workers.messages import Answer, AnswerMaker, Entry, InHand, Received
from workers.runner import Runner, Served

log = logging.getLogger(__name__)

#: States a version is shown in (``tfpool status``).
LOADING, WARMING, READY, DRAINING, FAILED = "loading", "warming", "ready", "draining", "failed"


@dataclass(eq=False)
class Version:
    """One loaded version: its model (warmed), and the intake and runner that serve it."""

    number: int
    path: str
    served: Served
    intake: Intake
    runner: Runner
    in_hand: int = 0  # requests routed to it and not yet answered (guarded by Versions)


class Versions:
    """The routing table of one model in one worker.

    Who writes what: the watcher adds and retires versions and sets states; the reader
    routes requests (``in_hand`` + 1); the main thread reports answers (``in_hand`` - 1,
    and drops a retired version that has none left). All of it under ``_lock``.
    """

    def __init__(self, name: str, labels: dict[str, int] | None = None) -> None:
        self.name = name
        self.labels = dict(labels or {})
        self._serving: dict[int, Version] = {}  # new requests go to these
        self._draining: dict[int, Version] = {}  # retired: answering what they hold
        self._states: dict[int, tuple[str, str]] = {}  # number -> (state, detail)
        self._lock = threading.Lock()
        #: Called (outside the lock) after the served versions changed.
        self.on_change: Callable[[], None] = lambda: None

    # --- the watcher's side -------------------------------------------------------------

    def set_state(self, number: int, state: str, detail: str = "") -> None:
        """Record what is happening to a version (loading, warming, failed), for status."""
        with self._lock:
            self._states[number] = (state, detail)

    def add(self, version: Version) -> None:
        """Start routing requests to ``version`` (loaded and warmed)."""
        with self._lock:
            self._serving[version.number] = version
            self._states[version.number] = (READY, "")
        log.info("model %s: version %d serves", self.name, version.number)
        self.on_change()

    def retire(self, number: int) -> None:
        """Stop routing to a version; it is dropped once its requests are answered."""
        with self._lock:
            version = self._serving.pop(number, None)
            if version is None:
                return
            self._draining[number] = version
            self._states[number] = (DRAINING, "")
            dropped = self._drop_drained()
        log.info("model %s: version %d retired; draining %d requests", self.name, number,
                 version.in_hand)  # fmt: skip
        self._log_dropped(dropped)
        self.on_change()

    def forget(self, number: int) -> None:
        """Forget the state of a version that is gone from disk and not loaded."""
        with self._lock:
            if number not in self._serving and number not in self._draining:
                self._states.pop(number, None)

    # --- the reader's side --------------------------------------------------------------

    def front(self) -> Intake | None:
        """An intake to decode entries with (decoding does not depend on the version)."""
        with self._lock:
            version = self._default()
            return None if version is None else version.intake

    def route(self, received: list[Received]) -> tuple[
        list[tuple[Version, list[Received]]], list[tuple[Received, UnknownModel]]
    ]:  # fmt: skip
        """Each request to the version it names (or the default), counted in that
        version's ``in_hand``; those naming no served version, with their error."""
        routed: dict[int, tuple[Version, list[Received]]] = {}
        unknown: list[tuple[Received, UnknownModel]] = []
        with self._lock:
            default = self._default()
            for r in received:
                spec = keys.split_address(r.body.model)[1]
                version = default if spec is None else self._named(spec)
                if version is None:
                    unknown.append((r, self._unknown(spec)))
                    continue
                version.in_hand += 1
                routed.setdefault(version.number, (version, []))[1].append(r)
        return list(routed.values()), unknown

    # --- the main thread's side ---------------------------------------------------------

    def get(self, number: int) -> Version:
        """A version that holds requests (serving or draining)."""
        with self._lock:
            return self._serving.get(number) or self._draining[number]

    def answered(self, counts: Counter[int]) -> None:
        """Requests of these versions were answered; drop drained versions left empty."""
        if not counts:
            return
        with self._lock:
            for number, count in counts.items():
                version = self._serving.get(number) or self._draining.get(number)
                if version is not None:
                    version.in_hand -= count
            dropped = self._drop_drained() if self._draining else []
        self._log_dropped(dropped)
        if dropped:
            self.on_change()

    # --- what is served -----------------------------------------------------------------

    def serving(self) -> list[int]:
        """Version numbers taking requests, ascending."""
        with self._lock:
            return sorted(self._serving)

    def default_number(self) -> int | None:
        """The version an address without one goes to."""
        with self._lock:
            version = self._default()
            return None if version is None else version.number

    def default_version(self) -> Version | None:
        with self._lock:
            return self._default()

    def states(self) -> dict[int, tuple[str, str]]:
        """Every known version's (state, detail), for status and logs."""
        with self._lock:
            return dict(self._states)

    def describe(self) -> str:
        """One line for the heartbeat: ``3 ready, 4 loading, 5 failed: why``."""
        states = self.states()
        parts = []
        for number in sorted(states):
            state, detail = states[number]
            parts.append(f"{number} {state}" + (f": {detail[:200]}" if detail else ""))
        return "; ".join(parts)

    def describe_labels(self) -> str:
        return ", ".join(f"{label}={number}" for label, number in sorted(self.labels.items()))

    def model_info(self, max_queue: int) -> dict[FieldT, EncodableT]:
        """The model's info hash: producers' admission (``max_queue``), what to send (the
        default version's inputs and outputs), the versions served, and each one's inputs
        and outputs (``inputs@3``...: versions may differ; the gateway's metadata and its
        reading of JSON requests use the version asked for)."""
        with self._lock:
            serving = sorted(self._serving.items())
            default = self._default()
        info: dict[FieldT, EncodableT] = {
            "max_queue": max_queue,
            "versions": ", ".join(str(number) for number, _ in serving),
            "labels": self.describe_labels(),
        }
        if default is not None:
            info.update(_spec_fields(default.served))
            info["default_version"] = default.number
        for number, version in serving:
            for field, value in _spec_fields(version.served).items():
                info[keys.version_field(field, number)] = value
        return info

    def heartbeat_fields(self) -> dict[FieldT, EncodableT]:
        """Heartbeat fields on the versions, for ``tfpool status`` (a model served from a
        repository; one model file is always version 1)."""
        return {
            "versions": self.describe(),
            "labels": self.describe_labels(),
            "default_version": self.default_number() or "",
        }

    # --- internals (the caller holds the lock) ------------------------------------------

    def _default(self) -> Version | None:
        stable = self.labels.get("stable")
        if stable is not None and stable in self._serving:
            return self._serving[stable]
        return self._serving[max(self._serving)] if self._serving else None

    def _named(self, spec: str) -> Version | None:
        number = int(spec) if spec.isdigit() else self.labels.get(spec)
        return None if number is None else self._serving.get(number)

    def _unknown(self, spec: str | None) -> UnknownModel:
        served = ", ".join(str(n) for n in sorted(self._serving)) or "none"
        labels = ", ".join(
            f"{label}={number}" for label, number in sorted(self.labels.items())
            if number in self._serving
        )  # fmt: skip
        what = "no version is served" if spec is None else f"version {spec!r} is not served"
        return UnknownModel(
            f"model {self.name!r}: {what}; served versions: {served}"
            + (f"; labels: {labels}" if labels else "")
        )

    def _drop_drained(self) -> list[int]:
        done = [n for n, v in self._draining.items() if v.in_hand <= 0]
        for number in done:
            del self._draining[number]
            self._states.pop(number, None)
        return done

    def _log_dropped(self, dropped: list[int]) -> None:
        for number in dropped:
            log.info("model %s: version %d drained and unloaded", self.name, number)


def _spec_fields(served: Served) -> dict[str, str]:
    """A version's inputs and outputs as the info hash gives them."""
    return {
        "inputs": served.describe_inputs(),
        "outputs": ", ".join(served.output_names),
        # Their dtypes and shapes, as "inputs" gives the inputs' (the gateway's metadata).
        "output_specs": ", ".join(f"{s.name}: {s.describe()}" for s in served.output_specs()),
    }


class VersionRouter:
    """The reader's intake for a model with versions: decode, route each request to its
    version, and fit it there. Answers requests for versions not served with
    :class:`UnknownModel`. Used by the reader thread only."""

    def __init__(self, versions: Versions, answers: AnswerMaker, fallback: Intake) -> None:
        self.versions = versions
        self.answers = answers
        # Decodes entries when no version is served (every version was retired): they are
        # then answered with UnknownModel.
        self._fallback = fallback

    def admit(self, entries: list[Entry], *, suspect: bool) -> tuple[list[InHand], list[Answer]]:
        """As :meth:`Intake.admit`; each request accepted carries its version."""
        front = self.versions.front() or self._fallback
        received, refused = front.receive_all(entries)
        routed, unknown = self.versions.route(received)
        for r, error in unknown:
            refused.append(self.answers.refusal(r.entry_id, r.request_id, r.reply,
                                                r.body.keep_s, error))  # fmt: skip
        accepted: list[InHand] = []
        for version, group in routed:
            fitted, unfit = version.intake.admit_received(group, suspect=suspect)
            for item in fitted:
                item.version = version.number
                item.group = (version.number, item.group)  # batches never mix versions
            if unfit:
                self.versions.answered(Counter({version.number: len(unfit)}))
            accepted += fitted
            refused += unfit
        return accepted, refused

    def dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> Answer:
        """As :meth:`Intake.dead_letter`."""
        front = self.versions.front() or self._fallback
        return front.dead_letter(entry_id, fields, reason)
