"""What every resource's handlers share: the call they are given, CS-Cart's paging, sorting
and echo of the request's params, and the 404 for an unknown id."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..coercion import php_int, php_str
from ..http import error
from ..model import Store

_R = TypeVar("_R")

Reply = tuple[int, Any]  # status, the JSON payload


@dataclass(frozen=True, slots=True)
class Call:
    """One routed request: the id in its path, its query params, its body."""

    ident: str | None
    params: dict[str, Any]
    data: dict[str, Any]

    @property
    def number(self) -> int:
        """The id as a number (routing lets only digits through, but for combinations)."""
        return int(self.ident or 0)


Handler = Callable[[Store, Call], Reply]


def found(record: _R | None, view: Callable[[_R], Any]) -> Reply:
    return (404, error(404)) if record is None else (200, view(record))


def note_ignored(store: Store, endpoint: str, call: Call, allowed: tuple[str, ...]) -> None:
    """A write's keys the store does not take: CS-Cart drops them silently, a test may ask."""
    ignored = [k for k in call.data if k not in allowed]
    if ignored:
        store.ignored_fields.append((endpoint, call.ident or "", ignored))


def paging(params: Mapping[str, Any], default: int | None = 10) -> tuple[int, int]:
    """(page, items_per_page); items_per_page 0 = everything in one response."""
    raw = params.get("items_per_page")
    ipp = (default or 0) if raw is None else max(0, php_int(raw))
    page = max(1, php_int(params.get("page", 1)))
    return page, ipp


def page_of(rows: list[_R], page: int, ipp: int) -> list[_R]:
    return rows[(page - 1) * ipp : page * ipp] if ipp else rows


def echo(params: Mapping[str, Any], page: int, ipp: int, total: int, **more: Any) -> dict[str, Any]:
    """The ``params`` a list answers with: the request's own, then the paging as strings."""
    out = {k: v for k, v in params.items() if v != {}}
    out.update(more)
    out["page"] = str(page)
    out["items_per_page"] = str(ipp)
    if ipp:
        out["total_items"] = str(total)
    else:
        out.pop("total_items", None)
    return out


def listing(
    name: str,
    rows: list[_R],
    params: Mapping[str, Any],
    view: Callable[[_R], Any],
    *,
    clamp: bool = False,
) -> Reply:
    """A list in the order given, one page of it. ``clamp``: a page past the end is the last
    page again (db_paginate does that for shipments); otherwise it is empty."""
    page, ipp = paging(params)
    total = len(rows)
    if clamp and ipp:
        page = min(page, max(1, -(-total // ipp)))
    rows = page_of(rows, page, ipp)
    return 200, {name: [view(r) for r in rows], "params": echo(params, page, ipp, total)}


def sorted_page(
    rows: list[_R],
    params: Mapping[str, Any],
    keys: Mapping[str, Callable[[_R], Any]],
    default_by: str,
    default_order: str,
) -> tuple[list[_R], dict[str, Any]]:
    """One page sorted by ``sort_by`` (an unknown one is the default) and ``sort_order``
    (anything but the other order is the default), and the echo naming both."""
    sort_by = php_str(params.get("sort_by")) or default_by
    if sort_by not in keys:
        sort_by = default_by
    other = "asc" if default_order == "desc" else "desc"
    sort_order = other if php_str(params.get("sort_order")).lower() == other else default_order
    page, ipp = paging(params)
    selected = _select(rows, keys[sort_by], sort_order == "desc", page, ipp)
    return selected, echo(params, page, ipp, len(rows), sort_by=sort_by, sort_order=sort_order)


def _select(
    rows: list[_R], key: Callable[[_R], Any], reverse: bool, page: int, ipp: int
) -> list[_R]:
    """One page of rows sorted by key, without sorting everything for an early page."""
    if ipp == 0:
        return sorted(rows, key=key, reverse=reverse)
    start = (page - 1) * ipp
    if start >= len(rows):
        return []
    need = start + ipp
    if need * 8 < len(rows):
        pick = heapq.nlargest if reverse else heapq.nsmallest
        return pick(need, rows, key=key)[start:need]
    return sorted(rows, key=key, reverse=reverse)[start:need]
