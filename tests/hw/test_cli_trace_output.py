"""`pykvm run --trace` asks for output on stderr: where stderr is closed or full, that output is
lost, and the run fails with status 8 instead of the guest's status (issue 16, fault 9)."""
import json
import os
import subprocess
import sys

import pytest

from pykvm import status

PYKVM = [sys.executable, "-m", "pykvm"]


def _run(args, **kw):
    return subprocess.run(PYKVM + ["run", "--trace"] + args, capture_output=False,
                          stdout=subprocess.PIPE, timeout=120, **kw)


@pytest.mark.requires_kvm
def test_trace_to_a_working_stderr_keeps_the_guests_status():
    r = subprocess.run(PYKVM + ["run", "--trace", "hello"], capture_output=True, timeout=120)
    assert r.returncode == 0
    assert b"pykvm: exits " in r.stderr


@pytest.mark.requires_kvm
def test_trace_to_a_full_stderr_is_a_failure():
    with open("/dev/full", "wb") as full:
        r = _run(["hello"], stderr=full)
    assert r.returncode == status.VMM_ERROR


@pytest.mark.requires_kvm
@pytest.mark.parametrize("json_out", [False, True])
def test_trace_with_stderr_closed_is_a_failure(json_out):
    r = subprocess.run(PYKVM + ["run", "--trace"] + (["--json"] if json_out else []) + ["hello"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=120,
                       preexec_fn=lambda: os.close(2))
    assert r.returncode == status.VMM_ERROR
    if json_out:
        d = json.loads(r.stdout)
        assert d["exit"] == "vmm_error" and d["exit_code"] == status.VMM_ERROR
        assert "--trace" in d["detail"]
