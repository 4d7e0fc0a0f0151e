"""A Linux guest on RISC-V KVM, booted by ``pykvm run`` inside the RISC-V lab.

The lab image carries its own Debian kernel (an ``Image``) and a busybox initramfs
(``pykvm/lab/linux_guest.py``) in ``/lab/linux``. pykvm boots them as kvmtool would
(``lkvm run -k Image -i initrd``): the guest reaches ``/init``, suspends to RAM through SBI system
suspend (``echo mem > /sys/power/state``), pykvm sleeps ``--suspend-seconds`` and resumes the hart,
the guest prints after the resume and powers off through SBI SRST (status 0).
"""
import os
import re

import pytest

from pykvm.lab import linux_guest
from pykvm.testing.plugin import LACKS

pytestmark = [
    pytest.mark.requires_arch("riscv64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]

SUSPEND_S = 2
TIMEOUT = 180             # seconds; the boot takes 10-25 s in the lab (a stall must not eat the lab's 600)
CPU = os.environ.get("PYKVM_LAB_CPU", "")


@pytest.fixture(scope="module")
def files():
    f = linux_guest.lab_files()
    if f is None:
        pytest.skip(f"{LACKS} a Linux guest kernel and initramfs ({linux_guest.LAB_DIR}: the labs carry them)")
    return f


def _boot(files, cpu_type, *, suspend, vcpus=2, timeout=TIMEOUT):
    kernel, initrd = files
    cmdline = "console=ttyS0 panic=-1 loglevel=4" + (" pykvm.suspend" if suspend else "")
    extra = ["--cpu-type", cpu_type, "--vcpus", str(vcpus), "--mem", "256M"]
    if suspend:
        extra += ["--suspend-seconds", str(SUSPEND_S)]
    r = linux_guest.run_guest(kernel, initrd, cmdline=cmdline, extra=extra, timeout=timeout,
                              echo=linux_guest.console_echo("guest"))
    print(f"\n$ {' '.join(r.argv[2:])}\n{r.console}\n(exit {r.status}, {r.seconds:.1f} s){r.stderr}")
    return r


def _isa(r):
    m = r.first("isa:")
    assert m, f"/init printed no isa line:\n{r.tail()}"
    return m[1].split(":", 1)[1].strip()


def test_linux_boots_to_init_suspends_resumes_and_powers_off(files, record_property):
    r = _boot(files, "max", suspend=True)
    init = r.first("/init reached")
    assert init, f"the guest did not reach /init (exit {r.status}):\n{r.tail()}\n{r.stderr}"
    record_property("linux_boot_to_init_s", round(init[0], 1))
    up = re.search(r"uptime ([\d.]+)s", init[1])
    if up:
        record_property("linux_guest_uptime_at_init_s", float(up.group(1)))
    assert "2 CPUs" in init[1], init[1]
    # --cpu-type max: the guest's /proc/cpuinfo has what KVM offers, Zabha on QEMU's max model
    exts = _isa(r).split("_")
    if CPU == "max":
        assert "zabha" in exts, exts
    assert "svvptc" in exts or CPU != "max", exts
    before, after = r.first("suspending to RAM"), r.first("resumed")
    assert before, f"no suspend attempt:\n{r.tail()}"
    assert after, f"the guest did not print after a resume:\n{r.tail()}"
    # the host slept --suspend-seconds between the two lines, and the guest's counter saw it
    assert after[0] - before[0] >= SUSPEND_S, (before, after)
    record_property("linux_suspend_to_resume_s", round(after[0] - before[0], 2))
    asleep = r.first("time asleep by the counter")
    assert asleep, f"no counter reading after the resume:\n{r.tail()}"
    ms = int(re.search(r"(\d+) ms", asleep[1]).group(1))
    record_property("linux_guest_counter_asleep_ms", ms)
    assert ms >= SUSPEND_S * 1000, asleep
    assert r.first("CPUs online after resume")[1].endswith("0-1"), r.tail()
    assert r.first("powering off")
    assert r.status == 0, f"pykvm run exited {r.status}: {r.stderr}"


def test_linux_with_cpu_type_min_has_only_the_base_isa(files, record_property):
    # Under min the vCPU has no Sstc, yet KVM keeps driving its timer through vstimecmp ("Enable
    # sstc for every vcpu if available in hardware", kvm_riscv_vcpu_timer_init) while henvcfg.STCE
    # is clear for it: in the lab such a guest now and then misses its timer interrupts and stalls
    # (RCU stalls, "Watchdog detected hard LOCKUP"), more often with two vCPUs. Not pykvm's doing
    # (the Python loop stalls alike). One vCPU, two attempts under `min`; where both stall (in
    # some lab boots every attempt does, at the first timer wait after the serial probe), `min`
    # plus Sstc alone — which does not stall — checks the same thing: no extension beyond the
    # base ISA but the one asked for. Recorded either way.
    # A boot takes about 20 s under the lab's `max` QEMU model; 75 s means a stall.
    cpu_type, extra = "min", set()
    for attempt in (1, 2, 3):
        if attempt == 3:
            cpu_type, extra = "min,sstc", {"sstc"}
        r = _boot(files, cpu_type, suspend=False, vcpus=1, timeout=75)
        if r.status != 124:
            break
    record_property("linux_min_boot_attempts", attempt)
    record_property("linux_min_cpu_type", cpu_type)
    assert r.status == 0, f"pykvm run exited {r.status}:\n{r.tail()}\n{r.stderr}"
    exts = _isa(r).split("_")
    assert exts[0] == "rv64imafdc" and "zabha" not in exts and "svvptc" not in exts, exts
    # beyond rv64imafdc only what Linux derives from those letters itself (A: Zaamo, Zalrsc;
    # C with D: Zca, Zcd); the device tree names rv64imafdc alone (plus what was asked for)
    assert set(exts[1:]) <= {"zaamo", "zalrsc", "zca", "zcd", "zicsr", "zifencei"} | extra, exts
