"""Units and names every layer may use: byte sizes, budgets, block paths, natural order.

A leaf module: it imports nothing from lorafa_fx.
"""

from __future__ import annotations

import re

from accelerate.utils import convert_file_size_to_int

#: A budget string: a number and a unit in accelerate's spelling. A lowercase ``b`` means bits to
#: accelerate ("40Gb" = 5 GB), which nobody means for a memory budget, so units are matched here.
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", re.IGNORECASE)
_ACCEPTED = (
    "an int number of bytes, a string such as '40GB' (40*10^9 bytes) or '40GiB' (40*2^30 bytes), or 'auto' "
    "(the device's free memory minus a reserve)"
)


def format_bytes(n: int) -> str:
    """Decimal units, as accelerate and the paper's GB figures use them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def parse_budget(budget: int | str | None) -> int | None:
    """Bytes from an int, a digit string, or a size with accelerate's units ("40GB" = 40e9,
    "40GiB" = 40*2^30). Units are read case-insensitively as bytes ("40gb" = "40GB"); a bare
    "b" is never bits. ("auto" is resolved before, by its callers: it needs a device.)"""
    if budget is None:
        return None
    if isinstance(budget, int) and not isinstance(budget, bool):
        if budget <= 0:
            raise ValueError(f"budget={budget!r} must be positive: pass {_ACCEPTED}.")
        return budget
    if isinstance(budget, str):
        text = budget.strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
        match = _SIZE.fullmatch(text)
        if match:
            number, unit = match.groups()
            unit = unit[0].upper() + unit[1:-1].lower() + "B"  # "gib" -> "GiB", "gb" -> "GB"
            value = convert_file_size_to_int(f"{number}{unit}")
            if value > 0:
                return value
    raise ValueError(f"budget={budget!r} is not a memory size: pass {_ACCEPTED}.")


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
