"""`pykvm guest build -o PATH` (issue 16, fault 9): a place the host will not let us write (a
read-only or forbidden file, a full disk) is output that cannot be written — one line and
status 8 — while a path that can never be an output (a missing directory, a symlink loop) is bad
input — one line and status 2, naming why."""
import os
import subprocess
import sys

import pytest

from pykvm import status


@pytest.fixture
def source(tmp_path):
    p = tmp_path / "g.c"
    p.write_text('#include "pykvm_guest.h"\nvoid guest_main(void) { }\n')
    return p


def _build(source, out):
    return subprocess.run([sys.executable, "-m", "pykvm", "guest", "build", str(source),
                           "-o", str(out)], capture_output=True, text=True, timeout=300)


def _one_line(r):
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


@pytest.mark.parametrize("out", ["/dev/full", "/sys/kernel/notes"])
def test_a_place_the_host_refuses_is_status_8(source, out):
    if not os.path.exists(out):
        pytest.skip(f"{out} does not exist on this host")
    r = _build(source, out)
    assert r.returncode == status.VMM_ERROR, r.stderr
    assert "cannot write the image to" in _one_line(r)


def test_a_symlink_loop_is_named(source, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    r = _build(source, tmp_path / "a" / "x.elf")
    assert r.returncode == status.BAD_INPUT
    assert "Too many levels of symbolic links" in _one_line(r)
