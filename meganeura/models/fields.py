"""Reading a config.json section into a config dataclass, every value checked first.

A config is untrusted input: a zero, a string or a NaN where a size or a constant belongs
must fail here, naming its key, not as a ZeroDivisionError while a graph is built or as
empty output after one ran.
"""

from __future__ import annotations

import dataclasses
import math
import typing

# No dimension of a model this engine can run comes near this; a larger one is a corrupt config.
MAX_SIZE = 1 << 24


def _check(kind, value) -> str | None:
    """What `value` should have been for a field of type `kind`, or None when it is fine."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        fine = number and isinstance(value, int) and 1 <= value <= MAX_SIZE
        return None if fine else f"an integer from 1 to {MAX_SIZE}"
    return None if number and math.isfinite(value) and value > 0 else "a finite number > 0"


def json_object(d, where: str) -> dict:
    """`d`, which must be a dict (a config section such as "vision_config")."""
    if not isinstance(d, dict):
        raise ValueError(f"{where.rstrip('.') or 'the config'} must be a JSON object, got {type(d).__name__}")
    return d


def read_fields(cls, d: dict, where: str = "") -> dict:
    """The keyword arguments for dataclass `cls` found in `d`: ints are sizes (1..MAX_SIZE),
    floats positive and finite (norm epsilons, RoPE bases), bools bools; fields of other types
    are left to the caller. Unknown keys are ignored; a missing or null key keeps the field's
    default, and is an error without one. `where` prefixes key names in messages."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if hints[f.name] not in (int, float, bool):  # a nested config: the caller reads it
            continue
        value = d.get(f.name)
        if value is None:
            if f.default is dataclasses.MISSING:
                raise ValueError(f"{where}{f.name} is missing (or null)")
            continue
        wanted = _check(hints[f.name], value)
        if wanted:
            raise ValueError(f"{where}{f.name} must be {wanted}, got {value!r:.60}")
        out[f.name] = value
    return out
