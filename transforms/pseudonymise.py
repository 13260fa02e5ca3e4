"""Keyed pseudonyms for patient identifiers (HIPAA / GDPR pseudonymisation).

A patient identifier never leaves the decode stage: it is replaced by
``HMAC-SHA256(key, patient_id)``, truncated to 128 bits and hex encoded. The
same key gives the same pseudonym in every run, so tables join across days and
backfills; without the key the mapping cannot be reversed or recomputed from a
guessed identifier (a plain hash could be, by hashing every MRN).

The key comes from ``--pseudonym_key`` or the ``MEDTWIN_PSEUDONYM_KEY``
environment variable. Only the demo may run without one, with a fixed,
published key that protects nothing and says so.
"""

from __future__ import annotations

import hmac
import logging
import os
import re

KEY_ENV = "MEDTWIN_PSEUDONYM_KEY"
DEMO_KEY = "medtwin-demo-key-not-secret"
_MIN_KEY_LENGTH = 16
_REMEMBERED = 100_000  # identifiers whose pseudonyms a Pseudonymiser keeps

# Identifier-bearing JSON members in raw inputs (all our input records use this name). The value
# may be a string, an unterminated string (a line cut short), a flat list or object, or any other
# token (a number...): whatever follows the colon up to the member's end is the identifier.
_ID_MEMBER = re.compile(
    r'"patient_id"\s*:\s*(?:"((?:[^"\\]|\\.)*)(?:"|$)|(\[[^\]]*\]?|\{[^}]*\}?|[^,}\]\r\n]*))')


class MissingKeyError(RuntimeError):
    """Raised when a non-demo run has no pseudonymisation key."""


def resolve_key(option_value: str | None, *, demo: bool) -> str:
    """The key to use: the option, else the environment, else (demo only) the demo key."""
    key = option_value or os.environ.get(KEY_ENV)
    if key:
        if len(key) < _MIN_KEY_LENGTH:
            raise MissingKeyError(f"the pseudonymisation key must be at least {_MIN_KEY_LENGTH} characters")
        return key
    if demo:
        logging.getLogger(__name__).warning("using the public demo pseudonymisation key: outputs are NOT protected")
        return DEMO_KEY
    raise MissingKeyError(
        f"no pseudonymisation key: pass --pseudonym_key or set {KEY_ENV} (use --demo only for synthetic data)"
    )


class Pseudonymiser:
    """Maps patient identifiers to stable keyed pseudonyms.

    Picklable: it pickles as the key bytes alone, so DoFns carry it to workers. Each copy
    remembers the pseudonyms it computed (a patient's uploads keep coming), up to
    `_REMEMBERED` identifiers at a time.
    """

    def __init__(self, key: str):
        self._key = key.encode("utf-8")
        self._known: dict[str, str] = {}

    def __getstate__(self):
        return {"_key": self._key}

    def __setstate__(self, state):
        self._key = state["_key"]
        self._known = {}

    def patient_key(self, patient_id: str) -> str:
        """patient_id -> 32 hex characters (128 bits of HMAC-SHA256)."""
        key = self._known.get(patient_id)
        if key is None:
            if len(self._known) >= _REMEMBERED:
                self._known.clear()
            key = self._known[patient_id] = hmac.digest(self._key, patient_id.encode("utf-8"), "sha256")[:16].hex()
        return key

    def scrub_text(self, text: str) -> str:
        """Replaces every ``"patient_id"`` member's value in raw (possibly broken) JSON text by
        ``"pk:<pseudonym>"``: string values, strings cut off by the end of the text, and values of
        any other kind alike (the pseudonym is then of the value's text)."""
        def pseudonym(match: re.Match) -> str:
            value = match.group(1) if match.group(1) is not None else match.group(2).strip()
            return f'"patient_id": "pk:{self.patient_key(value)}"'
        return _ID_MEMBER.sub(pseudonym, text)

    def scrub_value(self, value) -> str:
        """A decoded ``patient_id`` of any type (a string, or whatever a broken record holds) ->
        ``pk:<pseudonym>``."""
        return "pk:" + self.patient_key(value if isinstance(value, str) else repr(value))
