"""``cscart-fm console`` (serve it) and ``cscart-fm console hash-password``."""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
import typer

from consumers.services import Services
from cscart_fm.cli.output import echo
from cscart_fm.cli.wiring import open_state
from cscart_fm.core.broker import Publisher
from cscart_fm.core.clients import load_clients
from cscart_fm.core.config import read_environment, redact_url
from cscart_fm.core.errors import SettingsError
from cscart_fm.core.observability import configure_logging
from cscart_fm.support.console.auth import ROLES, hash_password, load_accounts
from cscart_fm.support.console.server import Console, serve, user_summary

log = structlog.get_logger("cscart_fm.support.console")

TIMEZONE_ENV = "CSCART_FM_CONSOLE_TIMEZONE"
MIN_PASSWORD = 12

console_app = typer.Typer(
    help="The support console: a small web console for dead letters, clients and orders.",
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    echo(f"cscart-fm console: {message}", err=True)
    return typer.Exit(code)


def _is_public(host: str) -> bool:
    """Anything but loopback is reached across a network: behind HTTPS, as it must be."""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


@console_app.callback(invoke_without_command=True)
def console(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0 = any free port).")] = 8090,
    secure_cookie: Annotated[
        bool | None,
        typer.Option(
            "--secure-cookie/--plain-http",
            help="Whether browsers reach the console over HTTPS (a Secure session cookie, "
            "HSTS). Default: yes, unless it listens on loopback only.",
        ),
    ] = None,
    origin: Annotated[
        list[str] | None,
        typer.Option(
            help="The console's address as browsers see it behind a proxy "
            "(e.g. https://console.example.com); repeatable."
        ),
    ] = None,
) -> None:
    """Serve the support console. Needs CSCART_FM_CONSOLE_USERS (a users file) and/or
    CSCART_FM_CONSOLE_TOKENS; the state store and broker of the other commands."""
    if ctx.invoked_subcommand is not None:
        return


    try:
        env = read_environment()
        accounts = load_accounts()
    except SettingsError as exc:
        raise _fail(str(exc)) from None
    configure_logging(env.log_level, env.log_format)
    zone_name = os.environ.get(TIMEZONE_ENV, "").strip() or "UTC"
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise _fail(f"{TIMEZONE_ENV}: unknown time zone {zone_name!r}") from None
    try:
        store = open_state(env.state_url)
    except Exception as exc:
        raise _fail(
            f"cannot open the state store {redact_url(env.state_url)} "
            f"({type(exc).__name__}: {exc})",
            1,
        ) from None

    clients: Any = None
    clients_error = None
    services = None
    try:

        clients = load_clients(env.clients_path)
    except SettingsError as exc:
        clients_error = str(exc)
        log.warning("console: no clients file; order lookup is off", error=clients_error)
    else:
        services = Services(
            clients=clients, state=store, publisher=Publisher(env.broker_url)
        )

    app = Console(
        store=store,
        accounts=accounts,
        broker_url=env.broker_url,
        retry_delays=env.retry_delays,
        clients=clients,
        clients_error=clients_error,
        services=services,
        zone=zone,
        secure_cookie=_is_public(host) if secure_cookie is None else secure_cookie,
        origins=origin or (),
    )
    try:
        server = serve(app, host, port)
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port} ({exc.strerror})", 1) from None
    address = server.server_address
    bound_host = str(address[0]) if not isinstance(address[0], bytes) else address[0].decode()
    bound_port = int(address[1])
    echo(
        f"cscart-fm console on http://{bound_host}:{bound_port}/ ({user_summary(accounts)}); "
        "sessions live in this process and end when it stops",
    )
    sys.stdout.flush()
    log.info("console started", host=bound_host, port=bound_port, state=redact_url(env.state_url))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="console-http", daemon=True)
    thread.start()
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        if services is not None:
            services.close()  # closes the store too
        else:
            store.close()
    log.info("console stopped")


@console_app.command("hash-password")
def hash_password_command(
    name: Annotated[
        str | None, typer.Option("--name", help="Print a whole users-file entry for this name.")
    ] = None,
    role: Annotated[
        str, typer.Option("--role", help="viewer or operator (with --name).")
    ] = "viewer",
    stdin: Annotated[
        bool, typer.Option("--stdin", help="Read the password from the first line of stdin.")
    ] = False,
) -> None:
    """Hash a password for the users file (scrypt); the password is never stored."""

    if role not in ROLES:
        raise _fail(f"--role: expected viewer or operator, got {role!r}")
    if stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < MIN_PASSWORD:
        raise _fail(f"the password is too short: at least {MIN_PASSWORD} characters")
    hashed = hash_password(password)
    if name:
        echo(f'  - name: {name}\n    role: {role}\n    password_hash: "{hashed}"')
    else:
        echo(hashed)


def register(app: typer.Typer) -> None:
    """Add the ``console`` group to the ``cscart-fm`` command."""
    app.add_typer(console_app, name="console")
