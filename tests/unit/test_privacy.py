"""Pseudonymization of user identifiers: keyed, stable, never mutating, UI only."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import pytest

from forwarder.alarms.config import PrivacyConfig
from forwarder.alarms.privacy import MIN_KEY_BYTES, TOKEN_CACHE_SIZE, Pseudonymizer, is_token
from forwarder.event import Event, Level

KEY = b"0123456789abcdef0123456789abcdef"
TS = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def ev(service: str, meta: dict[str, Any]) -> Event:
    return Event(TS, service, Level.ERROR, "ui.error", "TypeError: x is undefined", meta)


def test_the_token_is_hmac_sha256_of_the_value_under_the_key() -> None:
    p = Pseudonymizer(KEY, ["user_id"], ["ui"])
    expected = "u_" + hmac.new(KEY, b"alice", hashlib.sha256).hexdigest()[:32]
    assert p.token("alice") == expected
    assert p.token("alice") == Pseudonymizer(KEY, ["user_id"], ["ui"]).token("alice")  # stable
    assert p.token("alice") != Pseudonymizer(b"x" * 32, ["user_id"], ["ui"]).token("alice")
    assert p.token(42) == p.token("42")  # the same user whether logged as int or str
    assert is_token(p.token("alice")) and not is_token("alice") and not is_token(42)


def test_tokens_stay_right_past_the_cache_of_recent_identifiers() -> None:
    p = Pseudonymizer(KEY, ["user_id"], ["ui"])
    n = TOKEN_CACHE_SIZE * 2 + 3  # every value evicted once, then asked again
    for _ in range(2):
        for i in range(n):
            expected = hmac.new(KEY, str(i).encode(), hashlib.sha256).hexdigest()[:32]
            assert p.token(i) == "u_" + expected


def test_user_keys_of_configured_services_are_replaced_in_a_derived_event() -> None:
    p = Pseudonymizer(KEY, ["user_id", "email"], ["ui"])
    meta = MappingProxyType({"user_id": "alice", "email": "a@x.io", "page": "/checkout"})
    original = ev("ui", meta)  # type: ignore[arg-type]
    out = p.apply(original)
    assert out.meta == {
        "user_id": p.token("alice"),
        "email": p.token("a@x.io"),
        "page": "/checkout",
    }
    assert out._replace(meta=original.meta) == original  # only meta changed
    assert original.meta["user_id"] == "alice"  # the input is not mutated
    assert p.hashed == 2


def test_other_services_and_events_without_ids_are_returned_as_they_are() -> None:
    p = Pseudonymizer(KEY, ["user_id"], ["ui"])
    api = ev("api", {"user_id": "alice"})
    assert p.apply(api) is api
    no_user = ev("ui", {"page": "/"})
    assert p.apply(no_user) is no_user
    null_user = ev("ui", {"user_id": None})
    assert p.apply(null_user) is null_user
    assert p.hashed == 0


def test_applying_twice_changes_nothing() -> None:
    p = Pseudonymizer(KEY, ["user_id"], ["ui"])
    once = p.apply(ev("ui", {"user_id": "alice"}))
    assert p.apply(once) is once


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match=f"at least {MIN_KEY_BYTES} bytes"):
        Pseudonymizer(b"short", ["user_id"], ["ui"])


def test_built_from_config() -> None:
    p = Pseudonymizer.from_config(PrivacyConfig(user_keys=["uid"], services=["ui", "panel"]), KEY)
    assert p is not None
    assert p.apply(ev("panel", {"uid": 7})).meta == {"uid": p.token(7)}
    assert Pseudonymizer.from_config(PrivacyConfig(services=[]), None) is None
    with pytest.raises(ValueError, match="no key was given"):
        Pseudonymizer.from_config(PrivacyConfig(), None)


def test_apply_all_is_apply_on_each_event() -> None:
    p = Pseudonymizer(KEY, ["user_id"], ["ui"])
    events = [
        ev("ui", {"user_id": 1}),
        ev("api", {"user_id": 2}),
        ev("ui", {}),
        ev("ui", {"user_id": 1}),
    ]
    assert p.apply_all(events) == [p.apply(e) for e in events]
    assert p.apply_all(events)[1] is events[1]  # another service: the same object
