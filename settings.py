"""Reads config.py, applies KEY=VALUE overrides from the command line, and checks every value.

Kept apart from config.py so that config.py stays a plain list of constants a user edits.
`RULES` says, for every key of config.py, what it may hold; `load` checks all values (config.py's
own and the overrides) once, before any work starts, so a bad value is one line naming the key,
the value and what is allowed, never a traceback from deep inside torch. A new setting in
config.py gets one line in `RULES` (tests/test_reliability.py fails while a key has none).
"""

from __future__ import annotations

import ast
import difflib
import math
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterable

import choices

try:
    import config
except Exception as error:  # a mistake in config.py: one line naming it, never a traceback
    where = f" line {error.lineno}" if isinstance(error, SyntaxError) and error.lineno else ""
    what = error.msg if isinstance(error, SyntaxError) else f"{type(error).__name__}: {error}"
    print(f"error: config.py{where}: {what}: fix config.py (its settings are plain constants, KEY = value)", file=sys.stderr)
    raise SystemExit(2) from None


class SettingsError(ValueError):
    """A bad setting, with a message meant for the user as it is."""


def defaults() -> dict:
    """The UPPER_CASE constants of config.py."""
    return {key: value for key, value in vars(config).items() if key.isupper()}


# --- Rules: what a value may be ------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What one setting may hold: `test(value)` is True when it does; `allowed` says it in words
    (a callable when the answer depends on the machine, as for DEVICE)."""

    test: Callable[[object], bool]
    allowed: str | Callable[[], str]

    def problem(self, value) -> str | None:
        """None when `value` is allowed, else what is allowed, in words."""
        try:
            ok = bool(self.test(value))
        except (TypeError, ValueError, OverflowError):
            ok = False
        if ok:
            return None
        return self.words()

    def words(self) -> str:
        """What is allowed, in words."""
        return self.allowed() if callable(self.allowed) else self.allowed


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: int | None = None, maximum: int | None = None, multiple_of: int | None = None) -> Rule:
    """A whole number, optionally bounded (inclusive) and a multiple of `multiple_of`."""
    words = "an integer"
    if minimum is not None and maximum is not None:
        words += f" from {minimum} to {maximum}"
    elif minimum is not None:
        words += f" >= {minimum}"
    elif maximum is not None:
        words += f" <= {maximum}"
    if multiple_of:
        words += f", a multiple of {multiple_of}"
    return Rule(
        lambda v: _is_int(v)
        and (minimum is None or v >= minimum)
        and (maximum is None or v <= maximum)
        and (not multiple_of or v % multiple_of == 0),
        words,
    )


def number(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None, below: float | None = None) -> Rule:
    """A finite number (ints accepted); `minimum`/`maximum` inclusive, `above`/`below` exclusive."""
    low = f"[{minimum}" if minimum is not None else (f"({above}" if above is not None else None)
    high = f"{maximum}]" if maximum is not None else (f"{below})" if below is not None else None)
    if low and high:
        words = f"a number in {low}, {high}"
    elif low:
        words = f"a number {'>=' if minimum is not None else '>'} {low[1:]}"
    elif high:
        words = f"a number {'<=' if maximum is not None else '<'} {high[:-1]}"
    else:
        words = "a finite number"
    return Rule(
        lambda v: _is_number(v)
        and (minimum is None or v >= minimum)
        and (maximum is None or v <= maximum)
        and (above is None or v > above)
        and (below is None or v < below),
        words,
    )


def flag() -> Rule:
    return Rule(lambda v: isinstance(v, bool), "True or False")


def text(empty: bool = True) -> Rule:
    return Rule(lambda v: isinstance(v, str) and (empty or v.strip() != ""), "text" if empty else "non-empty text")


def choice(options: Iterable[str]) -> Rule:
    """One of `options` (a list from choices.py, or a registry's keys)."""
    names = list(options)
    return Rule(lambda v: v in names, "one of " + ", ".join(repr(o) for o in names))


def folder_name() -> Rule:
    """"" or a plain folder name (no path separators), for names that become MODEL_DIR/<name>."""
    return Rule(
        lambda v: isinstance(v, str) and v not in (".", "..") and "/" not in v and "\\" not in v and not v.startswith("."),
        "'' or a folder name without '/', '\\' or a leading '.'",
    )


def sequence(item: Rule, length: int | None = None, min_length: int = 1, max_length: int | None = None, order: str = "") -> Rule:
    """A tuple (or list) of values that each satisfy `item`; `order` "increasing" (strictly) or
    "nondecreasing" (a (low, high) range)."""
    if length is not None:
        count = f"{length} value{'s' if length != 1 else ''}"
    elif max_length is not None:
        count = f"{min_length} to {max_length} values"
    else:
        count = f"{min_length} or more values"
    words = f"a tuple of {count}, each {item.allowed}" + (f", {order}" if order else "")
    if order == "nondecreasing":
        words = f"a (low, high) tuple, each {item.allowed}, low <= high"

    def test(values) -> bool:
        if not isinstance(values, (tuple, list)):
            return False
        if length is not None and len(values) != length:
            return False
        if len(values) < min_length or (max_length is not None and len(values) > max_length):
            return False
        if not all(item.problem(v) is None for v in values):
            return False
        pairs = list(zip(values, values[1:]))
        if order == "increasing":
            return all(a < b for a, b in pairs)
        if order == "nondecreasing":
            return all(a <= b for a, b in pairs)
        return True

    return Rule(test, words)


def _devices_here() -> list[str]:
    """The device names that work on this machine."""
    import torch

    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def device() -> Rule:
    """A device that exists here: checked up front, so no torch error about it comes later."""
    return Rule(lambda v: v in _devices_here(),
                lambda: "a device this machine has: " + ", ".join(_devices_here()))


def weights() -> Rule:
    return Rule(
        lambda v: isinstance(v, str) and v.strip() != "",
        "'imagenet', 'imagenet-offline', 'none' or the path of a .pt/.pth state-dict file",
    )


def _is_image_size(value) -> bool:
    """IMAGE_SIZE: (h, w) of at least one deepest-stage cell (32 px), "auto", or a fraction of the images' size."""
    if value == "auto":
        return True
    if isinstance(value, (tuple, list)):
        return len(value) == 2 and all(_is_int(v) and v >= 32 for v in value)
    return _is_number(value) and 0 < value <= 8


FRACTION = number(0, below=1)  # a share that must leave something: [0, 1)

# Every key of config.py and what it may hold. Adding a setting to config.py = adding its line here.
RULES: dict[str, Rule] = {
    # data
    "DATASET_DIR": text(empty=False),
    "MODEL_DIR": text(empty=False),
    "RESULTS_DIR": text(empty=False),
    "MODEL_NAME": folder_name(),
    "TEST_DIR": text(),
    "VALIDATION_FRACTION": FRACTION,
    "ADD_GOOD": text(),
    "ADD_DEFECT": text(),
    "MODEL_BACKUPS": integer(0, 100),
    # preprocessing
    "IMAGE_SIZE": Rule(_is_image_size, "(height, width) in pixels, each >= 32 (one whole number >= 32: a square), \"auto\", or a fraction of the images' own size in (0, 8]"),
    "CENTER_CROP": number(minimum=0.25, maximum=1),  # 0.1 would resize 10x to keep 1 % of the image
    "TILE_SIZE": Rule(lambda v: _is_int(v) and (v == 0 or v >= 32), "0 (no tiles) or an integer >= 32 (pixels, like IMAGE_SIZE)"),
    "TILE_OVERLAP": integer(minimum=0),
    "TILE_STATISTICS": choice(choices.TILE_STATISTICS),
    "NORMALIZE_MEAN": sequence(number(-1, 2), length=3),  # pixels are in [0, 1]: a mean far outside makes every map constant
    "NORMALIZE_STD": sequence(number(minimum=1e-3, maximum=10), length=3),
    # anomaly model
    "ANOMALY_MODEL": choice(choices.ANOMALY_MODELS),
    "BACKBONE": choice(choices.BACKBONES),
    "WEIGHTS": weights(),
    "LAYERS": sequence(integer(1, 4), min_length=0, max_length=4, order="increasing"),  # () = the model's default stages
    "FEATURE_DIM": integer(minimum=0),
    "COVARIANCE_EPSILON": number(minimum=0),
    "BLUR_SIGMA": number(minimum=0),
    "BACKBONE_PRECISION": choice(choices.BACKBONE_PRECISIONS),
    "CORESET_RATIO": number(above=0, maximum=1),
    "PATCHCORE_NEIGHBORS": Rule(lambda v: _is_int(v) and (v == 0 or v >= 2), "0 (plain max) or an integer >= 2 (eq. 7 needs a nearest and a next one)"),
    "PATCHCORE_FEATURE_DIM": integer(minimum=0),
    "PATCHCORE_PROJECTION_DIM": integer(minimum=0),
    "PADIM_SCORE": choice(choices.PADIM_SCORES),
    "CHEBYSHEV_WEIGHT": number(0, 1),
    "SEED": integer(0, 2**32 - 1),
    # thresholds
    "IMAGE_FALSE_REJECT_RATE": FRACTION,
    "PIXEL_FALSE_REJECT_RATE": FRACTION,
    "PIXEL_THRESHOLD_POLICY": choice(choices.PIXEL_THRESHOLD_POLICIES),
    "OUT_OF_FOLD_FOLDS": Rule(lambda v: _is_int(v) and (v == 0 or v >= 2), "0 (off) or an integer >= 2"),
    # runtime
    "DEVICE": device(),
    "BATCH_SIZE": integer(minimum=1),
    "NUM_WORKERS": integer(minimum=0),
    "SAVE_PICTURES": flag(),
    "RUNTIME": choice(choices.RUNTIMES),
    # live inspection (serve.py)
    "SERVE_HOST": text(empty=False),
    "SERVE_PORT": integer(1, 65535),
    "SERVE_TOKEN": text(),
    "SERVE_MAX_BYTES": integer(minimum=1),
    "SERVE_MAX_PIXELS": integer(minimum=1),
    "SERVE_RECENT": integer(minimum=1),
    "SERVE_THREADS": integer(minimum=0),
    "WATCH_DIR": text(),
    "WATCH_SORT": flag(),
    "WATCH_SETTLE_SECONDS": number(above=0),
    "REVIEW_DIR": text(empty=False),
    # export
    "EXPORT_CHECK_IMAGES": integer(minimum=1),
    # evaluation
    "EVAL_PRO_FPR_LIMIT": number(above=0, maximum=1),
    "EVAL_SHEET_COUNT": integer(minimum=0),
    # classifier
    "CLASSIFIER": flag(),
    "CLASSIFIER_SYNTHETIC_DEFECTS": integer(minimum=0),
    "CLASSIFIER_ANCHOR": choice(choices.CLASSIFIER_ANCHORS),
    "CLASSIFIER_SHRINK_GOODS": number(minimum=0),
    "CLASSIFIER_ENOUGH_REAL_DEFECTS": integer(minimum=0),
    "CLASSIFIER_REAL_DEFECT_WEIGHT": number(above=0, maximum=1e6),  # XGBoost's weights are float32: 1e39 is inf
    "CLASSIFIER_DEFECT_SIMILARITY": flag(),
    "CLASSIFIER_DEFECT_SIZE": sequence(number(above=0, maximum=1), length=2, order="nondecreasing"),
    "CLASSIFIER_DEFECT_STRENGTH": sequence(number(above=0, maximum=1), length=2, order="nondecreasing"),
    "CLASSIFIER_FALSE_REJECT_RATE": FRACTION,
    "CLASSIFIER_FOLDS": integer(minimum=2),
    "CLASSIFIER_MAX_DEPTH": integer(minimum=1),
    "CLASSIFIER_LEARNING_RATE": number(above=0, maximum=1),
    "CLASSIFIER_MAX_ROUNDS": integer(minimum=1),
    "CLASSIFIER_EARLY_STOPPING_ROUNDS": integer(minimum=1),
    "CLASSIFIER_SUBSAMPLE": number(above=0, maximum=1),
    "CLASSIFIER_COLSAMPLE": number(above=0, maximum=1),
    "CLASSIFIER_MIN_CHILD_WEIGHT": number(minimum=0),
    "CLASSIFIER_MONOTONE": flag(),
}

# Rules between settings: (keys, test on all settings, what is allowed).
CROSS_RULES: list[tuple[tuple[str, ...], Callable[[SimpleNamespace], bool], str]] = [
    (("TILE_OVERLAP", "TILE_SIZE"), lambda s: s.TILE_SIZE == 0 or s.TILE_OVERLAP < s.TILE_SIZE, "TILE_OVERLAP must be smaller than TILE_SIZE"),
]


def _show(value) -> str:
    return value if isinstance(value, str) and value and value.strip() == value else repr(value)


def check_value(key: str, value) -> None:
    """Raise SettingsError when `value` is not allowed for `key` (a key without a rule passes)."""
    rule = RULES.get(key)
    problem = rule.problem(value) if rule is not None else None
    if problem is not None:
        quoted = f" ({value!r} is text: write it without quotes)" if isinstance(value, str) and _is_literal(value) else ""
        raise SettingsError(f"{key}={_show(value)} is not allowed: {key} must be {problem}{quoted} (see config.py)")


def _is_literal(text: str) -> bool:
    """Whether `text` reads as a number, a boolean or a tuple: a value quoted by mistake (BATCH_SIZE = "16")."""
    if text.strip().lower() in ("true", "false"):
        return True
    try:
        return not isinstance(ast.literal_eval(text.strip()), str)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


def validate(values: dict) -> None:
    """Check every setting against RULES and CROSS_RULES; the first bad one raises SettingsError."""
    for key, value in values.items():
        check_value(key, value)
    namespace = SimpleNamespace(**values)
    for keys, test, allowed in CROSS_RULES:
        if all(key in values for key in keys) and not test(namespace):
            shown = " with ".join(f"{key}={_show(values[key])}" for key in keys)
            raise SettingsError(f"{shown}: {allowed}")


# Settings that take several forms, parsed whatever their default's type: IMAGE_SIZE is
# (height, width), "auto", or a number (a fraction of the images' own size: 1 is 1.0).
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
        problem = integer(minimum=32).problem(value)
        if problem is not None:
            raise SettingsError(f"{key}={_show(value)} is not allowed: {key} must be {problem} (the old spelling of IMAGE_SIZE / CENTER_CROP, see config.py)")
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
        allowed = f": {key} must be {RULES[key].words()}" if key in RULES else ""
        raise SettingsError(f"{key}={text}: not a valid {type(default).__name__} value{allowed}") from None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, int) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value  # a float for a whole number in config.py (CENTER_CROP = 1): the setting's rule decides
    elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return tuple(value)
    elif isinstance(default, (tuple, list)) and isinstance(value, (int, float)):
        return (value,)
    raise SettingsError(
        f"{key}={text}: expected a {type(default).__name__} like {default!r}, got {type(value).__name__}"
    )


def command_line_keys(argv: Iterable[str]) -> set[str]:
    """The settings a command line names (KEY=VALUE, spelled as `load` reads them): what a script
    changes only when it was asked to, such as the operating point's false-reject rates."""
    keys = set()
    for arg in argv:
        if arg == "--":
            break
        if "=" in arg and (arg.split("=", 1)[0].strip().lstrip("-").upper() in defaults() or not os.path.lexists(arg)):
            keys.add(arg.split("=", 1)[0].strip().lstrip("-").upper())
    return keys


def _as_setting(arg: str, names: set[str]) -> tuple[str, str] | None:
    """(KEY, value text) when a command-line argument is a setting, None when it is a path.

    KEY=VALUE with a known KEY is a setting (a note when a file of that name exists too); an
    existing file or folder is a path even with "=" in its name; anything else with "=" is a
    setting, so a misspelt key is refused naming the closest ones."""
    if "=" not in arg:
        return None
    key, text = arg.split("=", 1)
    key = key.strip().lstrip("-").upper()
    exists = os.path.lexists(arg)
    if key in names:
        if exists:
            print(f"note: {arg} is read as the setting {key}; to mean the file of that name, write ./{arg} or put it after --", file=sys.stderr)
        return key, text
    return None if exists else (key, text)


# Settings a user gives for one run only: left in config.py they would change every later run
# (ADD_GOOD would turn every training into an update), so config.py must keep them empty.
COMMAND_LINE_ONLY = ("ADD_GOOD", "ADD_DEFECT")


def training_only(key: str) -> bool:
    """Whether `key` is read by train.py alone: given to test.py, eval.py or serve.py it changes nothing
    (the model's settings that do differ are named by `pipeline.detector.settings_differences`)."""
    return key in ("VALIDATION_FRACTION", "MODEL_BACKUPS", "PIXEL_FALSE_REJECT_RATE", "OUT_OF_FOLD_FOLDS") or (
        key.startswith("CLASSIFIER") and key != "CLASSIFIER_FALSE_REJECT_RATE")


PATH_SETTINGS = ("DATASET_DIR", "MODEL_DIR", "RESULTS_DIR", "TEST_DIR", "ADD_GOOD", "ADD_DEFECT", "WATCH_DIR", "REVIEW_DIR")


def _check_config_names(values: dict) -> None:
    """A name in config.py that is no setting (a typo, or a setting in lower case) would be ignored
    without a word, as the command line never lets it be: one line naming it and the setting meant."""
    known = set(RULES) | set(OLD_GEOMETRY)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise SettingsError(f"config.py sets {key}, which is no setting{f' (did you mean {close[0]}?)' if close else ''}: "
                                "fix or delete that line (docs/settings.md lists them)")
    for name in vars(config):
        if not name.isupper() and name.upper() in known:
            raise SettingsError(f"config.py sets {name}, which is no setting: settings are written in upper case ({name.upper()})")


def load(argv: list[str] | None = None) -> tuple[SimpleNamespace, list[str]]:
    """Settings from config.py with KEY=VALUE overrides, all checked; returns them and the other arguments."""
    argv = sys.argv[1:] if argv is None else argv
    values = defaults()
    _check_config_names(values)
    old = {key: values.pop(key) for key in OLD_GEOMETRY if key in values}  # an old config.py
    in_config = set(old)
    given = set()
    positional = []
    for number, arg in enumerate(argv):
        if arg == "--":  # the rest are paths, whatever they hold
            positional += argv[number + 1 :]
            break
        setting = _as_setting(arg, set(values) | set(OLD_GEOMETRY))
        if setting is None:
            positional.append(arg)
            continue
        key, text = setting
        if key in given:  # the last one counts, as wrapper scripts expect (defaults first, then one change)
            print(f"note: {key} is given more than once on the command line: the last, {arg}, counts", file=sys.stderr)
        if key in OLD_GEOMETRY:
            old[key] = _parse_value(key, text.strip(), OLD_GEOMETRY[key])
            given.add(key)
            continue
        given.add(key)
        if key not in values:
            close = [k for k in values if k.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SettingsError(
                f"unknown setting {key}{hint}; the settings are listed in config.py (no file or folder {arg!r} exists either)"
            )
        values[key] = _parse_value(key, text.strip(), values[key])
    if old:
        if given & {"IMAGE_SIZE", "CENTER_CROP"} and given & set(OLD_GEOMETRY):
            raise SettingsError("RESIZE / CROP are the old spelling of IMAGE_SIZE / CENTER_CROP: give one or the other, not both")
        if in_config and "IMAGE_SIZE" in values and not given & set(OLD_GEOMETRY):  # which one was meant? (it used IMAGE_SIZE, silently)
            raise SettingsError(f"config.py sets both IMAGE_SIZE and the old {' / '.join(sorted(in_config))}: delete the old line "
                                "(IMAGE_SIZE = (CROP, CROP) with CENTER_CROP = CROP / RESIZE say the same)")
        if given & set(OLD_GEOMETRY) or "IMAGE_SIZE" not in values:
            _translate_old_geometry(values, old)
    for key in COMMAND_LINE_ONLY:
        if key in given and values.get(key) == "":  # ADD_GOOD=$FOLDER with FOLDER unset would retrain and drop every update
            raise SettingsError(f"{key}= is empty on the command line: give the folder (python train.py {key}=<folder>), "
                                f"or leave {key} out to retrain from DATASET_DIR")
        if values.get(key) and key not in given:
            raise SettingsError(f"{key}={_show(values[key])} is set in config.py: give it on the command line only (python train.py {key}=<folder>), and set it back to \"\" in config.py")
    missing = sorted(set(RULES) - set(values) - set(OLD_GEOMETRY))
    if missing:  # a setting deleted or commented out, or an older config.py
        raise SettingsError(f"config.py has no {', '.join(missing)}: add {'them' if len(missing) > 1 else 'it'} back (docs/settings.md gives every setting's default)")
    for key in PATH_SETTINGS:  # ~ is the user's home folder, as in a shell
        if isinstance(values.get(key), str) and values[key].startswith("~"):
            values[key] = os.path.expanduser(values[key])
    if _is_int(values.get("IMAGE_SIZE")):  # 224 is a 224 x 224 square; a small whole number a fraction (1: full resolution, never 1 x 1 px)
        size = values["IMAGE_SIZE"]
        values["IMAGE_SIZE"] = (size, size) if size >= 32 else float(size)
    validate(values)
    _check_folder_settings(values)
    return SimpleNamespace(**values), positional


def _check_folder_settings(values: dict) -> None:
    """Folders that must not lie inside others: no folder setting in MODEL_DIR (a retrain or an update
    moves a model's folder, with whatever else lies in it, to its numbered backups and deletes the
    oldest: RESULTS_DIR = MODEL_DIR put test.py's predictions into the model's own folder), and no
    ADD_GOOD / ADD_DEFECT in RESULTS_DIR (the scripts' overlays are no pictures of parts)."""
    for key in PATH_SETTINGS:
        if key != "MODEL_DIR" and values.get(key) and _lies_in(values[key], values["MODEL_DIR"]):
            raise SettingsError(f"{key}={values[key]} lies in MODEL_DIR={values['MODEL_DIR']}, whose model folders a retrain moves "
                                f"to numbered backups (the oldest deleted), with anything else in them: set {key} to a folder outside MODEL_DIR")
    for key in ("ADD_GOOD", "ADD_DEFECT"):  # the tool's own pictures are no parts (REVIEW_DIR and WATCH_DIR may lie in RESULTS_DIR)
        folder = values.get(key)
        if folder and _lies_in(folder, values["RESULTS_DIR"]) and not any(values.get(mine) and _lies_in(folder, values[mine]) for mine in ("REVIEW_DIR", "WATCH_DIR")):
            raise SettingsError(f"{key}={folder} lies in RESULTS_DIR={values['RESULTS_DIR']}, where the scripts write heat-map overlays and "
                                "masks, no pictures of parts: give the folder of the images themselves (the review page copies them to REVIEW_DIR)")


def _lies_in(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it, links resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)
