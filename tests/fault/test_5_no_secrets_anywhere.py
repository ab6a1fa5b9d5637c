"""Fault 5: the API key and the shoppers' e-mails are found nowhere in the logs, dead letters
(bodies and headers) or metrics scrapes of all the runs above.

Each run already checks its own artefacts at its end; this test searches everything the
session's runs left, together, for every secret any of them used (so a value one run seeded
cannot surface in another's output either). It runs last (files are collected in name order).
"""

from __future__ import annotations

import pytest

from tests.support.pipeline import API_KEY

from .harness import LeakRegistry, find_leaks, report

pytestmark = pytest.mark.broker


def test_no_api_key_or_shopper_email_in_any_log_dead_letter_or_metrics_scrape(
    leak_registry: LeakRegistry,
) -> None:
    if not leak_registry.runs:
        pytest.skip("run it with the rest of tests/fault: it searches what those runs left")
    secrets = {API_KEY}
    files = []
    kinds = {"logs": 0, "dead letters": 0, "metrics scrapes": 0}
    for artefacts, values in leak_registry.runs.values():
        secrets |= values
        for path in artefacts.files():
            files.append(path)
            if path.suffix == ".log":
                kinds["logs"] += 1
            elif path.name.startswith("dead-letters-"):
                kinds["dead letters"] += 1
            elif "-metrics-" in path.name:
                kinds["metrics scrapes"] += 1
    leaks = find_leaks(files, secrets)
    report("5. secrets nowhere", {
        "runs searched": len(leak_registry.runs),
        "files searched": len(files),
        **{f"  {k}": v for k, v in kinds.items()},
        "megabytes searched": round(sum(p.stat().st_size for p in files) / 1e6, 1),
        "secret values searched for": len(secrets),
        "found": len(leaks),
    })
    assert files
    assert not leaks, "\n".join(leaks[:20])
