"""The layers import only downward (``pyproject.toml``'s import-linter contracts): checked on
the tree as it is, and shown to fail on a tree with one upward import added."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "cscart_fm", "cscart", "cscart_emulator", "consumers", "producers")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    command = Path(sys.executable).with_name("lint-imports")
    if not command.exists():
        pytest.fail("lint-imports is missing: ./dev test installs import-linter")
    return subprocess.run(
        [str(command), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_tree_keeps_its_layers() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("schemas/messages.py", "from cscart_fm.core import errors  # noqa: F401"),
        ("cscart_fm/core/runtime.py", "from consumers import registry  # noqa: F401"),
        ("cscart/client.py", "from consumers.order_poll import handler  # noqa: F401"),
        ("consumers/shipment_lodged/handler.py", "from cscart_fm.support import dead_letters"),
    ],
)
def test_an_upward_import_breaks_the_check(tmp_path: Path, module: str, upward: str) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    # Inside a function, as a cycle would be dodged: the check sees those too.
    path.write_text(path.read_text() + f"\n\ndef _upward() -> None:\n    {upward}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
