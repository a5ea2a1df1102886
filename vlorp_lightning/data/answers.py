"""Extraction and comparison of final numeric answers in generated text.

GSM8K solutions end with ``#### <number>`` and instruction-tuned models often write
"The answer is <number>". :func:`extract_number` looks for those markers first and
falls back to the last number in the text. :func:`normalize_number` brings a number
to one canonical string, so ``"1,234.50"``, ``"$1234.5"`` and ``"1234.50"`` compare
equal.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["extract_number", "normalize_number", "numbers_match"]

# A number with an optional minus and dollar sign ("-$5", "$-5", "$ 5"), either
# with comma thousands separators ("1,234,567") or without ("1234567"), and an
# optional decimal part. A minus must touch the digits, so "10 - 5" ends in "5",
# and the look-behind keeps "10-3" from reading as "-3" and "v2.5" as ".5".
_NUMBER = r"(?<![\w.])(?:-\$?|\$\s?-?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
# "####", then optional spaces, markdown bold or a dollar sign, then the number.
_HASH_MARKER_RE = re.compile(r"####[\s*:]*(" + _NUMBER + ")")
# "The answer is", then an optional colon, spaces or markdown bold, then the number.
_ANSWER_IS_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is[\s:*]*(" + _NUMBER + ")", re.IGNORECASE)


def normalize_number(text: str | None) -> str | None:
    """Return the canonical form of one number written as text.

    Commas, dollar signs, surrounding spaces, a trailing ``%`` or period and inner
    spaces after the sign are removed. Integral values lose their decimal part
    (``"12.0"`` becomes ``"12"``), other decimals lose trailing zeros (``"0.50"``
    becomes ``"0.5"``) and ``"-0"`` becomes ``"0"``.

    Args:
        text: a number such as ``"-1,234.50"`` or ``"$12"``, or None.

    Returns:
        The canonical decimal string, or None when ``text`` is None or not a number.
    """
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    cleaned = cleaned.rstrip("%.")
    if not cleaned:
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    # format(..., "f") avoids the exponent notation that Decimal.normalize() can produce.
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """Extract the final numeric answer from a model output or a GSM8K solution.

    The search order is: the first number right after a ``####`` marker, then the
    first number right after "The answer is" (case-insensitive, "The final answer
    is" too), then the last number anywhere in the text. Units, currency signs,
    percent signs and sentence periods around the number are ignored.

    Args:
        text: generated text or a reference solution.

    Returns:
        The number in the form of :func:`normalize_number`, or None when the text
        contains no number.

    Example:
        >>> extract_number("She pays $1,234.50 in total.\\n#### 1,234.50")
        '1234.5'
        >>> extract_number("The answer is -7 degrees.")
        '-7'
        >>> extract_number("no digits here") is None
        True
    """
    for marker in (_HASH_MARKER_RE, _ANSWER_IS_RE):
        match = marker.search(text)
        if match is not None:
            return normalize_number(match.group(1))
    numbers = _NUMBER_RE.findall(text)
    if not numbers:
        return None
    return normalize_number(numbers[-1])


def numbers_match(a: str | None, b: str | None) -> bool:
    """Return whether two numbers written as text have the same value.

    Both sides go through :func:`normalize_number`, so ``numbers_match("1,000",
    "1000.0")`` is True. A side that is None or not a number never matches.

    Args:
        a: a number as text (for example an extracted prediction), or None.
        b: a number as text (for example the gold answer), or None.

    Returns:
        True when both parse and are equal as decimals.
    """
    left = normalize_number(a)
    right = normalize_number(b)
    if left is None or right is None:
        return False
    return Decimal(left) == Decimal(right)
