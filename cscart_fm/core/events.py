"""Decoding a message body into the contract's model: the runtime's decode and validate steps.

Anything the contract does not allow is an ``InvalidMessage`` naming the field, so the dead
letter tells FM's developers what to fix.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from cscart_fm.core.errors import InvalidMessage
from schemas.messages import EVENT_TYPES, Message

MAX_BODY_BYTES = 16 * 1024 * 1024
"""A message larger than this is refused before parsing (a 10,000-item snapshot is ~1 MB)."""

M = TypeVar("M", bound=Message)


def _describe(error: ErrorDetails) -> str:
    loc = ".".join(str(part) for part in error["loc"]) or "(body)"
    return f"{loc}: {error['msg'].removeprefix('Value error, ')}"


def decode_json(body: bytes | str) -> dict[str, Any]:
    """The body as a JSON object, or InvalidMessage saying why not."""
    if isinstance(body, str):
        body = body.encode("utf-8", errors="surrogatepass")
    if len(body) > MAX_BODY_BYTES:
        raise InvalidMessage(f"body is {len(body)} bytes, over the {MAX_BODY_BYTES} limit")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"body is not UTF-8 (byte {exc.start})") from None
    try:
        document = json.loads(text)
    except RecursionError:
        raise InvalidMessage("body is nested too deeply to be a contract message") from None
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"body is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(document, dict):
        raise InvalidMessage(f"body is a JSON {type(document).__name__}, expected an object")
    return document


def type_name(model: type[Message]) -> str:
    """The contract's ``type`` of a message model (``"shipment.lodged"``)."""
    return str(model.model_fields["type"].annotation.__args__[0])  # type: ignore[union-attr]


def parse_event(
    body: bytes | str | dict[str, Any],
    expected: type[M] | tuple[type[Message], ...] | None = None,
) -> M:
    """Decode and validate one message; ``expected`` narrows the accepted type(s).

    Raises InvalidMessage naming the field for anything the contract does not allow.
    """
    if isinstance(body, dict):
        document, body = body, json.dumps(body)
    else:
        document = decode_json(body)
    kind = document.get("type")
    accepted = expected if isinstance(expected, tuple) else (expected,) if expected else None
    models = EVENT_TYPES if accepted is None else {type_name(m): m for m in accepted}
    model = models.get(kind) if isinstance(kind, str) else None
    if model is None:
        if accepted is None or not isinstance(kind, str) or kind not in EVENT_TYPES:
            raise InvalidMessage(f"type: unknown message type {str(kind)[:60]!r}")
        names = " or ".join(repr(name) for name in models)
        raise InvalidMessage(f"type: {kind!r} does not belong on this queue (expected {names})")
    version = document.get("version")
    if version != 1 or isinstance(version, bool):
        raise InvalidMessage(f"version: unsupported version {str(version)[:20]!r} of {kind}")
    try:
        # Validated from the JSON text: strict JSON mode takes ISO times as strings but still
        # refuses "2" for a quantity and 1.5 for money.
        return model.model_validate_json(body)  # type: ignore[return-value]
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        shown = "; ".join(_describe(error) for error in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InvalidMessage(f"{shown}{more}") from None
