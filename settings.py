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


# Settings that take several forms, parsed whatever their default's type: IMAGE_SIZE is
# (height, width), an int (a square), "auto", or a float (a fraction of the images' own size).
SIZE_SETTINGS = ("IMAGE_SIZE",)
# Old spellings of the geometry settings (issue 11), still read: RESIZE=R CROP=C inspects
# (C, C) as the central C / R of an R x R resize, exactly as before. Unset ones take the old defaults.
OLD_GEOMETRY = {"RESIZE": 256, "CROP": 224}


def _parse_size(key: str, text: str):
    if text.strip().strip("'\"") == "auto":
        return "auto"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise SettingsError(f'{key}={text}: expected (height, width) like (224, 224), "auto", or a fraction of the images\' size like 1.0')


def _translate_old_geometry(values: dict, old: dict) -> None:
    """RESIZE / CROP (given on the command line or left in an old config.py) -> IMAGE_SIZE, CENTER_CROP."""
    resize, crop = (old.get(key, default) for key, default in OLD_GEOMETRY.items())
    for key, value in (("RESIZE", resize), ("CROP", crop)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SettingsError(f"{key}={value!r}: expected a positive int (the old spelling; see IMAGE_SIZE and CENTER_CROP in config.py)")
    if crop > resize:
        raise SettingsError(f"CROP={crop} is larger than RESIZE={resize}: set CROP <= RESIZE (or use IMAGE_SIZE and CENTER_CROP)")
    values["IMAGE_SIZE"], values["CENTER_CROP"] = (crop, crop), crop / resize


def _parse_value(key: str, text: str, default):
    if key in SIZE_SETTINGS:
        return _parse_size(key, text)
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
    old = {key: values.pop(key) for key in OLD_GEOMETRY if key in values}  # an old config.py
    given = set()
    positional = []
    for arg in argv:
        if "=" not in arg:
            positional.append(arg)
            continue
        key, text = arg.split("=", 1)
        key = key.strip().lstrip("-").upper()
        if key in OLD_GEOMETRY:
            old[key] = _parse_value(key, text.strip(), OLD_GEOMETRY[key])
            given.add(key)
            continue
        given.add(key)
        if key not in values:
            close = [k for k in values if k.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SettingsError(f"unknown setting {key}{hint}; the settings are listed in config.py")
        values[key] = _parse_value(key, text.strip(), values[key])
    if old:
        if given & {"IMAGE_SIZE", "CENTER_CROP"} and given & set(OLD_GEOMETRY):
            raise SettingsError("RESIZE / CROP are the old spelling of IMAGE_SIZE / CENTER_CROP: give one or the other, not both")
        if given & set(OLD_GEOMETRY) or "IMAGE_SIZE" not in values:
            _translate_old_geometry(values, old)
    return SimpleNamespace(**values), positional
