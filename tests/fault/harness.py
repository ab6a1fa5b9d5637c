"""The fault-injection suite's machinery: sizes, a private RabbitMQ node to restart, consumers
run as `cscart-fm run` processes, and the artefacts every run leaves (logs, dead letters,
metrics scrapes) that check 5 searches for the API key and shoppers' e-mails.

Short form by default (CI); the issue's full sizes with ``CSCART_FM_FAULT_FULL=1``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kombu import Connection

from tests.support.pipeline import API_KEY, API_USER, start_cli

FULL = os.environ.get("CSCART_FM_FAULT_FULL", "").lower() in ("1", "true", "yes")


def size(short: int, full: int) -> int:
    """The short (CI) or the full (``CSCART_FM_FAULT_FULL=1``) size of a run."""
    return full if FULL else short


def report(title: str, figures: dict[str, Any]) -> None:
    """Print a run's figures (shown with ``pytest -s``, and in the failure report); with
    ``CSCART_FM_FAULT_REPORT`` naming a file, also append them there as a Markdown table
    (how docs/benchmarks.md gets the figures of a full run)."""
    width = max(len(k) for k in figures)
    form = "full" if FULL else "short"
    lines = [f"--- fault run: {title} ({form} form)"]
    lines += [f"    {key:<{width}}  {value}" for key, value in figures.items()]
    print("\n".join(lines), flush=True)
    target = os.environ.get("CSCART_FM_FAULT_REPORT")
    if target:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        table = [f"#### {title} ({form} form, {when})", "", "| figure | value |", "|---|---|"]
        table += [f"| {key.strip()} | {value} |" for key, value in figures.items()]
        with open(target, "a", encoding="utf-8") as out:
            out.write("\n".join(table) + "\n\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- a RabbitMQ node of the suite's own, to restart ----------------------------------------------


def _rabbit_bin(name: str) -> str | None:
    # The Debian wrappers in /usr/sbin switch to the rabbitmq user and drop the environment
    # that points a node at its own directory; the scripts behind them do not.
    direct = Path("/usr/lib/rabbitmq/bin") / name
    if direct.exists():
        return str(direct)
    return shutil.which(name)


@dataclass
class PrivateBroker:
    """A RabbitMQ node (the machine's installed version) with its own name, port, data and
    logs. Restarting it (``rabbitmqctl stop_app`` / ``start_app``) touches nothing else on the
    machine: other tests and developers keep the shared broker."""

    home: Path
    node: str = field(default_factory=lambda: f"cscartfault{uuid.uuid4().hex[:6]}@localhost")
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.home),
            "RABBITMQ_CONF_ENV_FILE": str(self.home / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.home / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}"

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        exe = _rabbit_bin("rabbitmqctl")
        assert exe is not None
        return subprocess.run(
            [exe, "-n", self.node, *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (self.home / "rabbitmq-env.conf").write_text("")
        (self.home / "enabled_plugins").write_text("[].\n")
        (self.home / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        exe = _rabbit_bin("rabbitmq-server")
        assert exe is not None
        subprocess.run([exe, "-detached"], env=self.env, capture_output=True, timeout=60,
                       check=False)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.ctl("await_startup", "--timeout", "10").returncode == 0 and self.reachable():
                return
            time.sleep(0.5)
        raise RuntimeError(f"private RabbitMQ node {self.node} did not start:\n" + self.last_log())

    def reachable(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 1):
                return True
        except OSError:
            return False

    def stop_app(self) -> None:
        result = self.ctl("stop_app")
        assert result.returncode == 0, result.stderr

    def start_app(self) -> None:
        result = self.ctl("start_app")
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 60
        while not self.reachable():
            assert time.monotonic() < deadline, "the node did not listen again"
            time.sleep(0.1)

    def add_vhost(self) -> str:
        vhost = f"fault-{uuid.uuid4().hex[:8]}"
        assert self.ctl("add_vhost", vhost).returncode == 0
        assert self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*").returncode == 0
        return f"{self.url}/{vhost}"

    def last_log(self) -> str:
        logs = sorted((self.home / "log").glob("*.log"))
        return logs[0].read_text()[-3000:] if logs else "(no log)"

    def stop(self) -> None:
        self.ctl("stop", timeout=60)
        pid_file = self.home / "rabbitmq.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError):
                pass


# --- consumers as operators run them -------------------------------------------------------------


class ConsumerProcess:
    """``cscart-fm run <consumer>`` with /metrics and /readyz; its output goes to a log file
    in the run's artefacts, and its metrics are scraped into them before it ends."""

    def __init__(self, consumer: str, env: dict[str, str], artefacts: Artefacts) -> None:
        self.consumer = consumer
        self.env = env
        self.artefacts = artefacts
        self.log_file = artefacts.path(f"{consumer}.log")
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self.last_scrapes: dict[int, str] = {}
        """The last /metrics scrape of each process started (by start number)."""

    def start(self) -> ConsumerProcess:
        self.port = free_port()
        env = {**self.env, "CSCART_FM_METRICS_PORT": str(self.port)}
        self.process = start_cli(["run", self.consumer], env, self.log_file)
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}{path}", timeout=timeout
            ) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), ""
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def wait_ready(self, timeout: float = 90) -> float:
        """Seconds until /readyz answers 200 (the process must stay alive meanwhile)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.alive():
                raise AssertionError(
                    f"cscart-fm run {self.consumer} exited ({self.process and self.process.returncode})"
                    ":\n" + self.log_file.read_text(errors="replace")[-4000:]
                )
            if self.ready():
                return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"cscart-fm run {self.consumer} not ready after {timeout} s")

    def metrics(self) -> str:
        status, text = self.get("/metrics", timeout=10)
        return text if status == 200 else ""

    def scrape(self) -> str:
        """Keep a /metrics scrape in the artefacts (check 5 searches them) and return it."""
        text = self.metrics()
        if text:
            self.last_scrapes[self.starts] = text
            self.artefacts.path(f"{self.consumer}-metrics-{self.starts}-{time.time_ns()}.txt") \
                .write_text(text)
        return text

    def kill(self) -> None:
        """SIGKILL, after a last scrape."""
        assert self.process is not None
        self.scrape()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.kills += 1

    def stop(self) -> int | None:
        """SIGTERM (scraped first); returns the exit code."""
        if self.process is None:
            return None
        if self.alive():
            self.scrape()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def start_all(processes: Iterable[ConsumerProcess]) -> None:
    """Start the processes together (they boot side by side), then wait until each is ready."""
    started = [process.start() for process in processes]
    for process in started:
        process.wait_ready()


def total_over_processes(process: ConsumerProcess, name: str, **labels: str) -> float:
    """A counter summed over every process started (from each one's last scrape)."""
    return sum(metric_value(text, name, **labels) for text in process.last_scrapes.values())


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    import re

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


# --- the broker, from the test's side --------------------------------------------------------------


def queue_depth(url: str, name: str) -> int:
    with Connection(url, connect_timeout=10) as conn:
        return int(conn.default_channel.queue_declare(queue=name, passive=True).message_count)


@dataclass
class DeadLetter:
    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]


def raw_body(message: Any) -> bytes:
    """The body as bytes: py-amqp hands it over decoded (a str) when it carries a
    ``content_encoding`` it can decode, and an empty body as ``""``."""
    body = message.body
    if isinstance(body, bytes):
        return body
    try:
        return str(body).encode(message.content_encoding or "utf-8")
    except (LookupError, UnicodeError):
        return str(body).encode("utf-8", "surrogateescape")


def browse_queue(url: str, queue_name: str) -> list[DeadLetter]:
    """Every message of a queue, read without acknowledging: they all go back to the queue
    when the channel closes (for counting what a ``.dlq`` holds before it is collected)."""
    seen: list[DeadLetter] = []
    with Connection(url, connect_timeout=10) as conn:
        channel = conn.channel()
        while True:
            message = channel.basic_get(queue=queue_name, no_ack=False)
            if message is None:
                break
            body = message.body
            if not isinstance(body, bytes):
                try:
                    body = str(body).encode(message.properties.get("content_encoding") or "utf-8")
                except (LookupError, UnicodeError):
                    body = str(body).encode("utf-8", "surrogateescape")
            props = dict(message.properties)
            headers = dict(props.pop("application_headers", None) or {})
            seen.append(DeadLetter(body, headers, props))
        channel.close()
    return seen


def take_dead_letters(url: str, consumer: str, state_url: str,
                      artefacts: Artefacts) -> list[DeadLetter]:
    """Every dead letter of a consumer, wherever it is: the service moves them from
    ``cscart.<consumer>.dlq`` into its state store (``DeadLetterCollector``); what is still in
    the queue is collected here the same way (``cscart_fm.support.dead_letters.collect``). Written to
    the artefacts as support would see them: body, headers, properties."""
    import sqlalchemy as sa
    from structlog.testing import capture_logs

    from cscart_fm.cli.wiring import open_state
    from cscart_fm.support.dead_letters.collect import collect
    from cscart_fm.support.dead_letters.store import dead_letters

    store = open_state(state_url)
    try:
        with capture_logs():  # the collector's log lines are not this test's output
            collect(store, url, [consumer])
        with store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(dead_letters.c.body, dead_letters.c.headers,
                          dead_letters.c.properties)
                .where(dead_letters.c.consumer == consumer)
                .order_by(dead_letters.c.id)
            ).all()
    finally:
        store.close()
    taken = [DeadLetter(bytes(row.body), dict(row.headers or {}), dict(row.properties or {}))
             for row in rows]
    if taken:
        out = artefacts.path(f"dead-letters-{consumer}.jsonl")
        with out.open("ab") as handle:
            for letter in taken:
                handle.write(json.dumps({"headers": letter.headers,
                                         "properties": letter.properties},
                                        default=str).encode() + b"\n")
                handle.write(letter.body + b"\n")
    return taken


# --- artefacts and check 5 -----------------------------------------------------------------------------


class Artefacts:
    """What a run left for people to read: logs, dead letters, metrics scrapes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file())


def needles(values: Iterable[str]) -> set[bytes]:
    """Each secret as it could appear: as is, URL-encoded, and the Basic credentials in
    base64 (an Authorization header that reached a log)."""
    found: set[bytes] = set()
    for value in values:
        found.add(value.lower().encode())
        found.add(quote(value, safe="").lower().encode())
    basic = base64.b64encode(f"{API_USER}:{API_KEY}".encode())
    found.add(basic.lower())
    found.add(base64.b64encode(API_KEY.encode()).lower())
    return found


# A token starts only where a run of its characters does: trying every position inside a long
# run would make the search quadratic.
_EMAILISH = re.compile(rb"(?<![a-z0-9._%+\-])[a-z0-9._%+\-]+(?:@|%40)[a-z0-9.\-]+")


def find_leaks(files: Iterable[Path], secrets_: Iterable[str]) -> list[str]:
    """Where a secret occurs: ``file: needle`` lines (case-insensitive search).

    Thousands of the secrets are e-mail addresses, and searching hundreds of megabytes once
    per address never ends: every e-mail-like token of a file is found in one pass instead,
    and an address counts as found inside any token that contains it (its local part a tail
    of the token's, its domain a head of the token's). The few other needles (the API key
    and its encodings) are searched for as they are."""
    plain: list[bytes] = []
    by_domain: dict[bytes, set[bytes]] = {}
    for needle in needles(secrets_):
        sep = b"@" if b"@" in needle else b"%40"
        local, found_sep, domain = needle.partition(sep)
        if not found_sep or not local or not domain or sep in domain:
            plain.append(needle)
        else:
            by_domain.setdefault(domain, set()).add(local)
    leaks = []
    for path in files:
        text = path.read_bytes().lower()
        found = {needle for needle in plain if needle in text}
        for match in _EMAILISH.finditer(text):
            token = match.group()
            local, _, domain = token.partition(b"@" if b"@" in token else b"%40")
            for known, locals_ in by_domain.items():
                if domain.startswith(known):
                    found.update(local[i:] + b"@" + known for i in range(len(local))
                                 if local[i:] in locals_)
        leaks.extend(f"{path.name}: {needle.decode(errors='replace')}" for needle in sorted(found))
    return leaks


@dataclass
class LeakRegistry:
    """Every run's artefacts and the secrets it must not show, for the suite's final check."""

    runs: dict[str, tuple[Artefacts, set[str]]] = field(default_factory=dict)


def audit(artefacts: Artefacts, leak_registry: LeakRegistry, secrets_: Iterable[str]) -> int:
    """Check 5 for one run: no secret in its logs, dead letters or scrapes. Returns the
    number of files searched."""
    values = {API_KEY, *secrets_}
    leak_registry.runs[artefacts.root.name] = (artefacts, values)
    files = artefacts.files()
    assert files, "the run left no artefacts to search"
    leaks = find_leaks(files, values)
    assert not leaks, "secrets or shoppers' e-mails found:\n" + "\n".join(leaks[:20])
    return len(files)


__all__ = [
    "FULL",
    "Artefacts",
    "ConsumerProcess",
    "DeadLetter",
    "LeakRegistry",
    "PrivateBroker",
    "audit",
    "find_leaks",
    "metric_value",
    "queue_depth",
    "report",
    "size",
    "start_all",
    "take_dead_letters",
    "total_over_processes",
]
