"""The linter and the type checker are part of the test command (issue 17 item 7): ``ruff check``
and ``mypy`` run with the configuration in pyproject.toml ([tool.ruff], [tool.mypy]: strict on
the core layers) and must report nothing. A failure shows their findings as ``file:line``.

Both come with the ``test`` extra (``pip install -e '.[test]'``, which ``.ci/setup`` runs); mypy
keeps its cache in ``.mypy_cache`` (a cold run takes a few seconds, a warm one under one)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: pip install -e '.[test]' (the test extra has it)")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_ruff_reports_nothing():
    r = _run("ruff", "check", "--no-cache", "--output-format", "concise", "--quiet")
    assert r.returncode == 0, f"ruff check found problems:\n{r.stdout}{r.stderr}"


def test_mypy_reports_nothing():
    r = _run("mypy", "--no-error-summary", "--show-error-codes")
    assert r.returncode == 0, f"mypy found problems:\n{r.stdout}{r.stderr}"
