"""Units and names every layer may use: byte sizes, budgets, block paths, natural order.

A leaf module: it imports nothing from lorafa_fx.
"""

from __future__ import annotations

import re
from fractions import Fraction

#: A budget string: a number and a unit, accelerate's spellings (KB, MB, GB; KiB, MiB, GiB) and
#: the T units after them. Units are bytes whatever their case: accelerate reads a lowercase
#: ``b`` as bits ("40Gb" = 5 GB), which nobody means for a memory budget. Digits are ASCII only
#: (``str.isdigit`` also accepts "²", which ``int`` then refuses).
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?)?b\s*", re.IGNORECASE)
_DIGITS = re.compile(r"\s*[0-9]+\s*")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_ACCEPTED = (
    "an int number of bytes, a string such as '40GB' (40*10^9 bytes; KB, MB, GB, TB) or '40GiB' (40*2^30 bytes; "
    "KiB, MiB, GiB, TiB), or 'auto' (the device's free memory minus a reserve)"
)


def format_bytes(n: int) -> str:
    """Decimal units, as accelerate and the paper's GB figures use them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def parse_budget(budget: int | str | None) -> int | None:
    """Bytes from an int, a digit string, or a size with a unit ("40GB" = 40e9, "40GiB" =
    40*2^30, "1.5TB" = 1.5e12; fractions of a byte are dropped). Units are read
    case-insensitively as bytes ("40gb" = "40GB"); a bare "b" is never bits. ("auto" is resolved
    before, by its callers: it needs a device.) Anything else, or a size under one byte, raises
    ValueError naming the value and what is accepted."""
    if budget is None:
        return None
    value = None
    if isinstance(budget, int) and not isinstance(budget, bool):
        value = budget
    elif isinstance(budget, str) and _DIGITS.fullmatch(budget):
        value = int(budget)
    elif isinstance(budget, str) and (match := _SIZE.fullmatch(budget)):
        number, unit = match.groups()
        value = int(Fraction(number) * _SCALE[(unit or "").lower()])
    if value is None:
        raise ValueError(f"budget={budget!r} is not a memory size: pass {_ACCEPTED}.")
    if value <= 0:
        raise ValueError(f"budget={budget!r} must be at least one byte: pass {_ACCEPTED}.")
    return value


def block_of_path(path: str) -> str:
    """The repeated block a module path belongs to ("model.layers.3.mlp" -> "model.layers.3"),
    else its top module ("lm_head"); "<root>" for the root. The first indexed segment is the
    layer, even inside an MoE's experts."""
    parts = path.split(".") if path else ["<root>"]
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def natural_key(name: str) -> list[tuple[int, int, str]]:
    """Sort key putting "layers.2" before "layers.10"."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]
