"""Text that cannot be stored or tokenised: bytes that are not UTF-8, and lone surrogates.

Record files are read with `errors="surrogateescape"`, so a line holding bytes that are not UTF-8 still
reads, its bad bytes as code points U+DC80 to U+DCFF, and only that record is refused. A JSON escape such as
"\\ud800" gives a lone surrogate, which no tokenizer or Arrow column takes either.
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Iterable
from typing import TextIO

_SURROGATE = re.compile("[\ud800-\udfff]")


def unicode_problem(value: str) -> str | None:
    """Why `value` is not text (a byte that is not UTF-8, a lone surrogate), or None if it is."""
    found = _SURROGATE.search(value)
    if found is None:
        return None
    code = ord(found[0])
    if 0xDC80 <= code <= 0xDCFF:
        return f"holds a byte that is not UTF-8 (0x{code - 0xDC00:02x}) at character {found.start()}"
    return f"holds a lone surrogate (U+{code:04X}) at character {found.start()}, which is not text"


def first_unicode_problem(fields: Iterable[tuple[str, object]]) -> str | None:
    """'NAME holds ...' for the first named value (a string or a list of strings) that is not text."""
    for name, value in fields:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and (problem := unicode_problem(item)):
                return f"{name} {problem}"
    return None


def standard_input() -> TextIO:
    """Standard input as UTF-8 whatever the locale, bytes that are not UTF-8 kept as surrogates."""
    return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
