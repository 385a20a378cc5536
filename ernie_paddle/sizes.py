"""Byte sizes given on the command line ("24GB", "500MiB"): one parser, one convention."""

from __future__ import annotations

import re

# Decimal units are powers of 1000 and binary units powers of 1024, as `df -H` / `df -h` and the IEC standard use.
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """Bytes in `text` ("24GB" = 24e9, "24GiB" = 24 * 2**30, "4096" = 4096 bytes); ValueError names the text."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"expected a positive size like 24GB, 24GiB or 500MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])
