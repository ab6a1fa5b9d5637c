"""What every benchmark shares: a fresh vhost, the clients file, `cscart-fm run` processes,
metrics scrapes, and the rows of the results table."""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kombu import Connection

REPO = Path(__file__).resolve().parents[1]
AMQP_BASE = os.environ.get("CSCART_FM_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672")
API_USER = "admin@example.com"
API_KEY = "bench-api-key-5d1e0c7a93"
KEY_ENV = "CSCART_FM_BENCH_STORE_KEY"
CLIENT = "ACME"


@dataclass
class Row:
    """One line of the results table."""

    bench: str
    figure: str
    value: str
    goal: str = ""
    met: bool | None = None  # None: a figure with no goal of its own
    notes: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Result:
    number: int
    title: str
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # how it was measured, for the doc
    seconds: float = 0.0

    def add(self, figure: str, value: str, goal: str = "", met: bool | None = None,
            notes: str = "") -> None:
        self.rows.append(Row(f"{self.number}. {self.title}", figure, value, goal, met, notes))


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- the broker ---------------------------------------------------------------------------------


def _rabbitmqctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise RuntimeError("rabbitmqctl is needed to give each benchmark its own vhost")
    return subprocess.run(  # noqa: S603 - fixed arguments
        [exe, *args], check=check, capture_output=True, text=True, timeout=120
    )


@contextmanager
def fresh_vhost(tag: str) -> Iterator[str]:
    """An AMQP URL on a brand-new vhost, deleted afterwards (queues and all)."""
    vhost = f"cscart-fm-bench-{tag}-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"{AMQP_BASE}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost, check=False)


def rabbitmq_version() -> str:
    try:
        with Connection(AMQP_BASE, connect_timeout=5) as conn:
            conn.connect()
            props = conn.connection.server_properties
            version = props.get("version", "?")
            return version.decode() if isinstance(version, bytes) else str(version)
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def queue_depth(url: str, name: str) -> int:
    with Connection(url) as conn:
        return int(conn.default_channel.queue_declare(queue=name, passive=True).message_count)


# --- the machine --------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MB"
                break
    except OSError:
        pass
    return {
        "cores": str(os.cpu_count()),
        "cpu": model or platform.processor() or "?",
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "rabbitmq": rabbitmq_version(),
    }


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "?"
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


# --- the service as operators run it -------------------------------------------------------------


def client_doc(store_url: str, **sections: Any) -> dict[str, Any]:
    """One client (ACME) of the clients file, pointing at the emulator."""
    doc: dict[str, Any] = {
        "client_id": CLIENT,
        "store_url": store_url,
        "api_user": API_USER,
        "api_key": "${" + KEY_ENV + "}",
        "user_id": 1,
        "orders": {
            "statuses": ["P"],
            "start_date": "01/01/2020",
            "timezone": "UTC",
            "prefix": "CS",
            "countries": [],
        },
        "tracking": {"shipped_status": "C"},
        "stock": {"update_stock": True, "quantity": "on_hand", "negative_as_zero": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


def write_clients(path: Path, clients: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"clients": clients}, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(broker_url: str, state_url: str, clients: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "CSCART_FM_BROKER_URL": broker_url,
        "CSCART_FM_CLIENTS": str(clients),
        "CSCART_FM_STATE_URL": state_url,
        "CSCART_FM_LOG_LEVEL": "WARNING",
        KEY_ENV: API_KEY,
    }
    env.update(extra)
    return env


class Service:
    """``cscart-fm run <consumer>`` as operators run it, with /metrics on a free port."""

    def __init__(self, consumer: str, env: dict[str, str], log_file: Path) -> None:
        self.port = free_port()
        self.consumer = consumer
        self.log_file = log_file
        env = {**env, "CSCART_FM_METRICS_PORT": str(self.port)}
        self._log = open(log_file, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(  # noqa: S603 - our own CLI
            [sys.executable, "-m", "cscart_fm.cli", "run", consumer],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}{path}", timeout=5
            ) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), ""
        except OSError:
            return 0, ""

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"cscart-fm run {self.consumer} exited with {self.process.returncode}:\n"
                    + self.log_file.read_text()[-3000:]
                )
            if self.get("/readyz")[0] == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"cscart-fm run {self.consumer} not ready after {timeout} s")

    def metrics(self) -> str:
        status, text = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return text

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
        return self.process.returncode


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{(?P<labels>[^}}]*)\}})? (?P<value>\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group("labels") or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group("value"))
    return total


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {timeout} s")
        time.sleep(interval)


def peak_rss_mb(pid: int) -> float:
    """VmHWM (the peak resident set) of a running process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/<pid>/status")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/<pid>/status")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a running process has used so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"
