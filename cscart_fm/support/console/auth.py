"""Who may use the console: users from a file, tokens from the environment, sessions, CSRF.

Users
    ``CSCART_FM_CONSOLE_USERS`` names a YAML file (a Kubernetes Secret volume in production)::

        users:
          - name: alice
            role: operator          # viewer: reads only; operator: replays, discards, reveals
            password_hash: "scrypt$n=16384,r=8,p=1$<salt>$<hash>"

    Hashes are made by ``cscart-fm console hash-password`` (scrypt from ``hashlib``);
    ``pbkdf2_sha256$<iterations>$<salt>$<hash>`` is accepted too. A password is never stored.

Tokens
    ``CSCART_FM_CONSOLE_TOKENS`` = ``name:role:token`` entries separated by commas, for
    scripts: sent as ``Authorization: Bearer <token>``. At least 32 characters each.

Nothing configured, or anything wrong in either: the console refuses to start, naming the
mistake. There is no default login.

Sessions
    A random 256-bit id in a cookie (HttpOnly, SameSite=Strict), held in this process only:
    a restart ends every session. Idle for ``SESSION_IDLE`` or older than ``SESSION_MAX``: over.
    Each session has its own CSRF token, put in every form and checked on every POST.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cscart_fm.core.errors import SettingsError
from cscart_fm.core.observability import register_secret

USERS_ENV = "CSCART_FM_CONSOLE_USERS"
TOKENS_ENV = "CSCART_FM_CONSOLE_TOKENS"

VIEWER, OPERATOR = "viewer", "operator"
ROLES = (VIEWER, OPERATOR)

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
PBKDF2_MIN_ITERATIONS = 100_000
TOKEN_MIN_LENGTH = 32
SESSION_IDLE = 2 * 3600.0
SESSION_MAX = 12 * 3600.0
MAX_SESSIONS = 10_000

_NAME = re.compile(r"^[A-Za-z0-9._@+-]{1,64}$")


class ConsoleSettingsError(SettingsError):
    """The console's users or tokens are missing or wrong: it refuses to start."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    via: str = "password"  # or "token"

    @property
    def is_operator(self) -> bool:
        return self.role == OPERATOR


# --- password hashes ------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str) -> str:
    """An scrypt hash of ``password`` with a fresh salt, in the users file's format."""
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int = 32) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=256 * n * r * p
    )


@dataclass(frozen=True)
class PasswordHash:
    """A parsed hash; ``verify`` is constant-time in the comparison."""

    scheme: str
    params: tuple[int, ...]
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, encoded: str) -> PasswordHash:
        """ValueError saying what is wrong (never echoing the hash)."""
        parts = encoded.strip().split("$")
        if len(parts) != 4 or parts[0] not in ("scrypt", "pbkdf2_sha256"):
            raise ValueError(_FORMAT_HELP)
        try:
            salt, digest = _unb64(parts[2]), _unb64(parts[3])
            if parts[0] == "scrypt":
                values = dict(item.split("=", 1) for item in parts[1].split(","))
                params: tuple[int, ...] = (int(values["n"]), int(values["r"]), int(values["p"]))
            else:
                params = (int(parts[1]),)
        except (KeyError, ValueError, binascii.Error):
            raise ValueError(_FORMAT_HELP) from None
        if len(salt) < 8 or not 16 <= len(digest) <= 64:
            raise ValueError("the salt or the hash is too short")
        if parts[0] == "scrypt":
            n, r, p = params
            if n < 2**14 or n > 2**20 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
                raise ValueError(
                    "scrypt parameters out of range (n a power of two from 16384 to 1048576, "
                    "r 1-32, p 1-16)"
                )
        elif not PBKDF2_MIN_ITERATIONS <= params[0] <= 10_000_000:
            raise ValueError(f"pbkdf2_sha256 needs {PBKDF2_MIN_ITERATIONS} to 10000000 iterations")
        return cls(parts[0], params, salt, digest)

    def verify(self, password: str) -> bool:
        if self.scheme == "scrypt":
            n, r, p = self.params
            computed = _scrypt(password, self.salt, n, r, p, len(self.digest))
        else:
            computed = hashlib.pbkdf2_hmac(
                "sha256", password.encode("utf-8"), self.salt, self.params[0], len(self.digest)
            )
        return hmac.compare_digest(computed, self.digest)


def dummy_like(hashes: Sequence[PasswordHash]) -> PasswordHash:
    """A hash of a random password with the settings of the costliest of ``hashes`` (the
    default scrypt settings when there are none)."""
    password = secrets.token_urlsafe(16).encode("utf-8")
    salt = secrets.token_bytes(16)
    scrypts = [h for h in hashes if h.scheme == "scrypt"]
    pbkdf2s = [h for h in hashes if h.scheme != "scrypt"]
    if pbkdf2s and not scrypts:
        iterations = max(h.params[0] for h in pbkdf2s)
        digest = hashlib.pbkdf2_hmac("sha256", password, salt, iterations, 32)
        return PasswordHash("pbkdf2_sha256", (iterations,), salt, digest)
    n, r, p = max((h.params for h in scrypts), key=lambda x: x[0] * x[1] * x[2],
                  default=(SCRYPT_N, SCRYPT_R, SCRYPT_P))
    digest = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=32, maxmem=256 * n * r * p)
    return PasswordHash("scrypt", (n, r, p), salt, digest)


_FORMAT_HELP = (
    "expected scrypt$n=…,r=…,p=…$salt$hash or pbkdf2_sha256$iterations$salt$hash "
    "(make one with `cscart-fm console hash-password`)"
)


# --- users and tokens ---------------------------------------------------------------------------


@dataclass
class Accounts:
    """Who may log in: users with password hashes, and bearer tokens."""

    users: dict[str, tuple[User, PasswordHash]] = field(default_factory=dict)
    tokens: list[tuple[bytes, User]] = field(default_factory=list)  # (sha256 of token, user)
    _dummy: PasswordHash | None = None

    def __post_init__(self) -> None:
        # An unknown name costs as much as the costliest user's wrong password: a name is
        # not told apart by the time its check takes.
        self._dummy = dummy_like([hashed for _, hashed in self.users.values()])

    @property
    def empty(self) -> bool:
        return not self.users and not self.tokens

    def check_password(self, name: str, password: str) -> User | None:
        entry = self.users.get(name)
        hashed = entry[1] if entry else self._dummy
        assert hashed is not None
        ok = hashed.verify(password)
        return entry[0] if entry and ok else None

    def check_token(self, token: str) -> User | None:
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for known, user in self.tokens:  # every entry compared: no early exit
            if hmac.compare_digest(known, digest):
                found = user
        return found


def _role(value: Any, where: str, problems: list[str]) -> str:
    if value not in ROLES:
        problems.append(f"{where}: role: expected viewer or operator, got {value!r}")
        return VIEWER
    return str(value)


def parse_users(document: Any, source: str) -> dict[str, tuple[User, PasswordHash]]:
    problems: list[str] = []
    if not isinstance(document, dict) or not isinstance(document.get("users"), list):
        raise ConsoleSettingsError(f"{source}: expected `users:` with a list of users")
    users: dict[str, tuple[User, PasswordHash]] = {}
    for number, entry in enumerate(document["users"], start=1):
        if not isinstance(entry, dict):
            problems.append(f"{source}: user {number}: expected name, role and password_hash")
            continue
        name = entry.get("name")
        where = f"{source}: user {number}" + (f" ({name})" if isinstance(name, str) else "")
        unknown = sorted(set(map(str, entry)) - {"name", "role", "password_hash"})
        if unknown:
            problems.append(f"{where}: unknown field(s) {', '.join(unknown)}")
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(
                f"{where}: name: expected 1-64 letters, digits or . _ @ + -, got {name!r}"
            )
            continue
        if name in users:
            problems.append(f"{where}: name: {name!r} appears twice")
        role = _role(entry.get("role"), where, problems)
        encoded = entry.get("password_hash")
        if not isinstance(encoded, str) or not encoded.strip():
            problems.append(f"{where}: password_hash: missing (cscart-fm console hash-password)")
            continue
        try:
            hashed = PasswordHash.parse(encoded)
        except ValueError as exc:
            problems.append(f"{where}: password_hash: {exc}")
            continue
        users[name] = (User(name, role), hashed)
    if problems:
        raise ConsoleSettingsError("\n".join(problems))
    return users


def parse_tokens(raw: str, taken: Iterable[str] = ()) -> list[tuple[bytes, User]]:
    problems: list[str] = []
    tokens: list[tuple[bytes, User]] = []
    names = set(taken)
    for number, item in enumerate((part.strip() for part in raw.split(",")), start=1):
        if not item:
            continue
        pieces = item.split(":", 2)
        where = f"{TOKENS_ENV}: entry {number}"
        if len(pieces) != 3:
            problems.append(f"{where}: expected name:role:token")
            continue
        name, role, token = pieces
        if not _NAME.match(name):
            problems.append(f"{where}: name: expected 1-64 letters, digits or . _ @ + -")
            continue
        if name in names:
            problems.append(f"{where}: name {name!r} is already a user or another token")
        names.add(name)
        role = _role(role, f"{where} ({name})", problems)
        if len(token) < TOKEN_MIN_LENGTH:
            problems.append(
                f"{where} ({name}): token: at least {TOKEN_MIN_LENGTH} characters "
                "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
            continue
        register_secret(token)
        tokens.append((hashlib.sha256(token.encode("utf-8")).digest(), User(name, role, "token")))
    if problems:
        raise ConsoleSettingsError("\n".join(problems))
    return tokens


def load_accounts(environ: Mapping[str, str] | None = None) -> Accounts:
    """The users file and the tokens named by the environment; ConsoleSettingsError when
    neither gives anybody a way in, or when anything in them is wrong."""
    environ = os.environ if environ is None else environ
    path = environ.get(USERS_ENV, "").strip()
    raw_tokens = environ.get(TOKENS_ENV, "").strip()
    users: dict[str, tuple[User, PasswordHash]] = {}
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConsoleSettingsError(
                f"{USERS_ENV}: cannot read the users file {path!r} ({exc.strerror})"
            ) from None
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConsoleSettingsError(f"users file {path!r}: not valid YAML") from None
        users = parse_users(document, f"users file {path!r}")
    tokens = parse_tokens(raw_tokens, users) if raw_tokens else []
    accounts = Accounts(users=users, tokens=tokens)
    if accounts.empty:
        raise ConsoleSettingsError(
            f"the console has no users: set {USERS_ENV} to a users file (make password hashes "
            f"with `cscart-fm console hash-password`) or {TOKENS_ENV}; it never starts with a "
            "default login"
        )
    return accounts


# --- sessions -----------------------------------------------------------------------------------


@dataclass
class Session:
    id: str
    user: User
    csrf: str
    created: float
    seen: float
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, text), shown once


class Sessions:
    """Server-side sessions in this process (a restart ends them)."""

    def __init__(
        self,
        *,
        idle: float = SESSION_IDLE,
        maximum: float = SESSION_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle = idle
        self.maximum = maximum
        self.clock = clock
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: User) -> Session:
        now = self.clock()
        session = Session(
            id=secrets.token_urlsafe(32),
            user=user,
            csrf=secrets.token_urlsafe(32),
            created=now,
            seen=now,
        )
        with self._lock:
            if len(self._by_id) >= MAX_SESSIONS:
                self._purge(now, force=True)
            self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        now = self.clock()
        with self._lock:
            session = self._by_id.get(session_id)
            if session is None:
                return None
            if now - session.seen > self.idle or now - session.created > self.maximum:
                del self._by_id[session_id]
                return None
            session.seen = now
            return session

    def drop(self, session_id: str | None) -> None:
        with self._lock:
            self._by_id.pop(session_id or "", None)

    def _purge(self, now: float, *, force: bool) -> None:
        for sid, session in list(self._by_id.items()):
            if now - session.seen > self.idle or now - session.created > self.maximum:
                del self._by_id[sid]
        if force and len(self._by_id) >= MAX_SESSIONS:
            oldest = sorted(self._by_id.values(), key=lambda s: s.seen)[: MAX_SESSIONS // 10]
            for session in oldest:
                del self._by_id[session.id]


def same_token(expected: str, submitted: str | None) -> bool:
    """Constant-time comparison of a CSRF token."""
    if not submitted:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), submitted.encode("utf-8"))


# --- login throttling ---------------------------------------------------------------------------


class LoginThrottle:
    """Failed logins, counted before the password is checked (so parallel guesses count as
    they arrive), in ``window`` seconds:

    - ``per_pair`` for one name from one address: then that pair waits out the window;
    - ``per_address`` from one address, whatever the names: then that address waits;
    - ``per_name`` for one name from anywhere: then that name is slowed to one attempt every
      ``name_pace`` seconds, never locked: a guesser elsewhere cannot lock the real user out.

    ``checking`` caps the password checks running at once (scrypt takes 16 MiB each)."""

    def __init__(
        self,
        *,
        per_pair: int = 5,
        per_address: int = 20,
        per_name: int = 20,
        name_pace: float = 10.0,
        window: float = 300.0,
        concurrent: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = {"pair": per_pair, "address": per_address}
        self.per_name = per_name
        self.name_pace = name_pace
        self.window = window
        self.clock = clock
        self._failures: dict[tuple[str, ...], deque[float]] = {}
        self._last_try: dict[str, float] = {}
        self._lock = threading.Lock()
        self._checks = threading.BoundedSemaphore(concurrent)

    @staticmethod
    def _name(name: str) -> str:
        return name.lower()[:64]

    def _recent(self, key: tuple[str, ...], now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and now - times[0] > self.window:
            times.popleft()
        return times

    def begin(self, name: str, address: str) -> float:
        """Seconds to wait before this login may be tried (nothing recorded), or 0: the
        attempt is recorded as failed now, and ``succeeded`` takes it back."""
        now = self.clock()
        user = self._name(name)
        keys = {"pair": ("pair", user, address), "address": ("address", address)}
        with self._lock:
            longest = 0.0
            for kind, key in keys.items():
                times = self._recent(key, now)
                if len(times) >= self.limits[kind]:
                    longest = max(longest, self.window - (now - times[0]))
            if len(self._recent(("name", user), now)) >= self.per_name:
                since = now - self._last_try.get(user, -math.inf)
                longest = max(longest, self.name_pace - since)
            if longest > 0:
                return longest
            if len(self._failures) > 100_000:
                self._failures.clear()
                self._last_try.clear()
            for key in (*keys.values(), ("name", user)):
                self._failures.setdefault(key, deque(maxlen=64)).append(now)
            self._last_try[user] = now
            return 0.0

    def succeeded(self, name: str, address: str) -> None:
        """The attempt ``begin`` recorded was right: forget it, and the pair's failures."""
        user = self._name(name)
        with self._lock:
            self._failures.pop(("pair", user, address), None)
            for key in (("address", address), ("name", user)):
                times = self._failures.get(key)
                if times:
                    times.pop()

    @contextmanager
    def checking(self, timeout: float = 10.0) -> Iterator[bool]:
        """A slot for one password check (False: every slot stayed busy ``timeout`` s)."""
        if not self._checks.acquire(timeout=timeout):
            yield False
            return
        try:
            yield True
        finally:
            self._checks.release()
