"""The settings of one client (the "master settings" of contract §3).

Loading the file (secrets, one line per mistake naming the client and the field) is the
core's: ``cscart_fm.core.clients``.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
)

_START_DATE = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")


def _parse_start_date(value: Any) -> date:
    """dd/MM/yyyy, as the client documents write it. An ISO date is refused on purpose:
    22/11 and 11/22 must never be guessed."""
    # Messages never quote the value: a file's mistakes are printed and logged.
    if isinstance(value, datetime | date) or not isinstance(value, str):
        raise ValueError("expected a date as dd/MM/yyyy (e.g. 22/11/2026)")
    match = _START_DATE.match(value.strip())
    if not match:
        raise ValueError("expected a date as dd/MM/yyyy (e.g. 22/11/2026)")
    day, month, year = (int(part) for part in match.groups())
    try:
        return date(year, month, day)
    except ValueError as exc:
        raise ValueError(f"not a real date ({exc})") from None


StartDate = Annotated[date, BeforeValidator(_parse_start_date)]


class _Section(BaseModel):
    # A typo in an operator's file (``shiped_status``) must be reported, not ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class OrderSettings(_Section):
    statuses: list[str] = Field(default_factory=lambda: ["P"], min_length=1)
    """Which orders to pull: status letters (``P``) or names (``Processed``), resolved
    against the store's own list of statuses."""
    start_date: StartDate
    """Orders placed before 00:00 of this day (in ``timezone``) are never pulled."""
    timezone: str = "UTC"
    prefix: str = ""
    countries: list[str] = Field(default_factory=list)
    """ISO 3166 alpha-2 codes of the ship-to country; empty = every country."""
    test_skus: list[str] = Field(default_factory=lambda: ["Test001", "Test002", "Test003"])
    status_lookback_days: int = Field(default=30, ge=0, le=3650)
    """An order placed up to this many days before now that enters a pulled status later
    (paid after placement) is still imported."""
    poll_interval_seconds: int = Field(default=300, ge=10)
    """How often the tick producer asks for a poll of this client."""

    @field_validator("statuses")
    @classmethod
    def _statuses_not_blank(cls, value: list[str]) -> list[str]:
        cleaned = [str(item).strip() for item in value]
        if any(not item for item in cleaned):
            raise ValueError("a status is blank")
        return cleaned

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                "unknown time zone (use an IANA name such as Australia/Sydney)"
            ) from None
        return value

    @field_validator("countries", mode="before")
    @classmethod
    def _iso_countries(cls, value: Any) -> Any:
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValueError("expected a list of ISO 3166 alpha-2 codes, e.g. [AU, NZ]")
        codes = [str(item).strip().upper() for item in value]
        for index, code in enumerate(codes):
            if not _COUNTRY.match(code):
                raise ValueError(f"item {index + 1} is not an ISO 3166 alpha-2 country code")
        return codes

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def start_datetime(self) -> datetime:
        """00:00 of the start date in the store's time zone (DST-aware)."""
        return datetime(
            self.start_date.year, self.start_date.month, self.start_date.day, tzinfo=self.zone
        )

    def order_id(self, order_no: str) -> int | None:
        """The CS-Cart order id in an order number: the prefix (its case ignored, as people
        and FM write it) followed by the id's digits; None when it is not one."""
        number = order_no.strip()
        if self.prefix:
            if not number.casefold().startswith(self.prefix.casefold()):
                return None
            number = number[len(self.prefix) :].strip()
        if not number.isascii() or not number.isdigit() or int(number) <= 0:
            return None
        return int(number)


class TrackingSettings(_Section):
    update_tracking_number: bool = True
    update_tracking_url: bool = True
    shipped_status: str | None = None
    """Status set when a shipment completes the order; null = leave the status alone."""
    partially_shipped_status: str | None = None
    """Status set when the order has a backorder; null = leave the status alone."""
    notify_customer: bool = False
    """Whether CS-Cart e-mails the shopper about the status change and the shipment."""

    @field_validator("shipped_status", "partially_shipped_status")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return value.strip() or None


class StockSettings(_Section):
    update_stock: bool = False
    quantity: Literal["on_hand", "available"] = "on_hand"
    """``on_hand`` = SOH, the physical stock; ``available`` = SOH less orders in process."""
    negative_as_zero: bool = False


class StoreLimits(_Section):
    """How gently the bridge talks to one store (modest hosting answers 429 or times out)."""

    requests_per_second: float = Field(default=5.0, gt=0, le=1000)
    concurrency: int = Field(default=4, ge=1, le=64)
    connect_timeout: float = Field(default=5.0, gt=0, le=120)
    read_timeout: float = Field(default=20.0, gt=0, le=600)
    attempt_timeout: float = Field(default=25.0, gt=0, le=900)
    """The whole of one attempt (connect, headers and body): a store trickling its answer a
    byte at a time resets the read timeout forever, never this."""
    max_attempts: int = Field(default=3, ge=1, le=10)
    """Attempts of an idempotent call (GET, PUT) on 429, 5xx or a timeout."""
    max_retry_wait: float = Field(default=10.0, ge=0, le=300)
    """Cap on one wait between attempts, Retry-After included."""
    page_size: int = Field(default=100, ge=1, le=1000)
    """Items per page when listing orders and products."""
    max_response_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)


class ClientSettings(_Section):
    client_id: str = Field(min_length=1, max_length=64)
    store_url: str
    api_user: str
    api_key: SecretStr
    user_id: int = Field(gt=0)
    api_entry: Literal["api", "api.php"] = "api"
    """``api`` = ``STORE/api/<entity>``; ``api.php`` for stores without URL rewriting."""
    orders: OrderSettings
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    stock: StockSettings = Field(default_factory=StockSettings)
    limits: StoreLimits = Field(default_factory=StoreLimits)

    @field_validator("store_url")
    @classmethod
    def _plain_http_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http(s) URL such as https://shop.example")
        if parts.username or parts.password:
            # Credentials in a URL end up in tracebacks and logs: refuse them outright.
            raise ValueError("must not contain credentials; use api_user and api_key")
        if parts.query or parts.fragment:
            raise ValueError("must be the store's base URL, without a query or fragment")
        return value.strip().rstrip("/")

    @field_validator("api_user")
    @classmethod
    def _email(cls, value: str) -> str:
        if not _EMAIL.match(value.strip()):
            raise ValueError("expected the e-mail of the CS-Cart administrator with API access")
        return value.strip()
