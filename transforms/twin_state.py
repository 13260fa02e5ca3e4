"""A twin's remembered state, in a layout that survives a pipeline update.

`VersionedStateCoder` stores a state dataclass as ``{"layout": N, field: value, ...}`` (pickled),
never as the class itself, and decodes by the current class's fields: a field added by a new
release (Dataflow ``--update``, a Flink savepoint restored by a newer job) takes its default when
old state lacks it, and a field a release removed is ignored. The layout number is bumped when a
field changes meaning; a layout newer than the code's is refused with a clear error rather than
misread. Only top-level fields are versioned this way: nested values keep their own pickled form.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

from apache_beam.coders import Coder


class StateLayoutError(ValueError):
    """Stored state written by a newer layout than this code understands."""


class VersionedStateCoder(Coder):
    """state dataclass instance <-> bytes of ``{"layout": N, **fields}``."""

    def __init__(self, state_class: type, layout: int):
        self._class = state_class
        self._layout = layout
        self._fields = tuple(f.name for f in dataclasses.fields(state_class))

    def encode(self, value: Any) -> bytes:
        stored = {name: getattr(value, name) for name in self._fields}
        stored["layout"] = self._layout
        return pickle.dumps(stored, protocol=pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> Any:
        stored = pickle.loads(encoded)
        if not isinstance(stored, dict):   # state written before layouts existed: the object itself
            stored = {name: getattr(stored, name) for name in self._fields if hasattr(stored, name)}
            stored["layout"] = 0
        layout = stored.pop("layout", 0)
        if layout > self._layout:
            raise StateLayoutError(f"{self._class.__name__} state has layout {layout}; this code reads up "
                                   f"to {self._layout}: roll forward, not back")
        return self._class(**{name: value for name, value in stored.items() if name in self._fields})

    def is_deterministic(self) -> bool:
        return False

    def __eq__(self, other):
        return type(self) is type(other) and (self._class, self._layout) == (other._class, other._layout)

    def __hash__(self):
        return hash((type(self), self._class, self._layout))
