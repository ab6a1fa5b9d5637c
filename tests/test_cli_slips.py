"""An operator's slips get one clear line, not a traceback; ``check`` prints its own lines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cscart_emulator import StoreEmulator

from .support.pipeline import API_KEY, API_USER, KEY_ENV, client_doc, write_clients_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        yield taken.getsockname()[1]


def cscart_fm(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cscart_fm.cli", *args], cwd=REPO, capture_output=True,
        text=True, timeout=60, env={**os.environ, **env}, check=False,
    )


def test_the_emulator_on_a_busy_port_says_so_in_one_line(busy_port: int) -> None:
    result = cscart_fm("emulator", "--port", str(busy_port))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"cscart-fm: cannot listen on 127.0.0.1:{busy_port} (Address already in use)"
    )


def test_the_console_on_a_busy_port_says_so_in_one_line(busy_port: int, tmp_path: Path) -> None:
    result = cscart_fm(
        "console", "--port", str(busy_port),
        CSCART_FM_CONSOLE_TOKENS="ops:viewer:" + "t" * 40,
        CSCART_FM_STATE_URL=f"sqlite:///{tmp_path / 'state.sqlite'}",
        CSCART_FM_CLIENTS=str(tmp_path / "none.yaml"),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"cscart-fm console: cannot listen on 127.0.0.1:{busy_port} (Address already in use)"
    )


def test_check_prints_its_lines_only_and_no_replay_advice(tmp_path: Path) -> None:
    with StoreEmulator(api_user=API_USER, api_key="another-key-entirely") as store:
        clients = write_clients_file(tmp_path / "clients.yaml", [client_doc(store.url)])
        result = cscart_fm("check", "ACME", CSCART_FM_CLIENTS=str(clients),
                           CSCART_FM_LOG_LEVEL="DEBUG", **{KEY_ENV: API_KEY})
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"Checking client ACME at {store.url}",
        "  [FAIL] credentials: users.get: HTTP 401 Unauthorized (user 1)",
        "  what to do: The store refused the API credentials (HTTP 401). Check api_user is the "
        "administrator's e-mail, the API key is current and API access is allowed for that "
        "user (and that the host passes the Authorization header), then run this check again.",
    ]
    assert "cscart.request" not in result.stdout + result.stderr  # no debug lines
