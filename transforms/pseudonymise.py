"""Keyed pseudonyms for patient identifiers (HIPAA / GDPR pseudonymisation).

A patient identifier never leaves the decode stage: it is replaced by
``HMAC-SHA256(key, patient_id)``, truncated to 128 bits and hex encoded. The
same key gives the same pseudonym in every run, so tables join across days and
backfills; without the key the mapping cannot be reversed or recomputed from a
guessed identifier (a plain hash could be, by hashing every MRN).

**The key never enters the job graph.** A job is given a `KeyReference`, which
names where the key is, never the key:

* ``env:NAME``   an environment variable of the worker (``MEDTWIN_PSEUDONYM_KEY``
  by default; a key given with ``--pseudonym_key`` is handed to local workers
  through it);
* ``file:PATH``  a file on the worker (a mounted secret), its one line;
* ``secret:projects/P/secrets/S/versions/V``  a Google Secret Manager version
  (needs ``google-cloud-secret-manager`` on the workers);
* ``demo``       the fixed, published demo key (synthetic data only).

A `Pseudonymiser.from_reference` pickles as the reference alone, and its DoFns load
the key in ``setup()``. A `Pseudonymiser` built from a key string (tests,
in-process tools such as ``medtwin report``) refuses to be pickled unless the key
is the public demo key.

**Weak keys are refused** outside ``--demo`` (`check_key_strength`): shorter
than 16 characters, fewer than 8 distinct characters or under 64 bits of
character entropy (16 spaces, ``0000000000000000``), or containing the published
demo key.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import logging
import math
import os
import pickle

KEY_ENV = "MEDTWIN_PSEUDONYM_KEY"
DEMO_KEY = "medtwin-demo-key-not-secret"
_MIN_KEY_LENGTH = 16
_MIN_DISTINCT_CHARACTERS = 8
_MIN_ENTROPY_BITS = 64.0
_REMEMBERED = 100_000  # identifiers whose pseudonyms a Pseudonymiser keeps
_DIGEST_CONTEXT = b"medtwin-dead-letter\x00"  # raw-record digests never equal a pseudonym
REFERENCE_KINDS = ("env", "file", "secret", "demo")


class MissingKeyError(RuntimeError):
    """Raised when a non-demo run has no usable pseudonymisation key (absent, weak or unreadable)."""


def _entropy_bits(key: str) -> float:
    """Shannon entropy of the key's character distribution, times its length: a rough upper bound
    on the guessing work, enough to catch repeated characters and short alphabets."""
    counts = collections.Counter(key)
    return -sum(n * math.log2(n / len(key)) for n in counts.values())


def check_key_strength(key: str, *, demo: bool) -> str:
    """`key` if it may protect real data; MissingKeyError naming what is wrong otherwise.

    With `demo` (synthetic data) every non-empty key is allowed, with a warning when weak.
    """
    problems = []
    if len(key) < _MIN_KEY_LENGTH:
        problems.append(f"must be at least {_MIN_KEY_LENGTH} characters")
    if DEMO_KEY in key:
        problems.append("contains the published demo key")
    if len(set(key)) < _MIN_DISTINCT_CHARACTERS or _entropy_bits(key) < _MIN_ENTROPY_BITS:
        problems.append(f"is too predictable (needs at least {_MIN_DISTINCT_CHARACTERS} distinct characters and "
                        f"{_MIN_ENTROPY_BITS:.0f} bits of character entropy; e.g. `python -c \"import secrets; "
                        "print(secrets.token_hex(32))\"`)")
    if not problems:
        return key
    if demo and key:
        logging.getLogger(__name__).warning("weak pseudonymisation key allowed by --demo: outputs are NOT protected")
        return key
    raise MissingKeyError("the pseudonymisation key " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class KeyReference:
    """Where a worker finds the key: ``kind`` is one of `REFERENCE_KINDS`, ``name`` the variable,
    file or Secret Manager version (empty for ``demo``). Holds no key."""

    kind: str
    name: str = ""

    def __post_init__(self):
        if self.kind not in REFERENCE_KINDS:
            raise ValueError(f"unknown key reference kind {self.kind!r}; choose from {', '.join(REFERENCE_KINDS)}")
        if (self.kind == "demo") == bool(self.name):
            raise ValueError(f"key reference {self.kind}: {'no name expected' if self.kind == 'demo' else 'needs a name'}")

    def __str__(self) -> str:
        return self.kind if self.kind == "demo" else f"{self.kind}:{self.name}"

    def load(self) -> str:
        """The key this reference names (MissingKeyError when it cannot be read)."""
        if self.kind == "demo":
            return DEMO_KEY
        if self.kind == "env":
            key = os.environ.get(self.name)
            if not key:
                raise MissingKeyError(f"pseudonymisation key reference {self}: the environment variable is not set")
            return key
        if self.kind == "file":
            try:
                with open(self.name, encoding="utf-8") as handle:
                    key = handle.read(4096).rstrip("\r\n")
            except OSError as error:
                raise MissingKeyError(f"pseudonymisation key reference {self}: {error.strerror}") from None
            if not key:
                raise MissingKeyError(f"pseudonymisation key reference {self}: the file is empty")
            return key
        try:
            from google.cloud import secretmanager
        except ImportError:
            raise MissingKeyError(f"pseudonymisation key reference {self}: google-cloud-secret-manager is not "
                                  "installed on this worker") from None
        response = secretmanager.SecretManagerServiceClient().access_secret_version(name=self.name)
        return response.payload.data.decode("utf-8").rstrip("\r\n")


def resolve_key(option_value: str | None, *, demo: bool) -> str:
    """The key to use in this process: the option, else the environment, else (demo only) the demo key.

    Weak keys are refused outside the demo (`check_key_strength`).
    """
    key = option_value or os.environ.get(KEY_ENV)
    if key:
        return check_key_strength(key, demo=demo)
    if demo:
        logging.getLogger(__name__).warning("using the public demo pseudonymisation key: outputs are NOT protected")
        return DEMO_KEY
    raise MissingKeyError(
        f"no pseudonymisation key: pass --pseudonym_key, --pseudonym_key_file or --pseudonym_key_secret, or set "
        f"{KEY_ENV} (use --demo only for synthetic data)"
    )


def resolve_key_reference(option_value: str | None, *, demo: bool, key_file: str | None = None,
                          key_secret: str | None = None) -> KeyReference:
    """The reference a job carries instead of its key, checked now where the key can be read here.

    A key given as a value (``--pseudonym_key``) is put into this process's ``MEDTWIN_PSEUDONYM_KEY``
    so local workers (the DirectRunner's, which inherit the environment) read it there; remote
    workers need a file or Secret Manager reference, or the variable set on them.
    """
    given = [name for name, value in (("--pseudonym_key", option_value), ("--pseudonym_key_file", key_file),
                                      ("--pseudonym_key_secret", key_secret)) if value]
    if len(given) > 1:
        raise MissingKeyError(f"give one pseudonymisation key, not {' and '.join(given)}")
    if key_secret:
        return KeyReference("secret", key_secret)  # read and checked by the workers, in setup()
    if key_file:
        reference = KeyReference("file", key_file)
        check_key_strength(reference.load(), demo=demo)
        return reference
    key = resolve_key(option_value, demo=demo)
    if key == DEMO_KEY:
        return KeyReference("demo")
    if os.environ.get(KEY_ENV) != key:
        os.environ[KEY_ENV] = key
    return KeyReference("env", KEY_ENV)


class Pseudonymiser:
    """Maps patient identifiers to stable keyed pseudonyms.

    Built from a `KeyReference` (`from_reference`), it pickles as the reference alone and loads
    the key on `load()` (call it in a DoFn's ``setup()``) or first use. Built from a key string it
    pickles only if that key is the public demo key. Each copy remembers the pseudonyms it
    computed (a patient's uploads keep coming), up to `_REMEMBERED` identifiers at a time.
    """

    def __init__(self, key: str | None = None, *, reference: KeyReference | None = None):
        if (key is None) == (reference is None):
            raise ValueError("a Pseudonymiser needs a key or a key reference, not both")
        self._reference = reference
        self._key = key.encode("utf-8") if key is not None else None
        self._known: dict[str, str] = {}

    @classmethod
    def from_reference(cls, reference: KeyReference) -> "Pseudonymiser":
        return cls(reference=reference)

    def __getstate__(self):
        if self._reference is not None:
            return {"reference": self._reference}
        if self._key == DEMO_KEY.encode("utf-8"):
            return {"reference": KeyReference("demo")}
        raise pickle.PicklingError("a Pseudonymiser holding a key is never pickled: build it with "
                                   "Pseudonymiser.from_reference(KeyReference(...)) so workers load the key")

    def __setstate__(self, state):
        self._reference = state["reference"]
        self._key = None
        self._known = {}

    def load(self) -> None:
        """Read the key from the reference (once); MissingKeyError when it is absent or weak."""
        if self._key is None:
            key = self._reference.load()
            check_key_strength(key, demo=self._reference.kind == "demo")
            self._key = key.encode("utf-8")

    def patient_key(self, patient_id: str) -> str:
        """patient_id -> 32 hex characters (128 bits of HMAC-SHA256)."""
        key = self._known.get(patient_id)
        if key is None:
            if self._key is None:
                self.load()
            if len(self._known) >= _REMEMBERED:
                self._known.clear()
            key = self._known[patient_id] = hmac.digest(self._key, patient_id.encode("utf-8"), "sha256")[:16].hex()
        return key

    def scrub_value(self, value: str) -> str:
        """A ``patient_id`` string -> ``pk:<pseudonym>`` (for dead letters)."""
        return "pk:" + self.patient_key(value)

    def digest(self, data: bytes) -> str:
        """A keyed digest of a raw record (32 hex characters), for finding it again without keeping it."""
        if self._key is None:
            self.load()
        return hmac.digest(self._key, _DIGEST_CONTEXT + bytes(data), "sha256")[:16].hex()
