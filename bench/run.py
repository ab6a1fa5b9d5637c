"""Run the benchmarks, print the table, keep the results in docs/benchmarks.md.

    python -m bench.run                 # all five, full size
    python -m bench.run --only 3 --only 4
    python -m bench.run --quick         # smaller sizes, to try the machinery (not for the doc)

Needs RabbitMQ on 127.0.0.1:5672 (guest/guest, override with CSCART_FM_BENCH_AMQP) and
``rabbitmqctl`` (each benchmark gets a fresh vhost). Nothing here asserts a time: the table
says which goals were met. Results of the benchmarks run are merged into
``bench/results.json`` (the others keep their last figures) and rendered into the results
section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

from .common import REPO, Result, load_average, log, machine

BENCHMARKS: dict[int, tuple[str, str]] = {
    1: ("bench.b1_order_import", "Order import of 2,000 new orders"),
    2: ("bench.b2_idle_tick", "Idle tick cost"),
    3: ("bench.b3_stock", "Stock snapshot"),
    4: ("bench.b4_runtime", "Runtime overhead"),
    5: ("bench.b5_memory", "Memory of a 100,000-order backfill"),
}
RESULTS = REPO / "bench" / "results.json"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def commit() -> str:
    """The commit measured, marked when the service's code differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,  # noqa: S607
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "cscart_fm", "cscart", "consumers",  # noqa: S607
             "producers", "schemas", "pyproject.toml"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (with uncommitted changes)" if dirty else head


def _met(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "**NO**")


def table(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["benchmark", "figure", "value", "goal", "met?"]]
    for result in results:
        for row in result["rows"]:
            rows.append([row["bench"], row["figure"], row["value"], row["goal"],
                         _met(row["met"])])
    return rows


def print_table(results: list[dict[str, Any]]) -> None:
    rows = table(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for result in results:
        for row in result["rows"]:
            if row["notes"]:
                print(f"  [{row['bench']}] {row['figure']}: {row['notes']}")


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [BEGIN, "", "| benchmark | figure | value | goal | met? |", "|---|---|---|---|---|"]
    for row in table(results)[1:]:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    lines.append("")
    for result in results:
        run = result["run"]
        lines.append(f"### {result['number']}. {result['title']}")
        lines.append("")
        lines.append(
            f"Run {run['date']} on commit {run.get('commit', 'unknown')} with "
            f"`{run['command']}` in {run['seconds']:.0f} s; machine: "
            f"{run['machine']['cores']} cores ({run['machine']['cpu']}), "
            f"{run['machine']['memory']}, Python {run['machine']['python']}, "
            f"RabbitMQ {run['machine']['rabbitmq']}; load average before: "
            f"{run['load_before']}, after: {run['load_after']}."
        )
        lines.append("")
        for detail in result["details"]:
            lines.append(detail)
            lines.append("")
        noted = [row for row in result["rows"] if row["notes"]]
        for row in noted:
            lines.append(f"- {row['figure']}: {row['notes']}")
        if noted:
            lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_doc(results: list[dict[str, Any]]) -> None:
    block = markdown(results)
    if DOC.exists():
        text = DOC.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            DOC.write_text(head + block + tail)
            return
        DOC.write_text(text.rstrip() + "\n\n## Results\n\n" + block + "\n")
        return
    DOC.write_text("# Benchmarks\n\n## Results\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=int, action="append", choices=sorted(BENCHMARKS),
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes; results are printed, not written to the doc")
    parser.add_argument("--no-doc", action="store_true", help="do not update the doc")
    args = parser.parse_args(argv)
    chosen = sorted(set(args.only or BENCHMARKS))
    command = "python -m bench.run" + (
        " " + shlex.join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""
    )
    info = machine()
    measured = commit()
    log(f"machine: {info}")
    stored: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    fresh: list[dict[str, Any]] = []
    failed = False
    for number in chosen:
        module_name, title = BENCHMARKS[number]
        log(f"benchmark {number}: {title}")
        load_before = load_average()
        started = time.monotonic()
        try:
            module = importlib.import_module(module_name)
            result: Result = module.run(quick=args.quick)
        except Exception as exc:
            failed = True
            log(f"benchmark {number} failed: {type(exc).__name__}: {exc}")
            import traceback

            traceback.print_exc()
            continue
        result.seconds = time.monotonic() - started
        entry = {
            "number": number,
            "title": result.title,
            "rows": [row.as_dict() for row in result.rows],
            "details": result.details,
            "run": {
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "command": command,
                "commit": measured,
                "quick": args.quick,
                "seconds": result.seconds,
                "machine": info,
                "load_before": load_before,
                "load_after": load_average(),
            },
        }
        fresh.append(entry)
        if not args.quick:
            stored[str(number)] = entry
    print()
    print_table(fresh)
    if not args.quick and not args.no_doc and fresh:
        RESULTS.write_text(json.dumps(stored, indent=2, ensure_ascii=False) + "\n")
        write_doc([stored[key] for key in sorted(stored, key=int)])
        log(f"results written to {DOC.relative_to(REPO)} and {RESULTS.relative_to(REPO)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
