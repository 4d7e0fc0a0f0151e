"""Upstream kvm-unit-tests riscv, booted by ``pykvm run`` with no Python glue, inside the lab.

The build comes from outside this checkout (see tests/riscv/kut.py): the lab copies it in when
``PYKVM_KUT_RISCV_DIR`` names one on the host, else these tests skip. Each test kernel is a
Linux Image that reads its environment from the initrd and prints through the ns16550a; we run
it as QEMU's ``virt`` would: ``pykvm run X.flat --initrd ENV --vcpus 2 --cmdline ARGS``.

When the build carries the QEMU + OpenSBI counts (``python tests/riscv/kut.py qemu`` on the
host), pykvm must pass at least as many checks in every compared group: SBI extensions KVM
serves itself (base, ipi) or leaves to the VMM (dbcn, susp). Failures elsewhere are KVM's own
gaps (e.g. non-retentive HSM suspend): recorded, not counted.
"""
import json
import os
import subprocess
import sys

import pytest

import kut

pytestmark = [
    pytest.mark.requires_arch("riscv64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = os.environ.get("PYKVM_LAB_CPU", "")
KUT = kut.kut_dir(CHECKOUT)
needs_kut = pytest.mark.skipif(
    KUT is None, reason="pykvm: host lacks a kvm-unit-tests riscv build (set "
    "PYKVM_KUT_RISCV_DIR to one when running the lab; see tests/riscv/kut.py)")


def baseline():
    """The QEMU + OpenSBI counts for this lab's CPU model, if the build carries them."""
    path = os.path.join(KUT, kut.BASELINE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["results"].get(CPU)


def run_pykvm(name, flat, args, tmp_path):
    env = kut.write_env(str(tmp_path / "kut.env"))
    argv = [sys.executable, "-m", "pykvm", "run", os.path.join(KUT, "riscv", flat),
            "--initrd", env, "--vcpus", str(kut.SMP), "--cmdline", args, "--mem", kut.MEM,
            "--timeout", "400", "--json"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=500)
    assert r.stdout, f"pykvm run printed nothing (status {r.returncode}): {r.stderr[-2000:]}"
    d = json.loads(r.stdout)
    assert d["exit_code"] == r.returncode
    (tmp_path / f"{name}.log").write_text(d["console"])
    return d, kut.count(name, d["console"])


def groups(counts):
    return {g: v for g, v in counts.items() if not g.startswith("_")}


@needs_kut
@pytest.mark.parametrize("name, flat, args", kut.RUNS, ids=[r[0] for r in kut.RUNS])
def test_kvm_unit_tests(name, flat, args, tmp_path, record_property):
    d, counts = run_pykvm(name, flat, args, tmp_path)
    console = d["console"]
    record_property(f"kut_{name}_pykvm", json.dumps(groups(counts), sort_keys=True))
    record_property(f"kut_{name}_seconds", round(d["seconds"], 1))
    # ended by the test's own exit(): an SBI shutdown, after its summary
    assert d["exit"] == "SYSTEM_EVENT", f"{d['exit']}: {d['detail']}\n{console[-3000:]}"
    assert "SUMMARY:" in console and counts["_exit"] is not None, console[-3000:]
    compared = kut.COMPARED[name]
    pykvm_fails = [f for f in counts["_failures"] if kut.group_of(name, f.split(": ", 1)[1])
                   in compared]
    assert not pykvm_fails, "\n".join(pykvm_fails)
    other = [f for f in counts["_failures"] if f not in pykvm_fails]
    record_property(f"kut_{name}_kvm_gaps", json.dumps(other))
    if name == "selftest":
        assert d["exit_code"] == 0 and counts["_exit"] == 1, console[-3000:]
        assert counts["selftest"].get("PASS", 0) >= 7 and set(counts["selftest"]) == {"PASS"}
        assert "matched 3 command line parameters" in console
    base = baseline()
    if base is None:
        return
    qemu = base[name]
    record_property(f"kut_{name}_qemu", json.dumps(groups(qemu), sort_keys=True))
    short = {g: (counts.get(g, {}).get("PASS", 0), qemu.get(g, {}).get("PASS", 0))
             for g in compared}
    record_property(f"kut_{name}_pass_pykvm_vs_qemu", json.dumps(short, sort_keys=True))
    worse = {g: v for g, v in short.items() if v[0] < v[1]}
    assert not worse, f"fewer PASS than QEMU + OpenSBI (pykvm, qemu): {worse}"
