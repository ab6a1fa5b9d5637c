"""The typed errors of the bridge, each with exactly one fate.

A handler (or the CS-Cart client under it) raises one of these; the consumer runtime reads
``fate`` to decide between a delayed retry and an immediate dead letter, and copies
``error_type``, ``reason`` and ``action`` into the dead letter's headers for support staff.

Reasons are built from status codes, field names and ids: never from a credential, and never
from a shopper's personal data, because they end up in logs, metrics and dead letters.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class Fate(StrEnum):
    RETRY = "retry"  # transient: try again later, then dead-letter after the last attempt
    DEAD_LETTER = "dead-letter"  # permanent: a person has to act first


class BridgeError(Exception):
    """Base of every error whose fate the runtime knows."""

    error_type: ClassVar[str] = "internal-error"
    fate: ClassVar[Fate] = Fate.RETRY
    default_action: ClassVar[str] = (
        "An unexpected error in cscart-fm. Retried automatically; if it keeps failing, "
        "hand the dead letter to the developers, then replay it once fixed."
    )

    def __init__(self, reason: str, *, action: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.action = action or self.default_action

    def __str__(self) -> str:
        return f"{self.error_type}: {self.reason}"


# --- the message itself -------------------------------------------------------------------


class InvalidMessage(BridgeError):
    error_type = "invalid-message"
    fate = Fate.DEAD_LETTER
    default_action = (
        "The message does not follow the FM contract (see the reason for the field). Ask the "
        "publisher to fix it; replaying it unchanged fails again. Discard it once FM resent it."
    )


class UnknownClient(BridgeError):
    error_type = "unknown-client"
    fate = Fate.DEAD_LETTER
    default_action = (
        "No client with this client_id in the clients file. Add the client (or correct the "
        "client_id at FM), roll out the settings, then replay the dead letter."
    )


# --- the store ------------------------------------------------------------------------------


class StoreError(BridgeError):
    """Anything the CS-Cart store answered (or failed to answer)."""

    error_type = "store-error"

    def __init__(
        self, reason: str, *, action: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(reason, action=action)
        self.status = status


class StoreUnreachable(StoreError):
    error_type = "store-unreachable"
    fate = Fate.RETRY
    default_action = (
        "The store did not answer (down, timing out or a 5xx from its host). Retried "
        "automatically; if dead-lettered, check the store is up, then replay."
    )


class StoreOutcomeUnknown(StoreUnreachable):
    """A write timed out: it may or may not have happened, so it is never blindly repeated."""

    error_type = "store-outcome-unknown"


class RateLimited(StoreError):
    error_type = "rate-limited"
    fate = Fate.RETRY
    default_action = (
        "The store (or its host) is rate limiting us (HTTP 429). Retried automatically with "
        "backoff; if dead-lettered, lower the client's limits.requests_per_second, then replay."
    )


class BadResponse(StoreError):
    error_type = "bad-response"
    fate = Fate.RETRY
    default_action = (
        "The store answered something that is not the CS-Cart API (an HTML page, broken or "
        "oversized JSON). Check the store_url points at the CS-Cart store, then replay."
    )


class StoreUnauthorized(StoreError):
    error_type = "store-unauthorized"
    fate = Fate.DEAD_LETTER
    default_action = (
        "The store refused the API credentials (HTTP 401). Check api_user is the "
        "administrator's e-mail, the API key is current and API access is allowed for that "
        "user (and that the host passes the Authorization header), then replay."
    )


class StoreForbidden(StoreError):
    error_type = "store-forbidden"
    fate = Fate.DEAD_LETTER
    default_action = (
        "The store says the API user may not do this (HTTP 403): it must be an administrator "
        "with API access. Fix the user in CS-Cart, then replay."
    )


class StoreRefused(StoreError):
    error_type = "store-refused"
    fate = Fate.DEAD_LETTER
    default_action = (
        "The store refused the request as invalid (see the reason). Check the order or "
        "product in CS-Cart and the client's settings, then replay."
    )


class NotFound(StoreError):
    error_type = "not-found"
    fate = Fate.DEAD_LETTER
    default_action = (
        "The order or product named in the message does not exist in the store. Check the "
        "order number and the client's prefix, create or fix it in CS-Cart, then replay."
    )


class StoreMismatch(BridgeError):
    """The event and the store disagree (a SKU not on the order, more shipped than ordered)."""

    error_type = "store-mismatch"
    fate = Fate.DEAD_LETTER
    default_action = (
        "The event does not match what the store holds (see the reason). Correct the order in "
        "CS-Cart or the consignment in FM, then replay."
    )


class Busy(BridgeError):
    """Another replica holds the lock for this client and did not let go in time."""

    error_type = "busy"
    fate = Fate.RETRY
    default_action = (
        "Another replica was working on the same client for a long time. Retried "
        "automatically; if dead-lettered, check for a stuck replica, then replay."
    )


class SettingsError(Exception):
    """The clients file or the environment is wrong: the service refuses to start."""


ERROR_TYPES: tuple[type[BridgeError], ...] = (
    BridgeError,
    InvalidMessage,
    UnknownClient,
    StoreUnreachable,
    StoreOutcomeUnknown,
    RateLimited,
    BadResponse,
    StoreUnauthorized,
    StoreForbidden,
    StoreRefused,
    NotFound,
    StoreMismatch,
    Busy,
)
"""Every error type, for documentation, runbooks and tests (one fate each)."""
