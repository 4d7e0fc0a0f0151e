"""The built-in guests as a user meets them: ``pykvm guests`` names each with one line from its
source's leading comment, and ``idle`` keeps a pc machine running (halted, interrupts off) until
something stops it, which the control verbs need."""
import subprocess
import sys

import pytest

from pykvm import guests

pytestmark = pytest.mark.requires_kvm


def _pykvm(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_guests_lists_each_with_its_description():
    r = _pykvm("guests")
    assert r.returncode == 0, r.stderr
    rows = dict(line.split(None, 1) for line in r.stdout.splitlines() if " " in line.strip())
    assert set(guests.available()) <= {line.split()[0] for line in r.stdout.splitlines()}
    assert rows["hello"] == "The default guest."
    assert rows["idle"].startswith("Waits until it is stopped")
    assert all(len(v) <= 100 for v in rows.values())


def test_idle_runs_until_its_deadline_on_the_pc_machine():
    r = _pykvm("run", "idle", "--machine", "pc", "--timeout", "1", "--no-input")
    assert r.returncode == 124, (r.returncode, r.stderr)
    assert "idle: halted until stopped" in r.stdout
    assert "did not finish within 1.0 s" in r.stderr
