"""The `cscart-fm` command as operators use it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cscart_emulator import StoreEmulator

from .support.broker import wait_for
from .support.pipeline import API_KEY, KEY_ENV, REPO, cli_env, client_doc, write_clients_file


def cscart_fm(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cscart_fm.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_runs_the_pipeline_on_the_embedded_default() -> None:
    result = cscart_fm("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Traceback" not in out + result.stderr
    assert "in-process (memory://" in out
    assert "the CS-Cart emulator at http://127.0.0.1:" in out
    assert "Dead letters: none" in out
    assert API_KEY not in out
    # 1. orders: the P orders to AU/NZ reach FM's queue once, prefixed; the others say why not
    assert "FM's queue 'fm.orders.imported' received 3 orders:" in out
    assert "CS1        ship to AU  2 × Test001" in out
    assert "test order, FM will not dispatch it" in out
    assert "not pulled (status O)" in out and "not pulled (ship-to US)" in out
    assert "A second tick published 0 more" in out
    # 2. tracking: a full and a partial shipment reach the emulator with their statuses
    assert "carrier 'aup'" in out and "order status is now C (Complete)" in out
    assert "Track your parcel: https://www.aramex.co.nz" in out
    assert "order status is now A (Partially shipped)" in out
    # 3. stock: available, negatives as 0, unchanged not written, unknown SKU reported
    assert "Test002        on hand   3, available  -2 → store quantity 50 → 0  written" in out
    assert "unchanged (not written)" in out
    assert "NPF-GONE-01    not in the store" in out
    assert "The store received 3 quantity updates." in out


def test_topology_lists_the_contract_queues() -> None:
    result = cscart_fm("topology", "--json")
    assert result.returncode == 0, result.stderr
    names = {row["name"] for row in json.loads(result.stdout)}
    assert {
        "fm.events", "fm.orders", "fm.orders.imported",
        "cscart.order-poll", "cscart.shipment-lodged", "cscart.stock-snapshot",
        "cscart.order-poll.dlq", "cscart.shipment-lodged.dlq", "cscart.stock-snapshot.dlq",
    } <= names


def test_run_refuses_an_unknown_consumer_clearly(tmp_path: Path) -> None:
    result = cscart_fm("run", "invoices", env=cli_env("memory://", "sqlite://", tmp_path / "x.yaml"))
    assert result.returncode == 2
    assert "unknown consumer 'invoices'" in result.stderr
    assert "order-poll, shipment-lodged, stock-snapshot" in result.stderr


def test_run_stops_at_start_on_a_wrong_clients_file(tmp_path: Path) -> None:
    doc = client_doc("https://shop.example", stock={"quantity": "soh"})
    clients = write_clients_file(tmp_path / "clients.yaml", [doc])
    result = cscart_fm("run", "all", env=cli_env("memory://", f"sqlite:///{tmp_path}/s.db", clients))
    assert result.returncode == 2
    assert "client ACME: stock.quantity" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_a_good_client(tmp_path: Path) -> None:
    with StoreEmulator(api_user="admin@example.com", api_key=API_KEY, user_id=1) as store:
        clients = write_clients_file(
            tmp_path / "clients.yaml",
            [client_doc(store.url, orders={"statuses": ["Processed", "C"]})],
        )
        result = cscart_fm("check", "ACME", env=cli_env("memory://", "sqlite://", clients))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ok] credentials accepted" in result.stdout
    assert "→ ['P', 'C']" in result.stdout
    assert "All good." in result.stdout
    assert API_KEY not in result.stdout + result.stderr


def test_check_reports_bad_credentials_and_missing_statuses(tmp_path: Path) -> None:
    with StoreEmulator(api_user="admin@example.com", api_key="another-key-entirely", user_id=1) as store:
        clients = write_clients_file(tmp_path / "clients.yaml", [client_doc(store.url)])
        result = cscart_fm("check", "ACME", env=cli_env("memory://", "sqlite://", clients))
        assert result.returncode == 1
        assert "[FAIL] credentials" in result.stdout
        assert "API key" in result.stdout  # what to do

    with StoreEmulator(api_user="admin@example.com", api_key=API_KEY, user_id=1) as store:
        clients = write_clients_file(
            tmp_path / "clients.yaml",
            [client_doc(store.url, orders={"statuses": ["Shipped to Mars"]},
                        tracking={"shipped_status": "Delivered"})],
        )
        result = cscart_fm("check", "ACME", env=cli_env("memory://", "sqlite://", clients))
    assert result.returncode == 1
    assert "not in the store: ['Shipped to Mars']" in result.stdout
    assert "[FAIL] shipped status 'Delivered'" in result.stdout


def test_check_refuses_an_unknown_client(tmp_path: Path) -> None:
    clients = write_clients_file(tmp_path / "clients.yaml", [client_doc("https://shop.example")])
    result = cscart_fm("check", "NOPE", env={**cli_env("memory://", "sqlite://", clients), KEY_ENV: "x" * 10})
    assert result.returncode == 2
    assert "'NOPE' is not in the clients file" in result.stderr


@pytest.mark.broker
def test_run_collects_dead_letters_and_exports_the_open_count(broker_url: str, tmp_path: Path) -> None:
    import socket
    import urllib.request

    from .support.broker import declare, depth, publish_json, shipment_event

    declare(broker_url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clients = write_clients_file(tmp_path / "clients.yaml", [client_doc("https://shop.example")])
    env = cli_env(
        broker_url, f"sqlite:///{tmp_path}/state.db", clients,
        CSCART_FM_METRICS_PORT=str(port), CSCART_FM_DEAD_LETTER_INTERVAL="1",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "cscart_fm.cli", "run", "shipment-lodged"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        publish_json(broker_url, shipment_event("D1", lines="not a list"), "shipment.lodged")

        def open_count() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                return ""
            wanted = 'cscart_fm_dead_letters_open{consumer="shipment-lodged",error_type="invalid-message"} 1.0'
            return wanted if wanted in text else ""

        wait_for(open_count, timeout=60)
        assert depth(broker_url, "cscart.shipment-lodged.dlq") == 0  # moved into the store
        listed = cscart_fm("dlq", "list", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert row["error_type"] == "invalid-message"
        assert "lines" in row["reason"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()


@pytest.mark.broker
def test_run_exits_0_on_sigterm_and_serves_health(broker_url: str, tmp_path: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clients = write_clients_file(tmp_path / "clients.yaml", [client_doc("https://shop.example")])
    env = cli_env(broker_url, f"sqlite:///{tmp_path}/state.db", clients, CSCART_FM_METRICS_PORT=str(port))
    process = subprocess.Popen(
        [sys.executable, "-m", "cscart_fm.cli", "run", "all"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ready, timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
        assert "cscart_fm_consumer_connected" in text
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        output = process.stdout.read().decode() if process.stdout else ""
    assert API_KEY not in output
    assert '"event": "stopped"' in output
