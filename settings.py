"""Reads config.py and applies KEY=VALUE overrides from the command line.

Kept apart from config.py so that config.py stays a plain list of constants a user edits.
"""

from __future__ import annotations

import ast
import sys
from types import SimpleNamespace

import config


class SettingsError(ValueError):
    """A bad setting, with a message meant for the user as it is."""


def defaults() -> dict:
    """The UPPER_CASE constants of config.py."""
    return {key: value for key, value in vars(config).items() if key.isupper()}


def _parse_value(key: str, text: str, default):
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(default, bool) and text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise SettingsError(f"{key}={text}: not a valid {type(default).__name__} value") from None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return tuple(value)
    elif isinstance(default, (tuple, list)) and isinstance(value, (int, float)):
        return (value,)
    raise SettingsError(
        f"{key}={text}: expected a {type(default).__name__} like {default!r}, got {type(value).__name__}"
    )


def load(argv: list[str] | None = None) -> tuple[SimpleNamespace, list[str]]:
    """Settings from config.py with KEY=VALUE overrides; returns them and the other arguments."""
    argv = sys.argv[1:] if argv is None else argv
    values = defaults()
    positional = []
    for arg in argv:
        if "=" not in arg:
            positional.append(arg)
            continue
        key, text = arg.split("=", 1)
        key = key.strip().lstrip("-").upper()
        if key not in values:
            close = [k for k in values if k.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SettingsError(f"unknown setting {key}{hint}; the settings are listed in config.py")
        values[key] = _parse_value(key, text.strip(), values[key])
    return SimpleNamespace(**values), positional
