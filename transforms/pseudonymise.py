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

import hashlib
import hmac
import logging
import os
import re

KEY_ENV = "MEDTWIN_PSEUDONYM_KEY"
DEMO_KEY = "medtwin-demo-key-not-secret"
_MIN_KEY_LENGTH = 16

# Identifier-bearing JSON members in raw inputs (all our input records use these names).
_ID_MEMBER = re.compile(r'("patient_id"\s*:\s*")((?:[^"\\]|\\.)*)(")')


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

    Picklable (it holds only the key bytes), so DoFns carry it to workers.
    """

    def __init__(self, key: str):
        self._key = key.encode("utf-8")

    def patient_key(self, patient_id: str) -> str:
        """patient_id -> 32 hex characters (128 bits of HMAC-SHA256)."""
        return hmac.new(self._key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def scrub_text(self, text: str) -> str:
        """Replaces every ``"patient_id": "..."`` value in raw (possibly broken) JSON text."""
        return _ID_MEMBER.sub(lambda m: m.group(1) + "pk:" + self.patient_key(m.group(2)) + m.group(3), text)
