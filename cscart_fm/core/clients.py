"""The clients file (contract §3): read once at start, every mistake reported at once.

Operators keep one YAML file of clients. Every mistake in it stops the service at start with
one line per mistake naming the client and the field; nothing is half-applied. API keys are
never written in the file in clear: ``api_key: ${ENV_NAME}`` or ``api_key_file: PATH``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cscart_fm.core.errors import SettingsError, UnknownClient
from schemas.settings import ClientSettings

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


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
