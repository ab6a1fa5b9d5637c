"""The client settings file (the "master settings" of contract §3) and its loader.

Operators keep one YAML file of clients. Every mistake in it stops the service at start with
one line per mistake naming the client and the field; nothing is half-applied. API keys are
never written in the file in clear: ``api_key: ${ENV_NAME}`` or ``api_key_file: PATH``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from cscart_fm.errors import SettingsError, UnknownClient

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_START_DATE = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")


def _parse_start_date(value: Any) -> date:
    """dd/MM/yyyy, as the client documents write it. An ISO date is refused on purpose:
    22/11 and 11/22 must never be guessed."""
    if isinstance(value, datetime | date) or not isinstance(value, str):
        raise ValueError(f"expected a date as dd/MM/yyyy (e.g. 22/11/2026), got {value!r}")
    match = _START_DATE.match(value.strip())
    if not match:
        raise ValueError(f"expected a date as dd/MM/yyyy (e.g. 22/11/2026), got {value!r}")
    day, month, year = (int(part) for part in match.groups())
    try:
        return date(year, month, day)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a real date ({exc})") from None


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
                f"unknown time zone {value!r} (use an IANA name such as Australia/Sydney)"
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
        for code in codes:
            if not _COUNTRY.match(code):
                raise ValueError(f"{code!r} is not an ISO 3166 alpha-2 country code")
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
            raise ValueError(f"expected an http(s) URL such as https://shop.example, got {value!r}")
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


class Clients(Mapping[str, ClientSettings]):
    """The loaded clients, by client_id."""

    def __init__(self, clients: list[ClientSettings]) -> None:
        self._by_id = {client.client_id: client for client in clients}

    def __getitem__(self, client_id: str) -> ClientSettings:
        return self._by_id[client_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def require(self, client_id: str) -> ClientSettings:
        """The client named by a message, or the typed error that dead-letters it."""
        try:
            return self._by_id[client_id]
        except KeyError:
            raise UnknownClient(
                f"client_id {client_id[:80]!r} is not in the clients file"
            ) from None


# --- loading -------------------------------------------------------------------------------


def _expand(value: Any, environ: Mapping[str, str], where: str, problems: list[str]) -> Any:
    """Replace ``${NAME}`` by the environment's value in every string of the file."""
    if isinstance(value, dict):
        return {
            k: _expand(v, environ, f"{where}.{k}" if where else str(k), problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand(v, environ, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                problems.append(f"{where}: environment variable {name} is not set")
                return ""
            return environ[name]

        return _ENV_REF.sub(substitute, value)
    return value


def _read_api_key(raw: dict[str, Any], environ: Mapping[str, str], problems: list[str]) -> None:
    """Resolve the API key in place from ``${ENV}`` or ``api_key_file``; never from clear text."""
    has_key, has_file = "api_key" in raw, "api_key_file" in raw
    if has_key and has_file:
        problems.append("api_key: give either api_key or api_key_file, not both")
        raw.pop("api_key_file")
        return
    if has_file:
        path = Path(str(raw.pop("api_key_file")))
        try:
            raw["api_key"] = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(f"api_key_file: cannot read {str(path)!r} ({exc.strerror})")
            return
        if not raw["api_key"]:
            problems.append(f"api_key_file: {str(path)!r} is empty")
        return
    if not has_key:
        problems.append("api_key: missing (write api_key: ${ENV_NAME} or api_key_file: PATH)")
        return
    value = raw["api_key"]
    if not isinstance(value, str) or not _ENV_REF.fullmatch(value.strip()):
        problems.append(
            "api_key: must be ${ENV_NAME} or replaced by api_key_file: API keys are never "
            "written in the clients file in clear"
        )
        raw["api_key"] = ""
        return
    expanded = _expand(value.strip(), environ, "api_key", problems)
    if not expanded and not problems:
        problems.append(f"api_key: environment variable in {value.strip()} is empty")
    raw["api_key"] = expanded


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(client)"


def parse_clients(document: Any, environ: Mapping[str, str] | None = None) -> Clients:
    """Validate a parsed clients document; raise SettingsError listing every mistake."""
    environ = os.environ if environ is None else environ
    if not isinstance(document, dict) or not isinstance(document.get("clients"), list):
        raise SettingsError("clients file: expected a top-level 'clients:' list")
    problems: list[str] = []
    clients: list[ClientSettings] = []
    seen: set[str] = set()
    for index, raw in enumerate(document["clients"]):
        if not isinstance(raw, dict):
            problems.append(f"clients[{index}]: expected a mapping of settings")
            continue
        name = str(raw.get("client_id") or f"#{index + 1}")
        own: list[str] = []
        raw = dict(raw)
        _read_api_key(raw, environ, own)
        key = raw.pop("api_key", None)
        raw = _expand(raw, environ, "", own)
        if key is not None:
            raw["api_key"] = key
        try:
            client = ClientSettings.model_validate(raw)
        except ValidationError as exc:
            for error in exc.errors(include_url=False, include_input=False):
                message = error["msg"].removeprefix("Value error, ")
                own.append(f"{_field_path(error['loc'])}: {message}")
        else:
            if client.client_id in seen:
                own.append("client_id: used by another client in the same file")
            seen.add(client.client_id)
            if not own:
                clients.append(client)
        problems.extend(f"client {name}: {problem}" for problem in own)
    if problems:
        raise SettingsError("the clients file has mistakes:\n  " + "\n  ".join(problems))
    return Clients(clients)


def load_clients(path: str | Path, environ: Mapping[str, str] | None = None) -> Clients:
    """Read and validate the clients file named by ``CSCART_FM_CLIENTS``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(
            f"clients file {str(path)!r}: cannot read it ({exc.strerror})"
        ) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SettingsError(f"clients file {str(path)!r}: not valid YAML{where}") from None
    return parse_clients(document, environ)
