"""JSON files written by others (``adapter_config.json``, a model's ``config.json``): read as
one object, every field checked before it is used, each failure the caller's error naming the
file, the field, the value and the fix.

A leaf module: it imports nothing from lorafa_fx.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: A field's test: (does the value pass, what a passing value is).
Check = tuple[Callable[[object], bool], str]
_MISSING = object()


def read_json_object(file: Path, error: type[Exception], fix: str) -> dict[str, Any]:
    """The JSON object in `file`; `error` naming the file and `fix` if it is not one."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{file} is not valid JSON ({e}); {fix}.") from None
    except RecursionError:
        # json's decoder recurses per nesting level: 100000 brackets exceed Python's stack.
        raise error(f"{file} nests JSON deeper than Python can read; {fix}.") from None
    except OSError as e:
        raise error(f"{file} cannot be read ({e.strerror or e}); {fix}.") from None
    if not isinstance(data, dict):
        raise error(f"{file} holds a JSON {type(data).__name__}, not a JSON object; {fix}.")
    return data


def field(data: Mapping[str, Any], key: str, check: Check, file: Path, error: type[Exception], fix: str,
          default: object = _MISSING) -> Any:
    """``data[key]`` (or `default` where absent) after `check`; `error` naming the file, the
    field, the value, what was expected and `fix` otherwise."""
    if key not in data and default is not _MISSING:
        return default
    value = data.get(key)
    ok, expected = check
    if key not in data or not ok(value):
        found = "is missing" if key not in data else f"is {json.dumps(value)[:80]}"
        raise error(f"{file}: field {key!r} {found}, expected {expected}; {fix}.")
    return value


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def optional(check: Check) -> Check:
    ok, expected = check
    return (lambda v: v is None or ok(v)), f"{expected} or null"


POSITIVE_INT: Check = (lambda v: _int(v) and v > 0, "a positive integer")
POSITIVE_NUMBER: Check = (lambda v: _number(v) and v > 0, "a finite number > 0")
NUMBER: Check = (_number, "a finite number")
BOOL: Check = (lambda v: isinstance(v, bool), "true or false")
STRING: Check = (lambda v: isinstance(v, str), "a string")
STRINGS: Check = (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of strings")
NAMES: Check = (lambda v: isinstance(v, str) or STRINGS[0](v), "a list of module names or a regex string")


def pattern_map(value: Check) -> Check:
    """A JSON object from module-name regex to a value passing `value` (PEFT's rank_pattern)."""
    ok, expected = value
    return ((lambda v: isinstance(v, dict) and all(_regex(k) and ok(x) for k, x in v.items())),
            f"an object from module-name regex to {expected}")
