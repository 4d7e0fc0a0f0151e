"""RISC-V on real KVM, run inside the RISC-V lab (QEMU with the H extension, a Debian kernel).

The lab exports PYKVM_LAB_CPU, the QEMU CPU model of this boot: "max" (QEMU 10's model with
Svvptc, Zabha and Ziccrse) or "rv64" (no Zabha).
"""
import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from pykvm.arch.riscv import cpu, regs
from pykvm.arch.riscv.extensions import KVM_ISA_NEVER_DISABLE
from pykvm.errors import KvmNotFound
from pykvm.report import GuestAssertion
from pykvm.runloop import RunLoop
from pykvm.testing.reference_loop import ReferenceLoop

pytestmark = pytest.mark.requires_arch("riscv64")
CPU = os.environ.get("PYKVM_LAB_CPU", "")


@pytest.fixture
def vcpu(kvm):
    with kvm.create_vm() as vm:
        yield vm.create_vcpu()


def test_reg_list_fully_decoded(vcpu):
    ids = vcpu.reg_list()
    named = cpu.named_reg_list(vcpu)
    assert len(ids) == len(named) >= 100
    unknown = [hex(r.id) for r in named if not r.known]
    assert not unknown, f"ids without a name: {unknown}"
    names = {r.name for r in named}
    for must in ("config.isa", "core.regs.pc", "core.mode", "csr.sstatus", "timer.frequency",
                 "isa_ext.i", "sbi_ext.dbcn"):
        assert must in names
    vlenb = vcpu.get_one_reg(regs.reg_id("vector.vlenb")) if "vector.vlenb" in names else None
    for r in named:
        assert regs.decode(r.id).name == r.name and regs.reg_id(r.name, vlenb=vlenb) == r.id
        assert r.size == 1 << ((r.id >> 52) & 0xF)
    assert cpu.timebase_frequency(vcpu) > 0
    assert vcpu.get_one_reg(regs.reg_id("timer.frequency")) == cpu.timebase_frequency(vcpu)


def test_new_isa_extensions_on_this_cpu_model(vcpu):
    assert CPU in ("max", "rv64"), "the lab sets PYKVM_LAB_CPU"
    exts = cpu.isa_extensions(vcpu)
    assert exts["svvptc"] is True and exts["ziccrse"] is True
    if CPU == "max":
        assert exts["zabha"] is True
        assert vcpu.get_one_reg(regs.reg_id("isa_ext.zabha")) == 1
    else:
        assert exts["zabha"] is None
        with pytest.raises(KvmNotFound):
            vcpu.get_one_reg(regs.reg_id("isa_ext.zabha"))
        with pytest.raises(cpu.ExtensionAbsent):
            cpu.set_isa_extension(vcpu, "zabha", True)


def _guest_isa(m):
    addr, length = m.sync(stage=1)
    text = m.memory.read(addr, length).decode()
    m.done()
    return text


def _disableable(vcpu):
    exts = cpu.isa_extensions(vcpu)
    # KVM refuses to disable what it cannot hide from a guest (KVM_ISA_NEVER_DISABLE)
    for name in ("svpbmt", "zicboz", "zicbom", "smstateen", "ssaia", "sstc", "v"):
        if exts.get(name) and name not in KVM_ISA_NEVER_DISABLE:
            return name
    pytest.fail(f"no disable-able extension among {sorted(n for n, v in exts.items() if v)}")


def test_disable_before_first_run(guest_vm, vcpu):
    ext = _disableable(vcpu)
    m = guest_vm("isa", cpu_type=f"max,-{ext}")
    assert cpu.isa_extensions(m.vcpus[0])[ext] is False
    isa = _guest_isa(m)
    assert isa.startswith("rv64i") and ext not in isa.split("_")
    m2 = guest_vm("isa", cpu_type="max")
    assert ext in _guest_isa(m2).split("_")


def test_change_after_first_run_is_busy(guest_vm):
    m = guest_vm("hello")
    m.done()
    ext = _disableable(m.vcpus[0])
    with pytest.raises(cpu.ExtensionBusy) as ei:
        cpu.set_isa_extension(m.vcpus[0], ext, False)
    assert ei.value.errno == errno.EBUSY and "busy" in str(ei.value).lower()


def test_min_cpu_type_is_exactly_rv64imafdc(guest_vm):
    m = guest_vm("isa", cpu_type="min")
    assert _guest_isa(m) == "rv64imafdc"
    res = m.platform.cpu_result
    # what KVM would not turn off is reported, not hidden
    assert all(not want for want in res.not_allowed.values()) or res.exact


def test_min_plus_named_extension(guest_vm, vcpu):
    ext = _disableable(vcpu)
    m = guest_vm("isa", cpu_type=f"min,{ext}")
    assert _guest_isa(m) == f"rv64imafdc_{ext}"


@pytest.mark.parametrize("a0", [0, 0xFFFFFFFF00000000, 1 << 32])
def test_system_suspend_waits_and_resumes(guest_vm, a0):
    # sleep_type is a 32-bit SBI argument: upper bits in a0 must not change a thing
    m = guest_vm("suspend", suspend_seconds=0.5)
    m.set_params(a0)
    hartid, resume, opaque, sleep_a0 = m.sync(stage=1)
    assert hartid == 0 and sleep_a0 == a0
    hart2, opaque2, marker, count = m.sync(stage=2)
    ev = m.platform.sbi.suspends[0]
    assert (ev.sleep_type, ev.a0, ev.resume_addr, ev.opaque) == (0, a0, resume, opaque)
    assert ev.woken_at - ev.requested_at >= 0.5 and not ev.woken_early
    assert (hart2, opaque2) == (0, opaque)         # a0 = hart id, a1 = opaque at the resume pc
    assert count == 1
    m.done()


def test_system_suspend_ends_early_on_wake(guest_vm):
    m = guest_vm("suspend", suspend_seconds=60)
    m.sync(stage=1)
    threading.Timer(0.2, m.platform.sbi.wake).start()
    m.sync(stage=2)
    assert m.platform.sbi.suspends[0].woken_early
    m.done()


def test_dbcn_console_reaches_host(guest_vm):
    m = guest_vm("dbcn")
    assert m.sync(stage=1) == (len("pykvm dbcn write\n"), 0)
    assert m.sync(stage=2) == (0, 0)
    m.done()
    assert m.console.decode() == "pykvm dbcn write\npykvm dbcn byte\n"


def test_srst_shutdown_is_a_system_event(guest_vm):
    m = guest_vm("srst")
    m.sync(stage=1)
    ev = m.step()
    assert ev.kind == "exit" and ev.exit.name == "SYSTEM_EVENT" and ev.exit.type_name == "SHUTDOWN"
    r = guest_vm("srst").run(timeout=30)
    assert (r.exit, r.exit_code) == ("SYSTEM_EVENT", 0)


def test_failing_guest_assertion_has_file_and_line(guest_vm):
    with pytest.raises(GuestAssertion, match=r"assert_fail\.c:\d+: \S.*\(left = \d+ .*right = "):
        guest_vm("assert_fail").done()


def test_zabha_in_the_guest(guest_vm):
    m = guest_vm("zabha")
    vals = m.sync(stage=1)
    if CPU == "max":
        assert vals == (1, 0x7F, 0x81, 0x11)       # amoadd.b: byte-wide, no carry into cell[1]
    else:
        assert vals == (0,)
    m.done()


def test_caps_json_has_riscv_section():
    out = subprocess.run([sys.executable, "-m", "pykvm", "caps", "--json"], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    rv = info["riscv"]
    assert info["arch"] == "riscv64" and {"i", "m", "a", "f", "d", "c"} <= set(rv["isa_extensions"])
    assert "dbcn" in rv["sbi_extensions"] + rv["sbi_extensions_disabled"]
    assert ("zabha" in rv["isa_extensions"]) == (CPU == "max")


def test_regs_command_lists_named_registers():
    out = subprocess.run([sys.executable, "-m", "pykvm", "regs", "--json"], capture_output=True,
                         text=True, check=True).stdout
    rows = json.loads(out)
    assert any(r["name"] == "core.regs.pc" for r in rows) and len(rows) >= 100


def test_extension_kvm_cannot_disable_is_not_allowed(vcpu):
    exts = cpu.isa_extensions(vcpu)
    fixed = next(n for n in ("zicsr", "zifencei", "zicntr", "zba") if exts.get(n))
    with pytest.raises(cpu.ExtensionNotAllowed) as ei:
        cpu.set_isa_extension(vcpu, fixed, False)
    assert ei.value.errno == errno.EINVAL
    assert cpu.isa_extensions(vcpu)[fixed] is True


def test_pykvm_run_boots_the_default_riscv_guest():
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "--json"], capture_output=True,
                       text=True, timeout=120)
    d = json.loads(r.stdout)
    assert r.returncode == 0 and d["exit"] == "done"
    assert d["console"] == "Hello from a pykvm RISC-V guest\n"
    assert d["exits"].get("RISCV_SBI", 0) >= 2          # DBCN write + the DONE report


def test_dbcn_console_is_served_in_c(guest_vm):
    m = guest_vm("dbcn")
    m.sync(stage=1)
    m.sync(stage=2)
    m.done()
    loop = m.loops[0]
    # one write + 16 write_byte calls never crossed into Python; the read and reports did
    assert loop.handled_in_c >= 17
    assert m.console.decode() == "pykvm dbcn write\npykvm dbcn byte\n"
    p = guest_vm("dbcn", loop=ReferenceLoop)          # the Python loop gives the same console
    p.sync(stage=1)
    p.sync(stage=2)
    p.done()
    assert p.console == m.console and p.loops[0].handled_in_c == 0


# --- real-image pieces: Linux Image header, initrd, ns16550a, SBI widths, SRST statuses ------

def _cstr(m, addr, n=256):
    return m.memory.read(addr, n).split(b"\0")[0].decode()


def test_image_guest_boots_as_a_linux_image(guest_vm):
    m = guest_vm("image")                        # image.bin: the Image, not the ELF
    assert m.image_name.endswith("image.bin")
    assert m.image.plan.format == "linux-image" and m.image.entry == 0x80200000
    assert m.vcpus[0].get_one_reg(regs.reg_id("core.regs.pc")) == 0x80200000
    start, hartid, dtb, image_size, magic2, end = m.sync(stage=1)
    assert (start, hartid, dtb) == (0x80200000, 0, m.platform.dtb_addr)
    assert image_size == end - start and magic2 == int.from_bytes(b"RSC\x05", "little")
    m.done()


def test_initrd_is_read_back_by_the_guest(guest_vm, tmp_path):
    data = b"pykvm initrd line one\nsecond line\n" + bytes(range(256)) * 40
    f = tmp_path / "initrd.img"
    f.write_bytes(data)
    m = guest_vm("initrd", initrd=[str(f)])
    start, end, digest, image_end, dtb = m.sync(stage=1)
    assert (start, end) == m.platform.initrd and end - start == len(data)
    assert start % 4096 == 0 and image_end <= start and end <= dtb
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    assert digest == h
    m.done()
    assert m.console == b"pykvm initrd line one\n"        # through the UART


@pytest.mark.parametrize("loop_cls", [RunLoop, ReferenceLoop], ids=["c-loop", "py-loop"])
def test_polled_uart_guest(guest_vm, loop_cls):
    m = guest_vm("uart", loop=loop_cls)
    base, freq, path, compat = m.sync(stage=1)
    assert (base, freq) == (0x10000000, 3686400)
    assert _cstr(m, path) == "/soc/serial@10000000" and _cstr(m, compat) == "ns16550a"
    scratch, divisor, lcr, iir, lsr, msr, mcr = m.sync(stage=2)
    # IIR 0xC1: no interrupt pending, FIFOs enabled (bits 7:6), as uart_init wrote FCR = 0x07
    assert (scratch, divisor, lcr, iir, lsr, msr, mcr) == (0xA5, 2, 3, 0xC1, 0x60, 0xB0, 3)
    m.done()
    assert m.console == b"Hello from the ns16550a\nand from the SBI debug console\n"
    if loop_cls is RunLoop:                      # every UART access was served in C
        assert m.loops[0].counts.get("MMIO", 0) == m.loops[0].handled_in_c - 1


@pytest.mark.parametrize("loop_cls", [RunLoop, ReferenceLoop], ids=["c-loop", "py-loop"])
def test_sbi_32_bit_arguments(guest_vm, loop_cls):
    m = guest_vm("sbi_width", loop=loop_cls)
    # HSM retentive suspend: suspend_type 0 and (1 << 32) | 0 both suspend and wake
    assert m.sync(stage=1) == (0, 0)
    # DBCN write_byte takes the low byte: 0x64636241 writes "A"
    assert m.sync(stage=2) == (0, 0, 0)
    m.done()
    assert m.console == b"A\n"


@pytest.mark.parametrize("reset_type, reason, code, exit_name", [
    (0, 0, 0, "SYSTEM_EVENT"),            # shutdown
    (0, 1, 4, "SYSTEM_EVENT"),            # shutdown, system failure (kvm-unit-tests' FAIL)
    (1, 0, 6, "SYSTEM_EVENT"),            # cold reboot: pykvm does not reboot
    (2, 1, 4, "SYSTEM_EVENT"),            # warm reboot, system failure
])
def test_srst_reasons_map_to_statuses(guest_vm, reset_type, reason, code, exit_name):
    m = guest_vm("srst")
    m.set_params(reset_type, reason)
    r = m.run(timeout=60)
    assert (r.exit, r.exit_code) == (exit_name, code), r.detail


def _checkout_guest(name):
    from pykvm import guests
    return guests.path(name, arch="riscv64")


def _pykvm_run(capfd, *argv):
    """``pykvm run ARGV`` in this process (the CLI's own code path, without another ~7 s
    interpreter start under TCG): (status, stdout, stderr)."""
    import signal
    from pykvm import cli
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    capfd.readouterr()
    try:
        code = cli.main(["run", *argv])
    finally:
        for s, h in saved.items():              # main() installs its own
            signal.signal(s, h)
    out, err = capfd.readouterr()
    return code, out, err


def test_pykvm_run_boots_an_image_and_streams_the_uart(capfd):
    img = _checkout_guest("uart")
    assert img.endswith(".bin")
    code, out, err = _pykvm_run(capfd, img)
    assert code == 0, err
    assert out == "Hello from the ns16550a\nand from the SBI debug console\n"


def test_pykvm_run_initrd_and_riscv_options(capfd, tmp_path):
    f = tmp_path / "rd"
    f.write_bytes(b"from the initrd\n")
    code, out, err = _pykvm_run(capfd, _checkout_guest("initrd"), "--initrd", str(f),
                                "--cpu-type", "min", "--json")
    assert code == 0 and json.loads(out)["console"] == "from the initrd\n", err
    t0 = time.monotonic()
    code, out, err = _pykvm_run(capfd, _checkout_guest("suspend"), "--suspend-seconds", "0.5")
    assert code == 0, err
    assert time.monotonic() - t0 >= 0.5
    code, out, err = _pykvm_run(capfd, _checkout_guest("isa"), "--cpu-type", "max,bogus")
    assert code == 2 and "bogus" in err
    code, out, err = _pykvm_run(capfd, _checkout_guest("initrd"), "--initrd", f"{f},{f}")
    assert code == 2 and "one initrd" in err
