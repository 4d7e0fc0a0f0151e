"""Benchmarks report ratios measured in the same run; they never assert wall-clock times."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.requires_arch("x86_64")
RESULTS: list = []            # shown in the terminal summary (conftest.py)


def test_bench_reports_ratios(record_property):
    r = subprocess.run([sys.executable, "-m", "pykvm", "bench", "--json", "--exits", "3000"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    e, m = res["exit_loop"], res["memory"]
    for k in ("ratio_py_over_c", "ratio_c_exit_over_ioctl"):
        assert e[k] > 0
        record_property(k, e[k])
    assert m["machine_kib"] >= 0 and m["raw_vm_kib"] >= 0
    record_property("ratio_machine_over_raw", m["ratio_machine_over_raw"])
    RESULTS.append(res)
