"""The ``cscart-fm`` command (contract §4)."""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
from typing import Annotated

import structlog
import typer
from kombu import Connection
from sqlalchemy.exc import SQLAlchemyError

from consumers.registry import JOBS
from cscart.client import CsCartClient
from cscart_emulator import StoreEmulator, seed_demo_store
from cscart_fm.cli.demo import run_demo
from cscart_fm.cli.output import echo
from cscart_fm.cli.support import register as register_support_commands
from cscart_fm.cli.wiring import runtime_for, select_jobs, services_from_environment
from cscart_fm.core.clients import load_clients
from cscart_fm.core.config import read_environment, redact_url
from cscart_fm.core.errors import BridgeError, SettingsError
from cscart_fm.core.observability import Health, configure_logging, serve_metrics
from cscart_fm.core.runtime import run_until_stopped, stop_on_signals
from cscart_fm.support.dead_letters.collect import DeadLetterCollector
from cscart_fm.support.explain import explain_order

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The bridge between FM (NPFulfilment) and clients' CS-Cart stores.",
)
log = structlog.get_logger("cscart_fm")


def _fail(message: str, code: int = 2) -> typer.Exit:
    echo(f"cscart-fm: {message}", err=True)
    return typer.Exit(code)


@app.command()
def run(
    consumer: Annotated[
        str,
        typer.Argument(
            help=" | ".join(JOBS.names) + " | all",
            metavar="JOB",
        ),
    ],
) -> None:
    """Run one job's consumer (one Kubernetes Deployment each), or all of them in one process.

    The jobs: """ + "; ".join(f"{job.name}: {job.summary}" for job in JOBS) + """."""
    try:
        env = read_environment()
        configure_logging(env.log_level, env.log_format)
        jobs = select_jobs(consumer)
        services = services_from_environment(env)
    except SettingsError as exc:
        raise _fail(str(exc)) from None

    stop = threading.Event()
    stop_on_signals(stop)

    health = Health()
    if env.metrics_port is not None:
        serve_metrics(env.metrics_port, health)

    # Declared once before any consumer starts (a consume racing a fresh quorum queue's
    # declaration can kill the connection on RabbitMQ 3.10); retried while the broker starts.
    log.info("declaring topology", broker=redact_url(env.broker_url))
    while not stop.is_set():
        try:
            with Connection(env.broker_url, connect_timeout=10) as conn:
                conn.ensure_connection(max_retries=3)
                JOBS.topology(env.retry_delays).declare(conn)
            break
        except Exception as exc:
            log.warning("broker not reachable yet", error=f"{type(exc).__name__}: {exc}")
            stop.wait(5)

    runtimes = []
    for job in jobs:
        runtime = runtime_for(job, services, env)
        health.add(f"consumer {job.name}", runtime.is_ready)
        runtimes.append(runtime)
    # Dead letters leave the .dlq queues for the state store, where support browses them.
    names = [job.name for job in jobs]
    collector = DeadLetterCollector(
        services.state, env.broker_url, names, interval=env.dead_letter_interval
    ).start()
    log.info("starting", consumers=names, clients=sorted(services.clients))
    try:
        run_until_stopped(runtimes, stop)
    finally:
        collector.stop()
        services.close()
    log.info("stopped")


@app.command("topology")
def topology_command(
    declare: Annotated[bool, typer.Option(help="Declare it on CSCART_FM_BROKER_URL.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the broker topology (exchanges, queues, bindings); --declare creates it."""
    env = read_environment()
    topology = JOBS.topology(env.retry_delays)
    rows = topology.describe()
    if as_json:
        echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            if row["kind"] == "exchange":
                echo(f"exchange  {row['name']:<36} {row['type']}")
            else:
                keys = ", ".join(row["routing_keys"])
                binding = f"{row['exchange']} / {keys}" if row["exchange"] else "-"
                kind = row["arguments"].get("x-queue-type", "classic")
                echo(f"queue     {row['name']:<36} {kind:<8} {binding}")
    if declare:
        with Connection(env.broker_url, connect_timeout=10) as conn:
            names = topology.declare(conn)
        echo(f"declared {len(names)} queues on {redact_url(env.broker_url)}")


@app.command()
def emulator(
    port: Annotated[int, typer.Option(help="Port to listen on (0 = any free port).")] = 8080,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    api_user: Annotated[str, typer.Option(help="Administrator e-mail.")] = "admin@example.com",
    api_key: Annotated[
        str, typer.Option(envvar="CSCART_FM_EMULATOR_API_KEY", help="The API key it accepts.")
    ] = "emulator-api-key",
    seed_demo: Annotated[bool, typer.Option(help="Seed the demo products and orders.")] = True,
) -> None:
    """Serve the CS-Cart store emulator (for tests, benchmarks and trying things out)."""

    store = StoreEmulator(api_user=api_user, api_key=api_key, user_id=1, host=host, port=port)
    if seed_demo:
        seed_demo_store(store)
    try:
        store.start()
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port} ({exc.strerror or exc})", 1) from None
    echo(f"CS-Cart store emulator on {store.url}/api (user {api_user}); Ctrl-C stops it")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        store.stop()


@app.command()
def check(
    client_id: Annotated[str, typer.Argument(help="The client_id in the clients file.")],
) -> None:
    """Check a client's connection: credentials, the administrator, the configured statuses."""

    env = read_environment()
    # Its lines are the output: the store calls' own log lines only when something is wrong.
    configure_logging("WARNING", env.log_format)
    try:
        clients = load_clients(env.clients_path)
        settings = clients.require(client_id)
    except (SettingsError, BridgeError) as exc:
        raise _fail(str(exc)) from None
    problems = 0

    def line(ok: bool, text: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        echo(f"  [{'ok' if ok else 'FAIL'}] {text}")

    echo(f"Checking client {client_id} at {settings.store_url}")
    with CsCartClient.for_client(settings) as store:
        try:
            user = store.get_user(settings.user_id)
        except BridgeError as exc:
            line(False, f"credentials: {exc.reason}")
            # The action is written for a dead letter; a check has nothing to replay.
            advice = re.sub(r",? then replay\.?$", ", then run this check again.", exc.action)
            echo(f"  what to do: {advice}")
            raise typer.Exit(1) from None
        line(True, "credentials accepted by the store")
        line(
            user.email.lower() == settings.api_user.lower(),
            f"user {settings.user_id} is {user.email} (api_user is {settings.api_user})",
        )
        line(
            user.user_type == "A",
            f"user {settings.user_id} is an administrator (type {user.user_type})",
        )
        line(user.status == "A", f"user {settings.user_id} is active (status {user.status})")
        try:
            statuses = store.statuses
        except BridgeError as exc:
            line(False, f"order statuses: {exc.reason}")
            raise typer.Exit(1) from None
        found, missing = statuses.resolve_all(settings.orders.statuses)
        line(
            not missing,
            f"statuses to pull {settings.orders.statuses} → {found}"
            + (f"; not in the store: {missing}" if missing else ""),
        )
        for label, wanted in (
            ("shipped status", settings.tracking.shipped_status),
            ("partially shipped status", settings.tracking.partially_shipped_status),
        ):
            if wanted:
                letters, absent = statuses.resolve_all([wanted])
                line(not absent, f"{label} {wanted!r} → {letters[0] if letters else 'missing'}")
    echo("All good." if not problems else f"{problems} problem(s) found.")
    raise typer.Exit(0 if not problems else 1)


@app.command()
def explain(
    client_id: Annotated[str, typer.Argument(help="The client_id in the clients file.")],
    order_id: Annotated[
        str, typer.Argument(help="The CS-Cart order id (1000012) or its order_no (CS1000012).")
    ],
) -> None:
    """Say whether a CS-Cart order was imported (when, as what order_no) or which of the
    client's filters excludes it, from what the service recorded and a look at the store."""


    try:
        env = read_environment()
        configure_logging(env.log_level, env.log_format)
        services = services_from_environment(env)
    except SettingsError as exc:
        raise _fail(str(exc)) from None
    except SQLAlchemyError as exc:
        raise _fail(
            f"cannot open the state store {redact_url(env.state_url)} ({type(exc).__name__})"
        ) from None
    try:
        text = explain_order(services, client_id, order_id)
    except BridgeError as exc:  # UnknownClient
        raise _fail(exc.reason) from None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    finally:
        services.close()
    echo(text)


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the temporary directory and print it.")] = False,
) -> None:
    """Run the whole pipeline on the embedded default: in-process broker, the built-in CS-Cart
    store emulator and SQLite in a temporary directory. Nothing to install or configure."""

    sys.exit(run_demo(keep=keep))


# tick, publish and dlq (producers and support tools), and the support console.
register_support_commands(app)


def main() -> None:
    app()
