"""The one way sizes are shown to people: binary units, one decimal above bytes.

``human(0) == "0 B"``, ``human(1023) == "1023 B"``, ``human(1536) == "1.5 KiB"``,
``human(5 << 30) == "5.0 GiB"``, ``human(3 << 40) == "3.0 TiB"``. Machine-readable output
(``--json``) carries plain byte counts instead.
"""

from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human(n: float) -> str:
    """``n`` bytes for a person; negative values (a shrink) keep their sign."""
    value = float(n)
    for unit in UNITS:
        if abs(value) < 1024 or unit == UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable: the last unit takes any value")
