"""Checking model.json as data before any of it is used: every key present, of the right type and range.

A schema is a dict of key -> `settings.Rule` (the same rules config.py's settings are checked
with), a nested schema dict, `Optional(schema)` for a key that may be absent, or `Each(schema)`
for a dict whose every value follows `schema` (a name -> entry table such as "files").
A mismatch raises SchemaError naming the dotted key, e.g. "thresholds.image"; `store.py` turns it
into the one-line "damaged or incompatible model, retrain" error.
"""

from __future__ import annotations

from dataclasses import dataclass

from settings import Rule


class SchemaError(ValueError):
    """A model.json entry that is missing or not what the code expects; the message names its key."""


@dataclass(frozen=True)
class Optional:
    schema: object


@dataclass(frozen=True)
class Each:
    schema: object


def check(data, schema, where: str = "") -> None:
    """Raise SchemaError for the first entry of `data` that `schema` does not allow."""
    if isinstance(schema, Rule):
        problem = schema.problem(data)
        if problem is not None:
            raise SchemaError(f"{where or 'the file'} is {data!r:.60}, must be {problem}")
        return
    if isinstance(schema, Each):
        if not isinstance(data, dict):
            raise SchemaError(f"{where} must be a JSON object")
        for key, value in data.items():
            check(value, schema.schema, f"{where}.{key}" if where else str(key))
        return
    if not isinstance(data, dict):
        raise SchemaError(f"{where or 'the file'} must be a JSON object, not {type(data).__name__}")
    for key, entry in schema.items():
        name = f"{where}.{key}" if where else key
        if key not in data:
            if isinstance(entry, Optional):
                continue
            raise SchemaError(f"{name} is missing")
        check(data[key], entry.schema if isinstance(entry, Optional) else entry, name)
