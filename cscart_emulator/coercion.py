"""PHP's value coercion, as CS-Cart applies it to what a request sends and what it answers.

The bridge must survive a store that reads ``"N"`` as true and ``"12abc"`` as 12, so the double
reads request values the same way, in one place.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

_INT_PREFIX = re.compile(r"\s*[+-]?\d+")
_NUMERIC = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")
_KEY_RE = re.compile(r"^([^\[]+)((?:\[[^\]]*\])*)")
_SUBKEY_RE = re.compile(r"\[([^\]]*)\]")
_CANON_INT = re.compile(r"^(0|-?[1-9]\d*)$")

_T = TypeVar("_T")


def php_truthy(value: Any) -> bool:
    """PHP's !empty(): "", "0", 0, false, null and empty arrays are off; "N" is ON."""
    if value is None or value is False:
        return False
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        return value not in ("", "0")
    if isinstance(value, list | dict):
        return len(value) > 0
    return True


def php_int(value: Any) -> int:
    """PHP's intval(): leading digits of a string, 0 for anything else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value == value and abs(value) != float("inf") else 0
    if isinstance(value, str):
        if _NUMERIC.match(value):
            stripped = value.strip()
            return int(stripped) if stripped.lstrip("+-").isdigit() else int(float(stripped))
        m = _INT_PREFIX.match(value)
        return int(m.group()) if m else 0
    if isinstance(value, list | dict):
        return 1 if value else 0
    return 0


def php_str(value: Any) -> str:
    """PHP's (string) cast: null and false are "", true is "1", an array is "Array"."""
    if value is None or value is False:
        return ""
    if value is True:
        return "1"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list | dict):
        return "Array"
    return str(value)


def as_list(value: Any) -> list[Any]:
    """A parameter sent once (``status=P``) or as an array (``status[]=P``), as a list."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return list(value.values())
    return [value]


def param_set(params: Mapping[str, Any], key: str, convert: Callable[[Any], _T]) -> set[_T] | None:
    """The values of a list filter (``status[]=P&status[]=C``); None when it is not given.
    No comma splitting: ``status=P,C`` is the one status "P,C"."""
    if not php_truthy(params.get(key)):
        return None
    return {convert(v) for v in as_list(params[key])}


def param_ids(params: Mapping[str, Any], key: str) -> set[int] | None:
    """An id filter (``order_id``, ``pid``): a list, a comma-separated string, or both."""
    if not php_truthy(params.get(key)):
        return None
    return {php_int(p) for v in as_list(params[key]) for p in php_str(v).split(",") if p.strip()}


def php_parse(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Parse query/form pairs the way PHP fills $_GET: ``a[]=1`` lists, ``a[b]=1`` nesting,
    the last plain ``a=`` wins, and a comma is just a character."""
    root: dict[Any, Any] = {}
    for raw_key, value in pairs:
        m = _KEY_RE.match(raw_key)
        if not m:
            continue  # PHP drops a key with an empty base name
        base = m.group(1).replace(".", "_").replace(" ", "_")
        keys: list[Any] = [base, *_SUBKEY_RE.findall(m.group(2))]
        cur = root
        for i, key in enumerate(keys):
            if i > 0:
                if key == "":
                    ints = [k for k in cur if isinstance(k, int)]
                    key = max(ints) + 1 if ints else 0
                elif _CANON_INT.match(key):
                    key = int(key)  # PHP turns numeric string keys into integers
            if i == len(keys) - 1:
                cur[key] = value
            else:
                nxt = cur.get(key)
                if not isinstance(nxt, dict):
                    nxt = {}
                    cur[key] = nxt
                cur = nxt
    out = _listify(root)
    return out if isinstance(out, dict) else {}


def _listify(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    converted = {k: _listify(v) for k, v in value.items()}
    if converted and list(converted) == list(range(len(converted))):
        return list(converted.values())  # a PHP "list" array: json_encode writes []
    return {str(k): v for k, v in converted.items()}


def phpify(value: Any) -> Any:
    """Empty objects come out of json_encode as []: convert once, when data is stored."""
    if isinstance(value, dict):
        return {k: phpify(v) for k, v in value.items()} if value else []
    if isinstance(value, list | tuple):
        return [phpify(v) for v in value]
    return value


def json_encode(payload: Any) -> bytes:
    # PHP json_encode: compact, non-ASCII as \uXXXX, slashes escaped. "/" only occurs inside
    # strings in JSON text, so a blanket replace is exact.
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    return text.replace("/", "\\/").encode("ascii")


def money(value: Any) -> str:
    """A price as the store keeps it: two decimals, "0.00" for anything unreadable."""
    try:
        return f"{Decimal(php_str(value) or '0'):.2f}"
    except InvalidOperation:
        return "0.00"


def parse_date(value: Any, end_of_day: bool, tz: dt.tzinfo) -> int:
    """fn_parse_date: Unix digits as they are; a/b/c = m/d/Y in the store's time zone
    (00:00:00, or 23:59:59 for the end); anything else is "now"."""
    now = int(time.time())
    text = php_str(value).strip()
    if not text:
        return now
    if _NUMERIC.match(text):
        return int(float(text))
    parts = text.split("/")
    if len(parts) != 3:
        return now
    month, day, year = (php_int(p) for p in parts)
    if year == 0:
        year = dt.datetime.now(tz).year
    # mktime normalises out-of-range months and days
    year += (month - 1) // 12
    month = (month - 1) % 12 + 1
    h, m, s = (23, 59, 59) if end_of_day else (0, 0, 0)
    try:
        base = dt.datetime(year, month, 1, h, m, s, tzinfo=tz)
        return int((base + dt.timedelta(days=day - 1)).timestamp())
    except (ValueError, OverflowError):
        return now
