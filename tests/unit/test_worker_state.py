"""Delivery state in the envelope: recording attempts and deciding what comes next."""

from __future__ import annotations

import random

from empath.delivery import state
from empath.delivery.state import RecipientOutcome

KW = dict(max_attempts=5, base=60.0, maximum=3600.0, jitter=0.0, expiration=86400.0)


def envelope(*addrs: str) -> dict:
    return {"id": "X", "sender": "s@a", "received_at": 1000.0,
            "recipients": [{"address": a} for a in addrs]}


def test_all_delivered_means_remove():
    env = envelope("a@x", "b@y")
    ok = RecipientOutcome("delivered", 250, "2.0.0", "ok", "mx.x")
    state.record_attempt(env, {"a@x": ok, "b@y": ok}, {"duration": 0.1}, 1001.0)
    assert state.decide(env, 1001.0, **KW).action == "remove"
    assert env["attempt_count"] == 1 and env["attempts"][0]["results"]["a@x"]["code"] == 250


def test_partial_failure_defers_only_open_recipients():
    env = envelope("a@x", "b@y", "c@z")
    state.record_attempt(env, {
        "a@x": RecipientOutcome("delivered", 250, "2.0.0", "ok"),
        "b@y": RecipientOutcome("deferred", 451, "4.3.0", "try later"),
        "c@z": RecipientOutcome("failed", 550, "5.1.1", "no such user"),
    }, {}, 1001.0)
    d = state.decide(env, 1001.0, **KW)
    assert d.action == "defer" and d.next_retry_at == 1061.0
    assert [r["address"] for r in state.open_recipients(env)] == ["b@y"]
    # Next attempt: only b is open; it gets delivered; c stays failed -> finished (bounce).
    state.record_attempt(env, {"b@y": RecipientOutcome("delivered", 250, "2.0.0", "ok")},
                         {}, 1070.0)
    assert state.decide(env, 1070.0, **KW).action == "finished"
    assert env["recipients"][1]["attempts"] == 2


def test_backoff_grows_and_is_capped():
    env = envelope("a@x")
    dues = []
    for n in range(1, 5):
        state.record_attempt(env, {"a@x": RecipientOutcome("deferred", 421, None, "busy")},
                             {}, 1000.0)
        dues.append(state.decide(env, 1000.0, **{**KW, "max_attempts": 99,
                                                 "maximum": 200.0}).next_retry_at)
    assert dues == [1060.0, 1120.0, 1200.0, 1200.0]


def test_max_attempts_expires_open_recipients():
    env = envelope("a@x")
    for _ in range(5):
        state.record_attempt(env, {"a@x": RecipientOutcome("deferred", 421, None, "busy")},
                             {}, 1000.0)
    d = state.decide(env, 1000.0, **KW)
    assert d.action == "finished" and env["recipients"][0]["status"] == "expired"


def test_expiration_time_expires_and_due_never_passes_it():
    env = envelope("a@x")
    state.record_attempt(env, {"a@x": RecipientOutcome("deferred", 421, None, "busy")}, {},
                         1000.0)
    d = state.decide(env, 86000.0, **{**KW, "base": 3600.0})
    assert d.action == "defer" and d.next_retry_at == 1000.0 + 86400.0
    assert state.decide(env, 1000.0 + 86400.0, **KW).action == "finished"


def test_jitter_stays_in_bounds():
    env = envelope("a@x")
    state.record_attempt(env, {"a@x": RecipientOutcome("deferred", 421, None, "busy")}, {},
                         1000.0)
    rng = random.Random(7)
    dues = {state.decide(dict(env, recipients=[dict(r) for r in env["recipients"]]), 1000.0,
                         **{**KW, "jitter": 0.2}, rng=rng).next_retry_at for _ in range(50)}
    assert len(dues) > 1 and all(1048.0 <= d <= 1072.0 for d in dues)
