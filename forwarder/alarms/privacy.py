"""Pseudonymization of user identifiers: a keyed hash replaces them before storage.

For events of the configured services, each configured meta key (default `user_id`)
is replaced by `u_` + the first 32 hex digits (128 bits) of HMAC-SHA256(key, value).
The same user always gets the same token under one key, so per-user alarms
(`group_by = "user_id"`) still work, while the table never holds who the user is and,
the key being secret, a token cannot be reversed by hashing candidate ids.

Pure: the key arrives as bytes (`PrivacyConfig.load_key` reads it from the
environment or a file); no I/O. Events are never mutated: a derived Event is
returned (the same object when nothing changes). Applied once, before the fan-out
to the alarms and the sink, so both see the same tokens.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Iterable

from forwarder.alarms.config import PrivacyConfig
from forwarder.event import Event

MIN_KEY_BYTES = 16
TOKEN_PREFIX = "u_"
TOKEN_HEX = 32
TOKEN_CACHE_SIZE = 4096  # pseudonyms kept for the identifiers seen last
_TOKEN = re.compile(rf"^{TOKEN_PREFIX}[0-9a-f]{{{TOKEN_HEX}}}$")

__all__ = ["MIN_KEY_BYTES", "Pseudonymizer", "is_token"]


def is_token(value: object) -> bool:
    """Whether `value` already is a pseudonym (so applying twice changes nothing)."""
    return isinstance(value, str) and _TOKEN.match(value) is not None


class Pseudonymizer:
    """Replaces user identifiers in the meta of events of some services."""

    def __init__(self, key: bytes, user_keys: Iterable[str], services: Iterable[str]) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"the privacy HMAC key must be at least {MIN_KEY_BYTES} bytes "
                f"(got {len(key)}): a short key lets user ids be guessed back"
            )
        self._key = key
        # A panel has few users and sends many lines each: an HMAC costs ~1.7 us.
        self._token_of = functools.lru_cache(maxsize=TOKEN_CACHE_SIZE)(self._hmac_token)
        self.user_keys = tuple(dict.fromkeys(user_keys))
        self.services = frozenset(services)
        self.hashed = 0  # values replaced

    @classmethod
    def from_config(cls, cfg: PrivacyConfig, key: bytes | None) -> Pseudonymizer | None:
        """None when the config hashes nothing; ValueError when it would but has no key."""
        if not cfg.enabled():
            return None
        if key is None:
            raise ValueError("privacy: user identifiers are to be hashed but no key was given")
        return cls(key, cfg.user_keys, cfg.services)

    def token(self, value: object) -> str:
        """The pseudonym of one identifier (non-strings are hashed as their str())."""
        return self._token_of(value if isinstance(value, str) else str(value))

    def _hmac_token(self, text: str) -> str:
        digest = hmac.new(self._key, text.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return TOKEN_PREFIX + digest.hexdigest()[:TOKEN_HEX]

    def apply_all(self, events: list[Event]) -> list[Event]:
        """`apply` to each event; the service test inline (most lines are not the UI's)."""
        services, apply = self.services, self.apply
        return [apply(e) if e.service in services else e for e in events]

    def apply(self, ev: Event) -> Event:
        """The event with its user identifiers replaced; `ev` itself when none apply."""
        if ev.service not in self.services:
            return ev
        meta = ev.meta
        replaced: dict[str, str] | None = None
        for key in self.user_keys:
            value = meta.get(key)
            if value is None or is_token(value):
                continue
            if replaced is None:
                replaced = {}
            replaced[key] = self.token(value)
        if replaced is None:
            return ev
        self.hashed += len(replaced)
        return ev._replace(meta={**meta, **replaced})
