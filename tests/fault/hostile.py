"""Hypothesis strategies for hostile messages on ``fm.events``: bodies and headers FM (or
anyone with access to the exchange) could send that the contract does not allow.

Every strategy is explicit (pydantic v2 has no hypothesis plugin). Sizes are drawn as small
numbers and the large payloads built from them, so hypothesis never has to generate megabytes
itself; a byte budget keeps a 10,000-message run to a few hundred megabytes on the broker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from tests.support.amqp_values import RawTimestamp
from tests.support.broker import shipment_event

ROUTING_KEYS: tuple[str, ...] = ("order-poll.tick", "shipment.lodged", "stock.snapshot")
KNOWN_CLIENT = "ACME"

CATEGORIES: tuple[str, ...] = (
    "empty-body",
    "bad-json",
    "non-utf8",
    "wrong-types",
    "missing-fields",
    "huge-field",
    "oversized-body",
    "unknown-client",
    "deep-nesting",
    "giant-array",
    "wrong-queue",
    "not-an-object",
    "odd-but-valid",
)


@dataclass
class Budget:
    """Caps on the large messages of one run."""

    max_bytes: int
    max_oversized: int = 2
    used_bytes: int = 0
    oversized: int = 0

    def allow(self, n: int) -> bool:
        if self.used_bytes + n > self.max_bytes:
            return False
        self.used_bytes += n
        return True


@dataclass
class Hostile:
    category: str
    routing_key: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)


def template(kind: str, client_id: str = KNOWN_CLIENT, n: int = 0) -> dict[str, Any]:
    """A valid message of each type (contract §2)."""
    base: dict[str, Any] = {"version": 1, "event_id": f"hostile-{kind}-{n}",
                            "client_id": client_id}
    if kind == "order-poll.tick":
        return {**base, "type": "order-poll.tick", "issued_at": "2026-11-22T10:00:00+00:00"}
    if kind == "shipment.lodged":
        return shipment_event(
            f"FM-HOSTILE-{n}",
            **base,
            order_no=f"CS{9_000_000 + n}",
            cart_order_id=9_000_000 + n,
            tracking_url="https://auspost.com.au/mypost/track/#/details/33ABC1234567",
            backordered=[{"sku": "Test003", "quantity": 1}],
        )
    return {
        **base,
        "type": "stock.snapshot",
        "taken_at": "2026-11-23T02:00:00+11:00",
        "items": [{"sku": "Test001", "on_hand": 25, "available": 20},
                  {"sku": "Test002", "on_hand": 3, "available": -2}],
    }


def _dump(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)

# Field paths of each type whose value a strategy may replace.
PATHS: dict[str, list[tuple[Any, ...]]] = {
    "order-poll.tick": [("type",), ("version",), ("event_id",), ("client_id",), ("issued_at",)],
    "shipment.lodged": [
        ("type",), ("version",), ("event_id",), ("client_id",), ("order_no",),
        ("cart_order_id",), ("shipment_ref",), ("tracking_number",), ("carrier",),
        ("tracking_url",), ("lodged_at",), ("lines",), ("lines", 0), ("lines", 0, "sku"),
        ("lines", 0, "quantity"), ("backordered",), ("backordered", 0, "quantity"),
    ],
    "stock.snapshot": [
        ("type",), ("version",), ("event_id",), ("client_id",), ("taken_at",), ("items",),
        ("items", 0), ("items", 0, "sku"), ("items", 0, "on_hand"), ("items", 1, "available"),
    ],
}
STRING_PATHS: dict[str, list[tuple[Any, ...]]] = {
    "order-poll.tick": [("event_id",), ("client_id",), ("issued_at",)],
    "shipment.lodged": [("event_id",), ("order_no",), ("shipment_ref",), ("tracking_number",),
                        ("carrier",), ("tracking_url",), ("lines", 0, "sku")],
    "stock.snapshot": [("event_id",), ("taken_at",), ("items", 0, "sku")],
}


def _set(document: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    target: Any = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return document


def _nested(depth: int, leaf: Any, kind: str) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "array" else {"a": value}
    return value


def _nested_text(depth: int, kind: str) -> bytes:
    # Built as text: json.dumps itself would hit the recursion limit.
    opening, closing = ("[", "]") if kind == "array" else ('{"a":', "}")
    return (opening * depth + "1" + closing * depth).encode()


# Header values a publisher may write and the consumer must survive: timestamps in any 64-bit
# range (milliseconds where seconds belong overflow Python's datetime), nested tables and
# arrays of them, bytes, decimals, and the headers the service itself writes, forged.
header_values = st.recursive(
    st.one_of(
        st.builds(RawTimestamp, st.integers(0, 2**64 - 1)),
        st.builds(RawTimestamp, st.sampled_from([1796352000000, 253402300800, 2**63, 0])),
        st.binary(max_size=40),
        st.decimals(allow_nan=False, allow_infinity=False, places=2,
                    min_value=-(10**6), max_value=10**6),
        st.booleans(),
        st.none(),
        st.integers(-(2**63), 2**63 - 1),
        st.text(max_size=40),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.text(min_size=1, max_size=10), children, max_size=3),
    ),
    max_leaves=6,
)
FORGED = {
    "cscart-original-exchange": st.sampled_from(["fm.orders", "", "amq.topic", "x" * 300]),
    "cscart-original-routing-key": st.sampled_from(["order.imported", "#", ""]),
    "cscart-error-type": st.sampled_from(["store-unreachable", "", "internal-error"]),
    "cscart-client-id": st.sampled_from(["ACME", "", "\x1b]0;title\x07"]),
    "cscart-replay-count": st.sampled_from([-1, 10**12, "many", None]),
    "x-death": st.sampled_from([[], [{"count": "x", "time": RawTimestamp(2**63)}], "no"]),
}


@st.composite
def hostile_headers(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Headers and properties that should not matter (or at least not hurt)."""
    if not draw(st.booleans()):
        return {}, {"content_type": "application/json"}
    headers: dict[str, Any] = {}
    if draw(st.booleans()):
        headers["cscart-attempt"] = draw(
            st.sampled_from(["abc", -5, 0, 2**62, 3.5, None, "", [1, 2], {"x": 1}])
        )
    if draw(st.booleans()):
        headers["schema"] = draw(st.sampled_from(["shipment.lodged/9", "", "x" * 300]))
    if draw(st.booleans()):
        headers[draw(st.text(min_size=1, max_size=20))] = draw(json_scalars.filter(
            lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63))
    for name in draw(st.lists(st.text(min_size=1, max_size=20), max_size=3)):
        headers[name] = draw(header_values)
    for name in draw(st.lists(st.sampled_from(sorted(FORGED)), max_size=3, unique=True)):
        headers[name] = draw(FORGED[name])
    properties: dict[str, Any] = {
        "content_type": draw(st.sampled_from(
            ["application/json", "text/plain", "application/octet-stream", ""])),
    }
    if draw(st.booleans()):
        properties["content_encoding"] = draw(st.sampled_from(["utf-8", "gzip", "latin-1"]))
    if draw(st.booleans()):
        properties["timestamp"] = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        properties["priority"] = draw(st.integers(0, 255))
    for name in ("correlation_id", "reply_to", "app_id", "type", "expiration"):
        if draw(st.integers(0, 4)) == 0:
            properties[name] = draw(
                st.sampled_from(["3600000", "x" * 255, "\x1b[2J", "é", ""])
                if name != "expiration" else st.sampled_from(["3600000", "86400000"])
            )
    return headers, properties


@st.composite
def hostile_message(draw: st.DrawFn, budget: Budget) -> Hostile:
    routing_key = draw(st.sampled_from(ROUTING_KEYS))
    category = draw(st.sampled_from(CATEGORIES))
    n = draw(st.integers(min_value=0, max_value=10**6))
    document = template(routing_key, n=n)
    body: bytes

    if category == "empty-body":
        body = b""
    elif category == "bad-json":
        choice = draw(st.integers(0, 4))
        text = _dump(document)
        if choice == 0:
            body = draw(st.binary(max_size=300))
        elif choice == 1:
            body = text[: draw(st.integers(0, max(0, len(text) - 1)))]
        elif choice == 2:
            body = text + draw(st.sampled_from([b"}", b"x", b",", b"\x00", b"{}"]))
        elif choice == 3:
            body = text.replace(b'"version": 1', b'"version": NaN').replace(
                b'"quantity": 2', b'"quantity": Infinity')
        else:
            body = b"{'type': 'shipment.lodged', 'version': 1}"  # Python, not JSON
    elif category == "non-utf8":
        choice = draw(st.integers(0, 3))
        if choice == 0:
            body = json.dumps(document).encode("utf-16")
        elif choice == 1:
            path = draw(st.sampled_from(STRING_PATHS[routing_key]))
            marker = "\u00e9\u00e8-MARK"
            body = _dump(_set(document, path, marker)).replace(
                marker.encode("utf-8"), draw(st.sampled_from([b"\xff\xfe", b"\xe9\xe8", b"\xc3"])))
        elif choice == 2:
            body = _dump(document).replace(b"{", b"\xef\xbb\xbf{", 1)  # a UTF-8 BOM
        else:
            body = json.dumps(document).encode("utf-32")
    elif category == "wrong-types":
        path = draw(st.sampled_from(PATHS[routing_key]))
        replacement = draw(json_values)
        try:
            _set(document, path, replacement)
        except (IndexError, KeyError, TypeError):
            document[path[0]] = replacement
        body = _dump(document)
    elif category == "missing-fields":
        keys = sorted(document)
        gone = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=len(keys), unique=True))
        for key in gone:
            del document[key]
        body = _dump(document)
    elif category == "huge-field":
        length = draw(st.sampled_from([1_001, 2_001, 70_000, 1_100_000, 3_000_000]))
        if not budget.allow(length):
            length = 1_001
        path = draw(st.sampled_from(STRING_PATHS[routing_key]))
        fill = draw(st.sampled_from(["x", "é", "\U0001f4e6", "\x00"]))
        body = _dump(_set(document, path, fill * length))
    elif category == "oversized-body":
        if budget.oversized < budget.max_oversized and budget.allow(17 * 1024 * 1024):
            budget.oversized += 1
            body = _dump(_set(document, ("event_id",), "z" * (17 * 1024 * 1024)))
        else:  # over the budget: a large, legal-size body with a bad field instead
            body = _dump(_set(document, ("version",), "1" * 100_000))
    elif category == "unknown-client":
        client = draw(st.text(min_size=1, max_size=64).filter(
            lambda c: c.strip() and c.strip() != KNOWN_CLIENT))
        document["client_id"] = client
        body = _dump(document)
    elif category == "deep-nesting":
        depth = draw(st.sampled_from([40, 300, 2_000, 100_000]))
        kind = draw(st.sampled_from(["array", "object"]))
        if draw(st.booleans()):
            body = _nested_text(depth, kind)  # the whole body
        else:
            path = draw(st.sampled_from(PATHS[routing_key]))
            inner = _nested_text(depth, kind).decode()
            marker = "NESTING-MARKER-7f1"
            try:
                _set(document, path, marker)
            except (IndexError, KeyError, TypeError):
                document[path[0]] = marker
            body = _dump(document).replace(f'"{marker}"'.encode(), inner.encode())
    elif category == "giant-array":
        length = draw(st.sampled_from([10_001, 100_001, 250_000]))
        if not budget.allow(length * 45):
            length = 10_001
        key = {"order-poll.tick": "issued_at", "shipment.lodged": "lines",
               "stock.snapshot": "items"}[routing_key]
        element = draw(st.sampled_from(["item", "int", "null"]))
        if element == "item":
            one = ({"sku": "Test001", "quantity": 1} if routing_key != "stock.snapshot"
                   else {"sku": "Test001", "on_hand": 1, "available": 1})
            value: Any = [one] * length
        elif element == "int":
            value = list(range(length))
        else:
            value = [None] * length
        document[key] = value
        body = _dump(document)
    elif category == "wrong-queue":
        other = draw(st.sampled_from([k for k in ROUTING_KEYS if k != routing_key]
                                     + ["order.imported"]))
        if other == "order.imported":
            body = _dump({"type": "order.imported", "version": 1, "event_id": f"x-{n}",
                          "client_id": KNOWN_CLIENT})
        else:
            body = _dump(template(other, n=n))
    elif category == "not-an-object":
        body = _dump(draw(st.one_of(
            st.lists(json_scalars, max_size=5), json_scalars,
            st.just([template(routing_key, n=n)]),
        )))
    else:  # odd-but-valid: contract-valid messages with strange content
        if routing_key == "shipment.lodged":
            document["carrier"] = draw(st.text(max_size=40))
            document["tracking_number"] = draw(st.text(max_size=40))
            document["shipment_ref"] = draw(st.text(min_size=1, max_size=60).filter(
                lambda s: s.strip()))
        elif routing_key == "stock.snapshot":
            document["items"] = [
                {"sku": draw(st.text(min_size=1, max_size=30)),
                 "on_hand": draw(st.integers(-10_000_000, 10_000_000)),
                 "available": draw(st.integers(-10_000_000, 10_000_000))}
                for _ in range(draw(st.integers(1, 5)))
            ]
        else:
            document["issued_at"] = draw(st.sampled_from(
                ["1970-01-01T00:00:00+00:00", "2999-12-31T23:59:59+14:00",
                 "2026-11-22T10:00:00-12:00"]))
        document["event_id"] = draw(st.text(min_size=1, max_size=80).filter(lambda s: s.strip()))
        body = _dump(document)

    headers, properties = draw(hostile_headers())
    return Hostile(category, routing_key, body, headers, properties)
