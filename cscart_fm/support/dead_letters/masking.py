"""Shoppers' personal data in dead letters, masked in every view unless revealed.

Names, e-mails, phones and addresses are masked unless a view asks for ``reveal=True``
(``cscart-fm dlq show --reveal``, the console's audited "Reveal"). Field names are matched
whatever their case or separators (``shipTo``, ``Customer``, ``NOTES``), an object the
contract's messages do not have is masked whole (a message's own invention may hold anything),
and e-mail addresses anywhere are masked. Registered secrets are hidden even when revealed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cscart_fm.core.observability import hide_secrets, mask_email


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_PERSONAL_SECTIONS = frozenset(
    {"customer", "shipto", "billto", "shippingaddress", "billingaddress"}
)
_KEEP_IN_SECTIONS = frozenset({"country", "state"})
_FREE_TEXT = frozenset({"notes", "customernotes", "comment", "comments"})
_SAFE_OBJECTS = frozenset({"lines", "items", "backordered", "totals"})
"""Objects of the contract's messages that hold no personal data (SKUs, quantities, money)."""
_NAMES = frozenset({"name", "firstname", "lastname", "company"})


def _mask_name(text: str) -> str:
    return " ".join(f"{part[0]}***" for part in text.split() if part)


def _mask_field(name: str, value: Any) -> Any:
    if not isinstance(value, str) or not value:
        return value
    key = _norm(name)
    if "email" in key:
        masked = mask_email(value)
        return masked if masked != value else "***"
    if "phone" in key:
        digits = [ch for ch in value if ch.isdigit()]
        return "***" + "".join(digits[-2:])
    if key in _NAMES:
        return _mask_name(value)
    return "***"


def _mask_whole(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _mask_whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_whole(item) for item in value]
    return "***" if isinstance(value, str) and value else value


def mask_payload(document: Any, _key: str = "", *, _top: bool = True) -> Any:
    """A copy of a message body with shoppers' personal data masked (names to initials,
    e-mails to ``j***@example.com``, phones to their last two digits, addresses and any object
    the contract does not have to ``***``); e-mail addresses anywhere else are masked too."""
    if isinstance(document, Mapping):
        if not _top and _norm(_key) not in _SAFE_OBJECTS:
            return _mask_whole(document)
        masked: dict[str, Any] = {}
        for name, value in document.items():
            key = _norm(str(name))
            if key in _PERSONAL_SECTIONS and isinstance(value, Mapping):
                masked[str(name)] = {
                    k: v if _norm(str(k)) in _KEEP_IN_SECTIONS else _mask_field(str(k), v)
                    for k, v in value.items()
                }
            elif key in _FREE_TEXT and isinstance(value, str) and value:
                masked[str(name)] = "***"
            elif ("email" in key or "phone" in key) and isinstance(value, str):
                masked[str(name)] = _mask_field(key, value)
            else:
                masked[str(name)] = mask_payload(value, str(name), _top=False)
        return masked
    if isinstance(document, list):
        # The objects of a list are as safe as the list's name says (``lines``: yes).
        safe = _norm(_key) in _SAFE_OBJECTS
        return [mask_payload(item, _key, _top=safe) for item in document]
    if isinstance(document, str):
        return mask_email(document)
    return document


def scrub(value: Any, *, reveal: bool) -> Any:
    """Headers and properties as shown: secrets always hidden, e-mails masked unless
    revealed (their structure is the broker's and the runtime's, kept as it is)."""
    if isinstance(value, Mapping):
        return {str(k): scrub(v, reveal=reveal) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(item, reveal=reveal) for item in value]
    if isinstance(value, str):
        hidden = hide_secrets(value)
        return hidden if reveal else mask_email(hidden)
    return value
