"""`pykvm bench --curves`: the shape of the cost curves it reports. Like the ratio benchmarks, these
tests never assert a wall-clock value or a rate: they check that every curve is there with its
units and at least two points (or an honest reason why it has none), that the anchors sit beside
the curves they belong to, and that the limits the host imposes are stated, not hidden."""
import json
import os
import subprocess
import sys

import pytest

from pykvm import bench

pytestmark = [pytest.mark.requires_arch("x86_64"), pytest.mark.requires_kvm]


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    """One `pykvm bench --curves --quick --json --plot` run, shared by the tests below."""
    png = tmp_path_factory.mktemp("curves") / "curves.png"
    r = subprocess.run([sys.executable, "-m", "pykvm", "bench", "--curves", "--quick", "--json",
                        "--plot", str(png)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)          # exactly one JSON object, nothing else on stdout
    return res, png, r.stderr


def _numbers(pair):
    return (len(pair) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                   for v in pair))


def test_every_curve_has_points_and_units_or_says_why_not(curves):
    res, _, _ = curves
    assert res["kind"] == "curves" and res["quick"] is True and res["seconds"] > 0
    assert set(res["curves"]) == set(bench.CURVE_NAMES)
    for name, cv in res["curves"].items():
        for key in ("title", "x", "x_unit", "y", "y_unit"):
            assert isinstance(cv[key], str) and cv[key], (name, key)
        assert cv["points"] == cv["series"][cv["main_series"]], name
        if cv["not_measured"] is None:
            assert len(cv["points"]) >= 2, (name, cv["points"])
        else:                           # a reason a reader can act on, and no invented points
            assert isinstance(cv["not_measured"], str) and len(cv["not_measured"]) > 10, name
            assert cv["points"] == [], name
            assert any(cv["not_measured"] in n for n in res["notes"]), name
        for label, pts in cv["series"].items():
            assert all(_numbers(p) for p in pts), (name, label, pts)
            xs = [x for x, _ in pts]
            assert xs == sorted(xs) or name == "kut_vs_qemu", (name, label, xs)


def test_the_curves_span_the_work_the_issue_names(curves):
    res, _, _ = curves
    c = res["curves"]
    cpus = os.cpu_count()
    vcpus = [x for x, _ in c["exits_vs_vcpus"]["points"]]
    assert vcpus[0] == 1 and vcpus[-1] == 2 * cpus and cpus in vcpus   # to overcommit
    assert c["exits_vs_vcpus"]["host_cpus"] == cpus
    for label in ("raw C", "pykvm Vm API", "Machine"):
        alive = [x for x, _ in c["lifecycle_vs_alive"]["series"][label]]
        assert alive[0] == 0, label
        if alive[-1] != 1000:           # a host limit: said in the curve's notes
            assert any("alive" in n or "limit" in n for n in c["lifecycle_vs_alive"]["notes"])
    assert [x for x, _ in c["memory_per_vm_vs_vms"]["points"]] == list(bench.MEM_COUNTS)
    for name in ("create_ms_vs_ram", "resident_vs_ram"):
        cv = c[name]
        real = [x for x, _ in cv["series"]["real mode (flat HLT guest)"]]
        assert real == [s >> 20 for s in bench.RAM_SIZES], (name, real)   # 64 MiB .. 64 GiB
        long_mode = [x for x, _ in cv["series"]["long mode (tiny ELF64)"]]
        for size in set(real) - set(long_mode):  # sizes long mode cannot boot: the refusal
            assert any(f"refused {size >> 10} GiB" in n for n in cv["notes"]), (name, size)


def test_anchors_stand_beside_the_matching_curves_with_their_source(curves):
    res, _, _ = curves
    assert set(res["anchors"]) == {"firecracker_creation_rate", "firecracker_vmm_overhead"}
    for a in res["anchors"].values():
        assert a["value"] > 0 and a["unit"] and "Firecracker" in a["source"]
        assert a["url"].startswith("https://github.com/firecracker-microvm/firecracker/")
    c = res["curves"]
    assert c["lifecycle_vs_alive"]["anchor"]["key"] == "firecracker_creation_rate"
    assert c["lifecycle_vs_alive"]["anchor"]["value"] == 5.0
    assert c["lifecycle_vs_alive"]["anchor"]["host_value"] == 5.0 * os.cpu_count()
    assert c["memory_per_vm_vs_vms"]["anchor"]["key"] == "firecracker_vmm_overhead"
    assert c["memory_per_vm_vs_vms"]["anchor"]["value"] == 5120.0       # KiB: 5 MiB
    assert c["memory_per_vm_vs_vms"]["y_unit"] == "KiB"
    for cv in c.values():               # each anchor says how far it is like for like
        if cv["anchor"]:
            assert cv["anchor"]["comparable"], cv["title"]


def test_host_progress_and_plot(curves):
    res, png, err = curves
    h = res["host"]
    assert h["cpus"] == os.cpu_count() and h["kernel"] and h["kvm_module"]
    assert "loadavg" in h and "loadavg_after" in h      # a busy host is visible in the numbers
    lines = [ln for ln in err.splitlines() if ln.startswith("pykvm bench --curves: ")]
    assert len(lines) >= len(bench.CURVE_NAMES)         # progress went to stderr
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_text_report_names_every_curve(curves):
    res, _, _ = curves
    text = bench.curves_report(res)
    for name in bench.CURVE_NAMES:
        assert f"({name})" in text
    assert "Firecracker" in text
