"""The worker's pure parts: intake decisions, takeover triage, answers -> Redis commands."""

from __future__ import annotations

import multiprocessing

import numpy as np
from redis.crc import key_slot

from queueing import keys, wire
from queueing.errors import DeadLettered, InvalidInput, ModelError
from workers.intake import SAFETY_DELIVERIES, Intake, plan_takeover, triage
from workers.messages import Answer, AnswerMaker, Entry, InHand, WorkerStats
from workers.running import RunningBatch, RunningLanes
from workers.shared import StreamClock
from workers.spec import TensorSpec
from workers.writer import encode, redis_commands, round_commands

MODEL = "m"
SPEC = [TensorSpec("x", "float32", (4,))]


def make_intake(max_rows: int = 8) -> tuple[Intake, WorkerStats]:
    stats = WorkerStats()
    intake = Intake(
        model_name=MODEL, inputs=SPEC, limits=wire.DEFAULT_LIMITS, max_rows=max_rows,
        clock=StreamClock(), answers=AnswerMaker(stats),
    )  # fmt: skip
    return intake, stats


def entry(
    request_id: bytes | None, inputs: object, *, model: str = MODEL, keep_s: int = 0
) -> dict[bytes, bytes]:
    fields = {keys.FIELD_REPLY: b"reply-list"}
    if request_id is not None:
        fields[keys.FIELD_ID] = request_id
    fields[keys.FIELD_BODY] = wire.encode_request_body(model, inputs, keep_s=keep_s)  # type: ignore[arg-type]
    return fields


def test_intake_batches_what_fits_and_answers_the_rest_each_counted() -> None:
    intake, stats = make_intake(max_rows=8)
    x = np.ones((2, 4), np.float32)
    entries = [
        (b"1-0", entry(b"good", x)),
        (b"2-0", entry(None, x)),  # no request id: dead-lettered
        (b"3-0", entry(b"other", x, model="not-m")),  # another model's request
        (b"4-0", entry(b"wrong", np.ones((2, 3), np.float32))),  # does not fit the spec
        (b"5-0", entry(b"big", np.ones((9, 4), np.float32))),  # over max_rows
        (b"6-0", {**entry(b"bad", x), keys.FIELD_BODY: b"\xc1junk"}),  # undecodable body
    ]
    accepted, refused = intake.admit(entries, suspect=False)
    assert [(r.request_id, r.rows, r.group) for r in accepted] == [("good", 2, ((4,),))]
    by_entry = {a.entry_id: a for a in refused}
    assert by_entry[b"2-0"].request_id is None
    assert by_entry[b"2-0"].dead_reason == "unreadable request id"
    for entry_id in (b"3-0", b"4-0", b"5-0", b"6-0"):
        answer = by_entry[entry_id]
        assert isinstance(answer.error, InvalidInput) and answer.dead_reason is None
        assert answer.error.request_id == answer.request_id
    assert "over the limit of 8" in str(by_entry[b"5-0"].error)
    # Every refusal is counted, not only the answers of the main thread.
    assert (stats.requests, stats.errors) == (5, 5)


def test_taken_over_requests_run_alone() -> None:
    intake, _ = make_intake()
    x = np.ones((1, 4), np.float32)
    accepted, _ = intake.admit([(b"1-0", entry(b"a", x)), (b"2-0", entry(b"b", x))], suspect=True)
    assert all(r.suspect for r in accepted)
    assert len({r.group for r in accepted}) == 2


def test_arrival_and_deadline_are_on_redis_clock() -> None:
    intake, _ = make_intake()
    intake.clock.set_redis_time(1000.0, before=9.0, after=11.0)  # Redis is 990 s ahead
    body = wire.encode_request_body(MODEL, np.ones(4, np.float32), deadline_ms=250)
    fields = {keys.FIELD_ID: b"a", keys.FIELD_REPLY: b"r", keys.FIELD_BODY: body}
    (request,), _ = intake.admit([(b"995000-0", fields)], suspect=False)
    assert request.arrival == 5.0 and request.deadline == 5.25 and request.unbatched


def test_triage_sets_aside_what_kept_killing_its_workers() -> None:
    entries: list[Entry] = [(b"1-0", {}), (b"2-0", {}), (b"3-0", {})]
    limit = 3
    deliveries = [2, 5, SAFETY_DELIVERIES * limit + 1]
    fatal = [1, 3, 1]
    fresh, dead = triage(entries, deliveries, fatal, max_deliveries=limit)
    assert fresh == [(b"1-0", {})]
    reasons = dict((entry_id, reason) for (entry_id, _), reason in dead)
    assert "3 runs of it killed their worker" in reasons[b"2-0"]
    assert "without an answer" in reasons[b"3-0"]


def test_only_the_batch_that_was_running_runs_alone_after_a_death() -> None:
    ids = [b"1-0", b"2-0", b"3-0", b"4-0"]
    # The supervisor knew the dead worker was running 1-0 and 2-0; 2-0 had run alone once
    # before (recorded as it started); 3-0 and 4-0 were waiting; 4-0 once ran alone.
    fatal, alone, record = plan_takeover(ids, [0, 1, 0, 1], {b"1-0", b"2-0"})
    assert record == [b"1-0"]  # its batch run is counted now; 2-0's alone run already was
    assert fatal == [1, 1, 0, 1]
    assert alone == [True, True, False, True]


def test_takeover_with_nothing_known_treats_every_entry_as_in_the_fatal_batch() -> None:
    fatal, alone, record = plan_takeover([b"1-0", b"2-0"], [0, 2], None)
    assert record == [b"1-0"] and fatal == [1, 2] and alone == [True, True]


def test_a_worker_killed_between_batches_leaves_no_suspect() -> None:
    fatal, alone, record = plan_takeover([b"1-0", b"2-0"], [0, 0], set())
    assert record == [] and fatal == [0, 0] and alone == [False, False]


def test_running_batch_is_read_after_the_writer_is_gone() -> None:
    running = RunningBatch(multiprocessing.get_context("spawn"), max_requests=4)
    assert running.read() == set()
    running.start([b"1700000000000-0", b"1700000000000-1"])
    assert running.read() == {b"1700000000000-0", b"1700000000000-1"}
    running.clear()
    assert running.read() == set()
    running.start(str(i).encode() * 30 for i in range(1000))  # more than fit
    assert running.read() is None


def test_lanes_of_one_process_record_the_union_of_their_running_batches() -> None:
    # Several models' lanes run batches at once: a crash during them makes every one of
    # those batches suspect, and a lane's end of batch leaves the others' recorded.
    running = RunningBatch(multiprocessing.get_context("spawn"), max_requests=4)
    lanes = RunningLanes(running)
    a, b = lanes.lane("a"), lanes.lane("b")
    a.start([b"1-0", b"1-1"])
    b.start([b"5-0"])
    assert running.read() == {b"1-0", b"1-1", b"5-0"}
    a.clear()
    assert running.read() == {b"5-0"}
    a.start([b"2-0"])
    b.clear()
    a.clear()
    assert running.read() == set()


def test_dead_letter_answer_keeps_entry_and_honours_keep() -> None:
    intake, stats = make_intake()
    fields = entry(b"req", np.ones(4, np.float32), keep_s=60)
    answer = intake.dead_letter(b"7-0", fields, "killed its workers")
    assert isinstance(answer.error, DeadLettered) and answer.keep_s == 60
    assert answer.dead_fields == fields and answer.suspect
    assert stats.errors == 1


def in_hand(entry_id: bytes, request_id: str, reply: str, *, keep_s: int = 0) -> InHand:
    return InHand(entry_id=entry_id, request_id=request_id, reply=reply, keep_s=keep_s,
                  arrays={}, rows=1, unbatched=False, group=(), arrival=0.0,
                  deadline=None)  # fmt: skip


def test_answers_become_replies_then_acks() -> None:
    make = AnswerMaker(WorkerStats())
    answers = [
        make.result(in_hand(b"1-0", "a", "r1"), np.zeros(2, np.float32)),
        make.error(in_hand(b"2-0", "b", "r1", keep_s=30), ModelError("boom")),
        make.result(in_hand(b"3-0", "c", "r2"), np.ones(2, np.float32)),
        make.dead_letter(
            b"4-0", {b"id": b"\xff"}, "unreadable request id", request_id=None, reply=""
        ),
    ]
    payloads = [encode(a) for a in answers]
    assert payloads[3] is None
    posts, acks = round_commands(answers, payloads, model=MODEL, result_ttl_s=100)
    kept = keys.kept_result("b")
    stream = keys.stream(MODEL)
    # Answers (other slots than the model's, on a cluster) ...
    assert posts == [
        ("DEL", kept), ("RPUSH", kept, payloads[1]), ("EXPIRE", kept, 30),
        ("XADD", "r1", "*", b"0", payloads[0], b"1", payloads[1]), ("EXPIRE", "r1", 100),
        ("XADD", "r2", "*", b"0", payloads[2]), ("EXPIRE", "r2", 100),
    ]  # fmt: skip
    # ... then, all in the model's slot, dead letters and the acks.
    assert acks == [
        ("XADD", keys.dead_letters(MODEL), "*", b"id", b"\xff", b"reason",
         "unreadable request id", b"entry", b"4-0"),
        ("XACK", stream, keys.GROUP, b"1-0", b"2-0", b"3-0", b"4-0"),
        ("XDEL", stream, b"1-0", b"2-0", b"3-0", b"4-0"),
    ]  # fmt: skip
    assert redis_commands(answers, payloads, model=MODEL, result_ttl_s=100) == posts + acks
    assert {key_slot(str(c[1]).encode()) for c in acks} == {key_slot(stream.encode())}


def test_taken_over_answers_clear_their_attempt_counts() -> None:
    make = AnswerMaker(WorkerStats())
    suspect = in_hand(b"1-0", "a", "r")
    suspect.suspect = True
    answers = [make.result(suspect, np.zeros(1, np.float32))]
    commands = redis_commands(answers, [encode(a) for a in answers], model=MODEL,
                              result_ttl_s=1)  # fmt: skip
    assert ("HDEL", keys.attempts(MODEL), b"1-0") in commands
    assert commands[-2][0] == "XACK"


def test_an_output_the_wire_cannot_carry_is_sent_as_an_error() -> None:
    answer = Answer(b"1-0", "a", "r", 0, outputs=np.array([object()], dtype=object))
    result = wire.decode_result(encode(answer) or b"")
    assert isinstance(result.error, ModelError) and "cannot send" in str(result.error)
