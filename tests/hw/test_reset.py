"""Machine.checkpoint()/reset(): a running VM returned to an in-memory baseline by copying back
the pages written since (KVM's dirty log) and loading vCPU, VM and device state again
(pykvm/rewind.py, csrc/rewind.c). Guest: reset_dirty.c beside this file (a counter and pages
it dirties each round). Nothing here asserts a time; the loops assert that nothing drifts:
reports, RAM, vCPU state, fds, threads and resident memory."""
import os
import threading

import pytest

from pykvm import bench
from pykvm.errors import Closed, PykvmError
from pykvm.rewind import RamBaseline
from pykvm.testing import require, wait_until

GUEST = "reset_dirty.c"
PAGE = 4096
LOOPS = 2000
TSC_MSR = 0x10                      # IA32_TSC: reads the guest's TSC now, moves by itself
PATIENCE = 60.0                     # seconds to wait for the guest's progress (a hang guard)


# The rerun against the ASan+UBSan helper (tests/sanitize): ASan's allocator keeps freed blocks
# in its quarantine (256 MiB by default), so resident memory grows there with any allocation
# churn and says nothing about leaks (LeakSanitizer does); the plain run holds the RSS bound
SANITIZED = bool(os.environ.get("PYKVM_SANITIZED_NATIVE"))


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE // 1024


def _state(v) -> dict:
    """The vCPU's state blobs, IA32_TSC's entry left out (it counts as time passes)."""
    s = v.save_state()
    out = dict(s.items())
    msrs = bytearray(out.pop("msrs"))
    kept = b"".join(bytes(msrs[i:i + 16]) for i in range(0, len(msrs), 16)
                    if int.from_bytes(msrs[i:i + 4], "little") != TSC_MSR)
    out["msrs"] = kept
    out.pop("cpuid", None)
    return out


def _guest_pages(m) -> list:
    """Guest-physical addresses of the guest's `area` and `zeros` pages and of its counters
    (the pages it writes), plus a spread of other RAM pages (image, stacks, page tables,
    untouched RAM)."""
    pages = set()
    for name in ("area", "zeros", "counter", "rounds"):
        addr, size = _where(m, name)
        start = addr - addr % PAGE
        pages.update(range(start, addr + size, PAGE))
    size = m.memory.size
    pages.update(range(0, size, size // 64))
    return sorted(pages)


def _where(m, name):
    """(guest-physical address, size) of guest variable ``name`` (the image is identity
    mapped: its addresses are guest-physical)."""
    addr, size = m.symbols.variable(name)
    assert m.globals.where("counter")[0] == m.symbols.variable("counter")[0]
    return addr, size


def _counter(m, index=0) -> int:
    gpa, _ = _where(m, "counter")
    return m.memory.read_u64(gpa + 8 * index)


def _read_pages(m, pages) -> list:
    return [m.memory.read(p, PAGE) for p in pages]


def test_reset_loop_has_no_drift(guest_vm, leftovers):
    m = guest_vm(GUEST)
    m.set_params(8)
    assert m.sync(stage=0)[0] == 1000
    stored = m.checkpoint()
    assert stored > 0
    pages = _guest_pages(m)
    ram0 = _read_pages(m, pages)
    vcpu0 = _state(m.vcpus[0])
    first = m.sync(stage=1)
    m.done()
    assert first[:2] == (1001, 1)
    snap = leftovers()
    rss_warm = None
    copied = set()
    for i in range(LOOPS):
        n = m.reset()
        copied.add(n)
        assert m.console == b"" and m.reports == []
        if i % 250 == 0 or i == LOOPS - 1:
            assert _read_pages(m, pages) == ram0, f"RAM differs from the baseline after reset {i}"
            assert _state(m.vcpus[0]) == vcpu0, f"vCPU state differs after reset {i}"
        assert m.sync(stage=1) == first, f"reset {i}: the guest's next run reported otherwise"
        m.done()
        if i == 200:
            rss_warm = _rss_kib()
    # each round dirties 8 area pages, a zeros page, the counters' page, the stack: the same few
    assert min(copied) >= 10 and max(copied) < 40, copied
    if not SANITIZED:
        assert _rss_kib() - rss_warm < 2048, "resident memory grew over the reset loop"
    snap.check()


def test_host_writes_are_put_back_too(guest_vm):
    m = guest_vm(GUEST)
    m.sync(stage=0)
    m.checkpoint()
    area, _ = _where(m, "area")
    before = m.memory.read(area, 3 * PAGE)
    m.memory.write(area + 5, b"host was here")        # the dirty log does not see this
    m.memory.zero(area + PAGE, PAGE)                  # nor this (pages handed back)
    m.memory.write_u64(_where(m, "counter")[0], 7)
    m.reset()
    assert m.memory.read(area, 3 * PAGE) == before
    assert m.sync(stage=1)[:2] == (1001, 1)


def test_reset_without_checkpoint_takes_one(guest_vm):
    m = guest_vm(GUEST)
    m.sync(stage=0)
    assert m.reset() == 0                             # the baseline is taken here
    first = m.sync(stage=1)
    m.done()
    assert m.reset() > 0
    assert m.sync(stage=1) == first


def test_reset_of_a_finished_machine_runs_again(guest_vm):
    m = guest_vm(GUEST)
    m.checkpoint()                                    # before the guest ran at all
    r1 = m.run(timeout=10)
    assert r1.exit == "done"
    m.reset()
    r2 = m.run(timeout=10)
    assert r2.exit == "done" and r2.console == r1.console


def test_reset_while_running_in_another_thread(guest_vm):
    m = guest_vm(GUEST)
    m.set_params(4, 1)                                # rounds forever after SYNC(1)
    m.sync(stage=0)
    m.checkpoint()
    base = _counter(m)
    first = m.sync(stage=1)
    out = {}
    # the run's own deadline only guards a hang: stop() ends it (30 s, with two silent 10 s
    # waits before the stop, could end it first on a slow host, as "timeout")
    t = threading.Thread(target=lambda: out.setdefault("r", m.run(timeout=600)))
    t.start()
    try:
        wait_until(lambda: _counter(m) >= base + 1000, "1000 rounds of the running guest",
                   timeout=PATIENCE)
        assert m.running
        n = m.reset()                                 # pauses the run, resets, resumes it
        assert n > 0 and m.running and not m.paused
        wait_until(lambda: _counter(m) >= base + 10, "rounds after the reset", timeout=PATIENCE)
    finally:
        m.stop()
        t.join(PATIENCE)
    assert not t.is_alive() and out["r"].exit == "stopped"
    m.reset()
    assert _counter(m) == base
    assert m.sync(stage=1) == first


def test_reset_of_two_vcpus(guest_vm):
    m = guest_vm(GUEST, vcpus=2)
    m.set_params(6)
    s0 = [m.sync(i, stage=0) for i in range(2)]
    assert [s[0] for s in s0] == [1000, 2000]
    m.checkpoint()
    states = [_state(v) for v in m.vcpus]
    first = [m.sync(i, stage=1) for i in range(2)]
    for i in range(2):
        m.done(i)
    for k in range(1000):
        m.reset()
        if k % 250 == 0:
            assert [_state(v) for v in m.vcpus] == states
        assert [m.sync(i, stage=1) for i in range(2)] == first
        for i in range(2):
            m.done(i)


def test_reset_of_a_closed_machine_raises_closed(guest_vm):
    m = guest_vm(GUEST)
    m.sync(stage=0)
    m.checkpoint()
    m.close()
    with pytest.raises(Closed):
        m.reset()
    with pytest.raises(Closed):
        m.checkpoint()


def test_ram_baseline_is_sparse_and_bounded(kvm):
    """A 1 GiB slot of which little was written: the baseline stores only the non-zero pages,
    and a restore copies back only what the guest or host wrote."""
    vm = kvm.create_vm()
    try:
        vm.add_memory(0, 1 << 30)
        vm.memory.write(0x1000, b"\x01" * 10)
        vm.memory.write(0x3000_0000, b"\x02")
        rb = RamBaseline(vm)
        assert rb.pages_stored == 2 and rb.bytes_stored == 2 * PAGE
        vm.memory.write(0x1000, b"\xff")
        vm.memory.write(0x2000_0000, b"\xff")              # zero at baseline
        assert rb.restore() == 2
        assert vm.memory.read(0x1000, 10) == b"\x01" * 10
        assert vm.memory.read(0x2000_0000, 1) == b"\x00"
        assert rb.restore() == 0
        rb.close()
        rb.close()
        with pytest.raises(Closed):
            rb.restore()
    finally:
        vm.close()


def _has_ring(kvm) -> bool:
    return bool(kvm.check_extension("DIRTY_LOG_RING")
                or kvm.check_extension("DIRTY_LOG_RING_ACQ_REL"))


def test_ram_baseline_through_the_dirty_ring(kvm):
    """A VM with the dirty ring (no dirty log): the rings are harvested, each page they name
    put back, KVM_RESET_DIRTY_RINGS re-arms them; the DirtyRing's index follows."""
    require(_has_ring(kvm), "KVM_CAP_DIRTY_LOG_RING")
    vm = kvm.create_vm()
    try:
        vm.enable_dirty_ring(1 << 16)
        vm.add_memory(0, 1 << 20)
        vm.memory.write(bench.CODE_GPA, bench.reset_guest())
        v = bench._real_mode_start(vm.create_vcpu())
        regs = v.get_regs()
        rb = RamBaseline(vm)
        assert rb.ring and rb.pages_stored == 1              # the code page
        base = bench.RESET_DS * 16
        for _ in range(50):
            ex = v.run()
            assert ex.name == "IO", ex
            v.complete_io()
            assert vm.memory.read(base, 1) == bytes([1])
            assert rb.restore() == bench.RESET_PAGES
            assert vm.memory.read(base, bench.RESET_PAGES * PAGE) == bytes(bench.RESET_PAGES * PAGE)
            v.set_regs(regs)
        assert v.dirty_ring.fetch_index == 50 * bench.RESET_PAGES
        vm.memory.write(base + 3 * PAGE, b"host")            # host writes: put back too
        assert rb.restore() == 1
        rb.close()
    finally:
        vm.close()


def test_machine_reset_through_the_dirty_ring(guest_vm, kvm):
    require(_has_ring(kvm), "KVM_CAP_DIRTY_LOG_RING")
    m = guest_vm(GUEST, vm_setup=lambda vm: vm.enable_dirty_ring(1 << 16))
    m.set_params(8)
    m.sync(stage=0)
    m.checkpoint()
    assert m._baseline.ram.ring
    vcpu0 = _state(m.vcpus[0])
    first = m.sync(stage=1)
    m.done()
    for _ in range(500):
        assert m.reset() >= 10
        assert m.sync(stage=1) == first
        m.done()
    m.reset()
    assert _state(m.vcpus[0]) == vcpu0


def test_ram_baseline_refuses_changed_slots(kvm):
    vm = kvm.create_vm()
    try:
        vm.add_memory(0, 1 << 20)
        rb = RamBaseline(vm)
        extra = vm.add_memory(1 << 30, 1 << 20)
        with pytest.raises(PykvmError, match="slots changed"):
            rb.restore()
        vm.remove_memory(extra)
        assert rb.restore() == 0
        rb.close()
    finally:
        vm.close()


def test_reset_of_a_pc_machine(guest_vm):
    """The pc machine: in-kernel irqchip (LAPIC, PICs, IOAPIC loaded too) and the device
    models' state (their snapshot protocol) put back with the rest."""
    m = guest_vm(GUEST, machine="pc")
    m.sync(stage=0)
    m.checkpoint()
    names = m._baseline.put.names
    assert any("KVM_SET_LAPIC" in n for n in names) and any("ioapic" in n for n in names)
    vcpu0 = _state(m.vcpus[0])
    first = m.sync(stage=1)
    m.done()
    for _ in range(100):
        m.reset()
        assert m.sync(stage=1) == first
        m.done()
    m.reset()
    assert _state(m.vcpus[0]) == vcpu0


def test_device_state_is_put_back_and_the_baseline_kept(guest_vm):
    """A device model's buffer changed after the checkpoint comes back at each reset, and the
    baseline itself is never handed to the device (a second change and reset restore it too)."""
    m = guest_vm(GUEST, machine="pc")
    m.sync(stage=0)
    iomem = m.platform.testdev.iomem
    iomem.data[:4] = b"base"
    m.checkpoint()
    for word in (b"one!", b"two!"):
        iomem.data[:4] = word
        m.platform.testdev.data = 0x1234
        m.reset()
        assert bytes(iomem.data[:4]) == b"base" and m.platform.testdev.data == 0
