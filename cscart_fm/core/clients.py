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
# A mistake is reported by client and field, never by quoting the value: the messages are
# printed and logged, and a value may be a credential typed in the wrong place.

MAX_FILE_BYTES = 1024 * 1024
"""A clients file larger than this is refused unread (a few hundred clients take ~100 KB)."""
MAX_KEY_BYTES = 4096
SECRETS_DIR_ENV = "CSCART_FM_SECRETS_DIR"
DEFAULT_SECRETS_DIR = "/etc/cscart-fm/secrets"
"""Where ``api_key_file`` may point: the mounted Secret, and nothing else on the machine."""
_PLAIN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class _StrictLoader(yaml.SafeLoader):
    """YAML without anchors, aliases or repeated keys: an alias bomb of a few hundred bytes
    expands to gigabytes, and a repeated key silently replaces the first one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&, *) are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, "a key is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_key_file(raw_path: Any, environ: Mapping[str, str], problems: list[str]) -> str:
    """The key in ``api_key_file``: a regular file of at most ``MAX_KEY_BYTES`` inside the
    secrets directory (symbolic links resolved first, as a Secret volume uses them)."""
    directory = Path(environ.get(SECRETS_DIR_ENV, "") or DEFAULT_SECRETS_DIR).resolve()
    if not isinstance(raw_path, str) or not raw_path.strip():
        problems.append("api_key_file: expected the path of a file")
        return ""
    path = Path(raw_path.strip())
    try:
        resolved = path.resolve(strict=True)
        if not resolved.is_relative_to(directory):
            problems.append(
                f"api_key_file: not inside the secrets directory {directory} (set "
                f"{SECRETS_DIR_ENV} to where the keys are mounted)"
            )
            return ""
        if not resolved.is_file():
            problems.append("api_key_file: not a regular file")
            return ""
        with resolved.open("rb") as handle:
            data = handle.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        problems.append(f"api_key_file: cannot read it ({exc.strerror or type(exc).__name__})")
        return ""
    if len(data) > MAX_KEY_BYTES:
        problems.append(f"api_key_file: larger than {MAX_KEY_BYTES} bytes: not an API key")
        return ""
    try:
        key = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        problems.append("api_key_file: not UTF-8 text")
        return ""
    if not key:
        problems.append("api_key_file: the file is empty")
    return key


def _read_api_key(raw: dict[str, Any], environ: Mapping[str, str], problems: list[str]) -> None:
    """Resolve the API key in place from ``${ENV}`` or ``api_key_file``; never from clear text.
    ``${NAME}`` is read in ``api_key`` only: anywhere else it is plain text."""
    has_key, has_file = "api_key" in raw, "api_key_file" in raw
    if has_key and has_file:
        problems.append("api_key: give either api_key or api_key_file, not both")
        raw.pop("api_key_file")
        return
    if has_file:
        raw["api_key"] = _read_key_file(raw.pop("api_key_file"), environ, problems)
        return
    if not has_key:
        problems.append("api_key: missing (write api_key: ${ENV_NAME} or api_key_file: PATH)")
        return
    value = raw["api_key"]
    match = _ENV_REF.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        problems.append(
            "api_key: must be ${ENV_NAME} or replaced by api_key_file: API keys are never "
            "written in the clients file in clear"
        )
        raw["api_key"] = ""
        return
    name = match.group(1)
    if name not in environ:
        problems.append(f"api_key: environment variable {name} is not set")
        raw["api_key"] = ""
    elif not environ[name].strip():
        problems.append(f"api_key: environment variable {name} is empty")
        raw["api_key"] = ""
    else:
        raw["api_key"] = environ[name].strip()


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
        client_id = raw.get("client_id")
        plain = isinstance(client_id, str) and _PLAIN_ID.match(client_id)
        name = client_id if plain else f"#{index + 1}"
        own: list[str] = []
        raw = dict(raw)
        _read_api_key(raw, environ, own)
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
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SettingsError(
            f"clients file {str(path)!r}: cannot read it ({exc.strerror})"
        ) from None
    if len(data) > MAX_FILE_BYTES:
        raise SettingsError(
            f"clients file {str(path)!r}: larger than {MAX_FILE_BYTES // 1024} KiB"
        )
    try:
        document = yaml.load(data.decode("utf-8"), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        raise SettingsError(f"clients file {str(path)!r}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        ours = problem if problem in _OWN_PROBLEMS else None
        raise SettingsError(
            f"clients file {str(path)!r}: not valid YAML{where}" + (f": {ours}" if ours else "")
        ) from None
    return parse_clients(document, environ)


_OWN_PROBLEMS = frozenset(
    {"anchors and aliases (&, *) are not allowed", "a key is given twice in one mapping"}
)
