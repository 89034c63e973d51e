"""PII scrubbing: each match is replaced by a typed placeholder and counted.

Numbers that carry a checksum are replaced only when the checksum holds: Chinese resident ID numbers
(GB 11643, ISO 7064 mod 11-2) and payment cards (Luhn). That keeps verse numbers, dates, prices and
order numbers intact. Patterns run in a fixed order (email, ID, card, IP, phone) so that a longer, more
specific match is claimed before a phone pattern could take part of it.
"""

from __future__ import annotations

import collections
import re

PLACEHOLDERS = {"email": "<EMAIL>", "cn_id": "<ID_NUMBER>", "card": "<CARD_NUMBER>", "ip": "<IP_ADDRESS>",
                "phone": "<PHONE>"}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_CN_ID = re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx](?![0-9A-Za-z])")
# Card numbers start with an issuer digit 2-6 (Mastercard, Amex, Visa, Discover, UnionPay, JCB); this also
# keeps a Chinese mobile number with its 86 country code from passing as a card that happens to Luhn-check.
_CARD = re.compile(r"(?<![\d+-])[2-6](?:[ -]?\d){11,17}\d(?![\d-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IP = re.compile(
    rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.])"
    r"|(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![:\w])"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:\+?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)"  # Chinese mobile, 11 digits
    r"|(?<![\w+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}(?!\d)"  # international
    r"|(?<![\w(])\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}(?!\d)|(?<![\w-])\d{3}[.-]\d{3}[.-]\d{4}(?![\w-])"  # North American
)

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def cn_id_valid(number: str) -> bool:
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == number[17].upper()


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        d = int(d) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card(match: re.Match) -> bool:
    digits = re.sub(r"[ -]", "", match.group())
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


_RULES = (
    ("email", _EMAIL, None),
    ("cn_id", _CN_ID, lambda m: cn_id_valid(m.group())),
    ("card", _CARD, _card),
    ("ip", _IP, None),
    ("phone", _PHONE, None),
)


def scrub(text: str) -> tuple[str, collections.Counter]:
    """Returns the text with PII replaced, and how many of each kind were replaced."""
    counts: collections.Counter = collections.Counter()
    for kind, pattern, valid in _RULES:
        def replace(m: re.Match, kind=kind, valid=valid) -> str:
            if valid is not None and not valid(m):
                return m.group()
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(replace, text)
    return text, counts
