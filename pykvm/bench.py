"""``pykvm bench``: what a VMM in Python costs next to hand-written C, QEMU and the interpreter
itself, as ratios measured in one process run.

Every contender of a comparison is measured in the same run, in rounds whose order rotates, so
drift of the machine hits all of them alike; each figure is the median over the rounds with its
min–max, and each ratio is the median of the per-round ratios (min–max of those, too).

* **exit cost** (µs per exit) for I/O out, I/O in, MMIO write, MMIO read and HLT. The guest is
  the same real-mode code for everybody: 1000 copies of one instruction (``out 0x80, al``,
  ``in al, 0x80``, ``mov [0xf0000], al``, ``mov al, [0xf0000]``, ``hlt``) in a loop. Contenders:
  ``raw`` — a C loop of bare ioctls on the kernel's own <linux/kvm.h> (csrc/rawbench.c, the
  module pykvm._rawbench; no pykvm); ``c_loop`` — pykvm's run loop serving the exit in C (port
  0x80 as a console port, the MMIO address as an ns16550a, HLT resumed); ``python`` — a Python
  handler (:meth:`pykvm.runloop.RunLoop.on`) serving every exit; ``machine`` — the same through
  :meth:`pykvm.machine.Machine.on` (I/O out). Costs are the calling thread's CPU time per exit
  (what the exit costs, whatever else runs on the machine); wall-clock figures are given beside.
* **VM lifecycle**: create a VM, one 512 KiB slot, one vCPU, run it to HLT, destroy it: raw C vs
  pykvm (``Kvm.create_vm`` ... ``Vm.close``); VMs per second.
* **reset**: return a VM to a checkpoint (:meth:`pykvm.machine.Machine.reset`: the pages the
  guest dirtied copied back, vCPU/VM state loaded) against a raw-C reset of the same state
  (with the dirty log, the dirty log under manual protection, the dirty ring) and against
  destroying and re-creating the VM (Machine, raw C); µs per operation, median and p10–p90.
* **memory**: resident host memory per VM, with 16 MiB of RAM and the same guest pages resident
  (a tiny ELF64 guest, long mode): raw C, pykvm's ``Vm`` API, and a
  :class:`~pykvm.machine.Machine`.
* **boot** to exit as a user sees it, whole processes: ``pykvm run`` of a tiny guest in pykvm's
  own format (an ELF64 that writes 0 to isa-debug-exit) vs ``python -c pass`` (the interpreter's
  floor) and ``python -c "import pykvm"``; ``pykvm run`` of a tiny multiboot guest (it prints
  "ok" on COM1 and writes 0 to isa-debug-exit; pykvm boots it on its pc machine) vs
  ``qemu-system-x86_64 -accel kvm -kernel`` of the same file and kvmtool's ``lkvm`` where
  installed.
* **scaling**: aggregate exits/s of the C loop with 1, 2, 4, ... vCPUs (one thread each), up to
  the host's CPU count.
* **plugin import**: what the pytest plugin (:mod:`pykvm.testing.plugin`, registered in every
  pytest run of the environment) adds to a pytest start-up, from ``python -X importtime`` of
  ``import pytest; import pykvm.testing.plugin`` with bytecode cached: pykvm's modules'
  cumulative µs against pytest's own in the same process (``plugin_import_vs_pytest``).

``--quick`` finishes in well under a minute; ``--plot FILE.png`` draws the ratios with their
min–max (matplotlib, the ``bench`` extra).

``--curves`` measures instead how each cost grows as the work grows (:func:`curves`): exits/s
against vCPUs (to twice the host's CPUs), the create→run→destroy rate with 0 to 1000 other VMs
alive, resident memory per VM with 1 to 100 VMs alive, Machine create time and resident memory
against guest RAM size (64 MiB to 64 GiB) and kvm-unit-tests wall time against QEMU (where a
kvm-unit-tests build is named by PYKVM_KUT_DIR), with Firecracker's published figures beside the
matching curves; ``--plot`` then draws one panel per curve. docs/cost-curves.md shows a run.
"""
import gc
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

from . import _rawbench, status
from ._host import HOST_ARCH
from .abi import ffi

KINDS = ("io_out", "io_in", "mmio_write", "mmio_read", "hlt")
_RAW_KIND = {"io_out": _rawbench.lib.PYKVM_RAW_IO_OUT, "io_in": _rawbench.lib.PYKVM_RAW_IO_IN,
             "mmio_write": _rawbench.lib.PYKVM_RAW_MMIO_WRITE,
             "mmio_read": _rawbench.lib.PYKVM_RAW_MMIO_READ, "hlt": _rawbench.lib.PYKVM_RAW_HLT}
_INSN = {"io_out": "E680", "io_in": "E480", "mmio_write": "8807", "mmio_read": "8A07",
         "hlt": "F4"}
_REASON = {"io_out": "IO", "io_in": "IO", "mmio_write": "MMIO", "mmio_read": "MMIO",
           "hlt": "HLT"}
PORT = 0x80
MMIO_ADDR = 0xF0000
RAM = 0x80000                 # exit and lifecycle guests: 512 KiB at GPA 0
CODE_GPA = 0x1000
UNROLL = 1000
MEM_RAM = 16 << 20            # memory comparison: 16 MiB of guest RAM
THRESHOLDS = {"c_loop_vs_raw": 1.05, "python_vs_raw": 1.3, "machine_on_vs_python": 1.1,
              "lifecycle_vs_raw": 1.5, "machine_mem_vs_raw": 1.5, "boot_vs_python_floor": 2.0,
              "boot_multiboot_vs_python_floor": 2.0, "boot_vs_qemu": 0.1,
              "virtio_blk_cpu_vs_qemu": 1.0, "plugin_import_vs_pytest": 0.04}

QUICK = dict(rounds=5, exits=10000, life=20, mem_vms=128, mem_rounds=3, boot=5, boot_qemu=1,
             scale_exits=3000, blk_rounds=1, blk_requests=10000, reset_rounds=3, resets=1000,
             recreates=20, plugin_rounds=5)
FULL = dict(rounds=9, exits=10000, life=40, mem_vms=128, mem_rounds=5, boot=15, boot_qemu=5,
            scale_exits=30000, blk_rounds=3, blk_requests=10000, reset_rounds=5, resets=3000,
            recreates=50, plugin_rounds=15)


# -- guests ----------------------------------------------------------------------------------
def guest_code(kind: str) -> bytes:
    """Real-mode code for CODE_GPA: DS = 0xF000, BX = 0, AL = 'x', then UNROLL copies of the
    kind's instruction and a jump back to the first."""
    body = bytes.fromhex(_INSN[kind]) * UNROLL
    jmp = b"\xE9" + ((-(len(body) + 3)) & 0xFFFF).to_bytes(2, "little")
    return bytes.fromhex("B800F08ED831DBB078") + body + jmp


def tiny_elf64() -> bytes:
    """An ELF64 at 1 MiB in pykvm's own image format (booted in long mode on the bare x86
    platform): write 0 to isa-debug-exit, halt."""
    base, hdr = 0x100000, 64 + 56
    code = bytes.fromhex("31C0" "E6F4" "F4" "EBFD")
    size = hdr + len(code)
    ehdr = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, base + hdr, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0, base, base, size, size, 0x1000)
    return ehdr + phdr + code


def tiny_multiboot() -> bytes:
    """A multiboot v1 ELF32 at 1 MiB: print "ok" on COM1, write 0 to isa-debug-exit (0xf4),
    halt. Under QEMU (-device isa-debug-exit,iobase=0xf4) and ``pykvm run`` it exits with 1."""
    base, hdr = 0x100000, 52 + 32
    code = bytes.fromhex("66BAF803" "B06F" "EE" "B06B" "EE" "B00A" "EE" "31C0" "E6F4" "F4"
                         "EBFD")
    mb = struct.pack("<III", 0x1BADB002, 3, (-(0x1BADB002 + 3)) & 0xFFFFFFFF)
    size = hdr + len(mb) + len(code)
    ehdr = b"\x7fELF\x01\x01\x01\x00" + bytes(8) + struct.pack(
        "<HHIIIIIHHHHHH", 2, 3, 1, base + hdr + len(mb), 52, 0, 0, 52, 32, 1, 40, 0, 0)
    phdr = struct.pack("<IIIIIIII", 1, 0, base, base, size, size, 7, 0x1000)
    return ehdr + phdr + mb + code


# -- measuring helpers -----------------------------------------------------------------------
def _device() -> str:
    return os.environ.get("PYKVM_DEVICE") or "/dev/kvm"


def _summary(values):
    """{"median", "min", "max"} of a list of numbers (None when empty)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": round(statistics.median(vals), 4), "min": round(min(vals), 4),
            "max": round(max(vals), 4), "n": len(vals)}


def _ratio(num, den):
    """Per-round ratios num[i]/den[i] summarised."""
    return _summary([a / b for a, b in zip(num, den) if a is not None and b])


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


class _Clock:
    """Thread CPU time and wall time over a block, in ns."""

    def __enter__(self):
        self.c0, self.w0 = time.thread_time_ns(), time.perf_counter_ns()
        return self

    def __exit__(self, *exc):
        self.cpu = time.thread_time_ns() - self.c0
        self.wall = time.perf_counter_ns() - self.w0


def _real_mode_vcpu(kvm, code: bytes, ram: int = RAM):
    """pykvm's low-level API: a VM with one slot at GPA 0 holding ``code`` at CODE_GPA and one
    vCPU in real mode at CODE_GPA (what the raw contender sets up with bare ioctls)."""
    vm = kvm.create_vm()
    try:
        vm.add_memory(0, ram)
        vm.memory.write(CODE_GPA, code)
        v = _real_mode_start(vm.create_vcpu())
    except BaseException:
        vm.close()
        raise
    return vm, v


def _real_mode_start(v):
    """Vcpu ``v``, set to start in real mode at CODE_GPA (cs = 0); returns it."""
    s = v.get_sregs()
    s.cs.base = s.cs.selector = 0
    v.set_sregs(s)
    r = ffi.new("struct kvm_regs *")
    r.rip, r.rflags = CODE_GPA, 2
    v.set_regs(r)
    return v


# -- exit cost -------------------------------------------------------------------------------
def _exit_raw(kvm, kind, n):
    code = guest_code(kind)
    out = _rawbench.ffi.new("int64_t[3]")
    r = _rawbench.lib.pykvm_raw_exit_loop(_device().encode(), _RAW_KIND[kind], n, code,
                                          len(code), RAM, out)
    if r < 0:
        raise RuntimeError(f"raw C {kind} loop failed: {os.strerror(-r)} (exit {out[2]})")
    return out[1] / n / 1e3, out[0] / n / 1e3


def _exit_c_loop(kvm, kind, n):
    from .runloop import LoopConfig, RunLoop
    vm, v = _real_mode_vcpu(kvm, guest_code(kind))
    with vm:
        io, mmio = kind.startswith("io"), kind.startswith("mmio")
        cfg = LoopConfig(serial_base=0, exit_port=0, debugcon_port=PORT if io else 0,
                         uart_mmio_base=MMIO_ADDR if mmio else 0, console_limit=1 << 12)
        loop = RunLoop(v, config=cfg)
        if kind == "hlt":
            loop.resume("HLT")
        with _Clock() as c:
            stop = loop.run(budget=n)
        if stop.kind != "budget" or loop.handled_in_c != n:
            raise RuntimeError(f"pykvm C loop {kind}: {stop.kind}, {loop.handled_in_c} of {n} "
                               "exits served in C")
    return c.cpu / n / 1e3, c.wall / n / 1e3


def _handler(kind, acc):
    if kind in ("io_out", "mmio_write"):
        def h(ex):
            acc[0] += ex.value
    elif kind in ("io_in", "mmio_read"):
        def h(ex):
            ex.respond(0x42)
    else:
        def h(ex):
            return None
    return h


def _exit_python(kvm, kind, n):
    from .runloop import LoopConfig, RunLoop
    vm, v = _real_mode_vcpu(kvm, guest_code(kind))
    acc = [0]
    with vm:
        loop = RunLoop(v, config=LoopConfig(serial_base=0, debugcon_port=0, exit_port=0))
        loop.on(_REASON[kind], _handler(kind, acc))
        with _Clock() as c:
            stop = loop.run(budget=n)
        if stop.kind != "budget" or loop.handled_in_python != n:
            raise RuntimeError(f"pykvm Python handler {kind}: {stop.kind}, "
                               f"{loop.handled_in_python} of {n} exits handled")
    return c.cpu / n / 1e3, c.wall / n / 1e3


def _exit_machine(kvm, kind, n):
    from .machine import Machine
    acc = [0]
    inner = _handler(kind, acc)
    with Machine(guest_code(kind), flat_addr=CODE_GPA, flat_mode="real", mem_size=RAM,
                 kvm=kvm) as m:
        m.on(_REASON[kind], lambda machine, index, ex: inner(ex))
        with _Clock() as c:
            ev = m.step(budget=n, timeout=None)
        if ev.kind != "budget":
            raise RuntimeError(f"Machine.on {kind}: {m.describe(ev)}")
    return c.cpu / n / 1e3, c.wall / n / 1e3


_EXIT_CONTENDERS = {"raw": _exit_raw, "c_loop": _exit_c_loop, "python": _exit_python,
                    "machine": _exit_machine}


def exit_cost(kvm, rounds: int, n: int) -> dict:
    """Exit cost of every kind in ``KINDS``: ``rounds`` rounds, the contenders' order rotating, of
    ``n`` exits per contender. Returns {kind: {contender: {"cpu_us", "wall_us", "cpu_vs_raw",
    "wall_vs_raw"}}}: µs per exit and per-round ratios to raw C, each a median/min/max summary.
    Raises RuntimeError when a contender does not serve all its exits."""
    out = {}
    for kind in KINDS:
        names = list(_EXIT_CONTENDERS) if kind == "io_out" else ["raw", "c_loop", "python"]
        cpu = {k: [] for k in names}
        wall = {k: [] for k in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                c, w = _EXIT_CONTENDERS[name](kvm, kind, n)
                cpu[name].append(c)
                wall[name].append(w)
        out[kind] = {name: {"cpu_us": _summary(cpu[name]), "wall_us": _summary(wall[name]),
                            "cpu_vs_raw": _ratio(cpu[name], cpu["raw"]) if name != "raw" else None,
                            "wall_vs_raw": _ratio(wall[name], wall["raw"]) if name != "raw"
                            else None}
                     for name in names}
        if "machine" in names:                 # Machine.on against RunLoop.on, round by round
            out[kind]["machine"]["cpu_vs_python"] = _ratio(cpu["machine"], cpu["python"])
    return out


# -- lifecycle -------------------------------------------------------------------------------
def _life_raw(kvm, count):
    code = b"\xF4"
    out = _rawbench.ffi.new("int64_t[3]")
    r = _rawbench.lib.pykvm_raw_lifecycle(_device().encode(), count, code, len(code), RAM, out)
    if r < 0:
        raise RuntimeError(f"raw C lifecycle failed: {os.strerror(-r)}")
    return out[1] / count / 1e3, out[0] / count / 1e3


def _life_pykvm(kvm, count):
    with _Clock() as c:
        for _ in range(count):
            vm, v = _real_mode_vcpu(kvm, b"\xF4")
            ex = v.run()
            if ex.name != "HLT":
                vm.close()
                raise RuntimeError(f"lifecycle guest: {ex!r}")
            vm.close()
    return c.cpu / count / 1e3, c.wall / count / 1e3


def lifecycle(kvm, rounds: int, count: int) -> dict:
    """VM lifecycle cost (create a VM with one 512 KiB slot and one vCPU, run it to HLT, destroy
    it), raw C against pykvm: ``rounds`` rounds of ``count`` VMs per contender, the order
    alternating. Returns each contender's µs per VM (CPU and wall) and VMs per second, and the
    ``cpu_vs_raw`` and ``wall_vs_raw`` ratios."""
    names = {"raw": _life_raw, "pykvm": _life_pykvm}
    cpu = {k: [] for k in names}
    wall = {k: [] for k in names}
    for r in range(rounds):
        for name in (list(names) if r % 2 == 0 else list(names)[::-1]):
            c, w = names[name](kvm, count)
            cpu[name].append(c)
            wall[name].append(w)
    return {
        **{name: {"cpu_us": _summary(cpu[name]), "wall_us": _summary(wall[name]),
                  "vms_per_s": round(1e6 / statistics.median(wall[name]), 1)}
           for name in names},
        "cpu_vs_raw": _ratio(cpu["pykvm"], cpu["raw"]),
        "wall_vs_raw": _ratio(wall["pykvm"], wall["raw"]),
    }


# -- reset ------------------------------------------------------------------------------------
RESET_PAGES = 8               # pages the reset guest dirties each run
RESET_DS = 0x2000             # ... in the segment at GPA 0x20000 (inside the 512 KiB of RAM)
_RAW_RESET_MODES = {"log": _rawbench.lib.PYKVM_RAW_RESET_LOG,
                    "log_manual": _rawbench.lib.PYKVM_RAW_RESET_LOG_MANUAL,
                    "ring": _rawbench.lib.PYKVM_RAW_RESET_RING}


def reset_guest() -> bytes:
    """Real-mode code for CODE_GPA: DS = RESET_DS, ``inc byte [i * 0x1000]`` for each of
    RESET_PAGES pages, then ``out 0xf4, al`` (the exit port: the run's end), ``hlt``."""
    body = b"".join(b"\xFE\x06" + (i * 0x1000).to_bytes(2, "little") for i in range(RESET_PAGES))
    return bytes.fromhex("B8") + RESET_DS.to_bytes(2, "little") + bytes.fromhex("8ED8") + body \
        + bytes.fromhex("E6F4" "F4")


_RESET_MACHINE = dict(machine="bare", flat_addr=CODE_GPA, flat_mode="real", mem_size=RAM)


def _reset_machine(kvm):
    from .machine import Machine
    return Machine(reset_guest(), kvm=kvm, **_RESET_MACHINE)


def _run_to_exit(m) -> None:
    ev = m.step(timeout=10)
    if ev.kind != "debug_exit":
        raise RuntimeError(f"reset guest: {m.describe(ev)}")


def _reset_ioctls(m) -> int:
    """The ioctls one Machine.reset() of ``m`` issues when its vCPUs wait on an exit (as the
    reset guest's do): the prepared list (a completing KVM_RUN per vCPU, the SETs) and one
    KVM_GET_DIRTY_LOG per slot (two with manual protection)."""
    b = m._baseline
    return b.put.count + len(b.ram.slots) * (2 if b.ram.manual else 1)


def _reset_pykvm(kvm, n: int) -> tuple:
    """Machine.reset() ``n`` times, each after the guest ran to its exit (dirtying
    RESET_PAGES pages): (µs per reset, wall, a list), True when the state was back each time
    it was checked (RAM pages, registers)."""
    m = _reset_machine(kvm)
    with m:
        m.checkpoint()
        v = m.vcpus[0]
        base = RESET_DS * 16
        ram0 = m.memory.read(base, RESET_PAGES * 4096)
        rip0 = v.get_regs().rip
        us, ok = [], True
        for i in range(n):
            _run_to_exit(m)
            t0 = time.perf_counter_ns()
            m.reset()
            us.append((time.perf_counter_ns() - t0) / 1e3)
            if i % 100 == 0 or i == n - 1:
                ok = ok and m.memory.read(base, RESET_PAGES * 4096) == ram0 \
                    and v.get_regs().rip == rip0
        ok = ok and m._baseline.ram.last_pages >= RESET_PAGES
    return us, ok


def _reset_raw(mode: str, n: int, msrs) -> list:
    """The raw-C reset (csrc/rawbench.c) ``n`` times: µs per reset (wall). It loads the same
    vCPU/VM state pykvm's reset loads (``msrs``: the same MSR list) and checks RAM itself."""
    ffi, lib = _rawbench.ffi, _rawbench.lib
    code = reset_guest()
    ns = ffi.new("int64_t[]", max(n, 1))
    out = ffi.new("int64_t[3]")
    arr = ffi.new("uint32_t[]", list(msrs) or [0])
    r = lib.pykvm_raw_reset(_device().encode(), _RAW_RESET_MODES[mode], code, len(code), RAM,
                            arr, len(msrs), n, ns, out)
    if r < 0:
        raise RuntimeError(f"raw C reset ({mode}) failed: {os.strerror(-r)}")
    return [ns[i] / 1e3 for i in range(n)]


def _recreate_pykvm(kvm, n: int) -> list:
    """Machine.close() and Machine(...) of the same guest (back at its first instruction),
    ``n`` times, each after the guest ran to its exit: µs each (wall)."""
    us = []
    m = _reset_machine(kvm)
    try:
        for _ in range(n):
            _run_to_exit(m)
            t0 = time.perf_counter_ns()
            m.close()
            m = _reset_machine(kvm)
            us.append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        m.close()
    return us


def _recreate_raw(n: int) -> list:
    ffi, lib = _rawbench.ffi, _rawbench.lib
    code = reset_guest()
    ns = ffi.new("int64_t[]", max(n, 1))
    r = lib.pykvm_raw_recreate(_device().encode(), code, len(code), RAM, n, ns)
    if r < 0:
        raise RuntimeError(f"raw C re-create failed: {os.strerror(-r)}")
    return [ns[i] / 1e3 for i in range(n)]


def _spread(values) -> dict:
    """{"median", "p10", "p90", "min", "max", "n"} of per-iteration figures (µs)."""
    v = sorted(values)
    n = len(v)
    return {"median": round(statistics.median(v), 2), "p10": round(v[n // 10], 2),
            "p90": round(v[(9 * n) // 10], 2), "min": round(v[0], 2), "max": round(v[-1], 2),
            "n": n}


def reset(kvm, rounds: int, n: int, recreate: int) -> dict:
    """Returning a VM to a baseline (a real-mode guest that dirties RESET_PAGES pages and
    exits; the baseline is its first instruction): ``Machine.reset()`` against the raw-C reset
    (the same state loaded, the dirty log), the raw C reset with the dirty log under manual
    protection and with the dirty ring, and destroying and re-creating the VM (pykvm's Machine,
    raw C). ``rounds`` rounds, the contenders' order rotating; ``n`` resets and ``recreate``
    re-creations per contender and round. Returns each contender's µs per operation (wall:
    median, p10, p90, min, max over every iteration), the per-round ratios ``reset_vs_raw``
    (Machine.reset / raw C reset) and ``recreate_vs_reset`` (Machine re-create /
    Machine.reset), ``restored`` (every check of RAM and registers after a reset held) and the
    ioctls each reset issues."""
    from .arch.x86.snapshot import msr_indices
    with _reset_machine(kvm) as m:
        msrs = msr_indices(m.vcpus[0])
        m.checkpoint()
        machine_ioctls = _reset_ioctls(m)
    runs = {"machine_reset": lambda: _reset_pykvm(kvm, n),
            "raw_reset": lambda: _reset_raw("log", n, msrs),
            "raw_reset_log_manual": lambda: _reset_raw("log_manual", n, msrs),
            "raw_reset_ring": lambda: _reset_raw("ring", n, msrs),
            "machine_recreate": lambda: _recreate_pykvm(kvm, recreate),
            "raw_recreate": lambda: _recreate_raw(recreate)}
    names = list(runs)
    per: dict = {k: [] for k in names}
    medians: dict = {k: [] for k in names}
    restored = True
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            got = runs[name]()
            if name == "machine_reset":
                got, ok = got
                restored = restored and ok
            per[name].extend(got)
            medians[name].append(statistics.median(got))
    out: dict = {name: {"us": _spread(per[name])} for name in names}
    out["reset_vs_raw"] = _ratio(medians["machine_reset"], medians["raw_reset"])
    out["recreate_vs_reset"] = _ratio(medians["machine_recreate"], medians["machine_reset"])
    out["raw_recreate_vs_reset"] = _ratio(medians["raw_recreate"], medians["raw_reset"])
    out["restored"] = restored
    out["pages_per_reset"] = RESET_PAGES
    out["ioctls_per_reset"] = {"raw_reset": 11, "raw_reset_log_manual": 12, "raw_reset_ring": 11,
                               "machine_reset": machine_ioctls}
    return out


# -- memory ----------------------------------------------------------------------------------
def _resident_image(kvm, image_path):
    """(bitmap, pages) of the guest RAM a Machine has resident after loading ``image_path``."""
    from .machine import Machine
    with Machine(image_path, mem_size=MEM_RAM, kvm=kvm) as m:
        slot = next(s for s in m.vm.memory if s.gpa == 0)
        size = min(slot.size, MEM_RAM)
        bitmap = _rawbench.ffi.new("uint8_t[]", (size // 4096 + 7) // 8)
        r = _rawbench.lib.pykvm_resident_pages(slot.host_addr, size, bitmap)
        if r < 0:
            raise RuntimeError(f"mincore: {os.strerror(-r)}")
        pages = [i for i in range(size // 4096) if bitmap[i // 8] & (1 << (i % 8))]
        data = b"".join(m.vm.memory.read(i * 4096, 4096) for i in pages)
    return bitmap, data, len(pages)


def _memory_makers(kvm, image_path, bitmap, data):
    """kind → make(count) → undo(): ``count`` VMs of that kind, alive until undo()."""
    from .machine import Machine
    page_list = [i for i in range(MEM_RAM // 4096) if bitmap[i // 8] & (1 << (i % 8))]

    def raw(count):
        h = _rawbench.lib.pykvm_raw_vms_create(_device().encode(), count, MEM_RAM, data, bitmap)
        if h == _rawbench.ffi.NULL:
            raise RuntimeError("raw C VMs could not be created")
        return lambda: _rawbench.lib.pykvm_raw_vms_destroy(h, count)

    def vm_api(count):
        vms = []
        for _ in range(count):
            vm = kvm.create_vm()
            vm.add_memory(0, MEM_RAM)
            for k, i in enumerate(page_list):
                vm.memory.write(i * 4096, data[k * 4096:(k + 1) * 4096])
            vm.create_vcpu()
            vms.append(vm)
        return lambda: [vm.close() for vm in vms]

    def machines(count):
        ms = [Machine(image_path, mem_size=MEM_RAM, kvm=kvm) for _ in range(count)]
        return lambda: [m.close() for m in ms]

    return {"raw": raw, "vm_api": vm_api, "machine": machines}


def memory_child(kind: str, count: int, image_path: str) -> dict:
    """In a fresh process (so no VM reuses memory an earlier measurement freed): resident set
    growth per VM of ``kind`` when ``count`` more are made after a first ``count`` (the
    marginal cost, once the memory a fresh process has free is used up)."""
    import json
    from .kvm import Kvm
    with Kvm() as kvm:
        bitmap, data, npages = _resident_image(kvm, image_path)   # also warms the code paths
        make = _memory_makers(kvm, image_path, bitmap, data)[kind]
        make(1)()
        first = make(count)            # uses up the memory the start-up left free ...
        gc.collect()
        r0 = _rss_kib()
        undo = make(count)             # ... so this batch shows what one more VM costs
        r1 = _rss_kib()
        undo()
        first()
    out = {"kib": (r1 - r0) / count, "pages": npages}
    print(json.dumps(out))
    return out


def _cached_bytecode_env(tmp: str) -> dict:
    """This process's environment for a child Python that runs with its bytecode cached (in
    ``tmp``/pycache), as after a normal install, whatever PYTHONDONTWRITEBYTECODE says here."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
    return env


def _memory_in_child(kind: str, count: int, image_path: str) -> dict:
    """:func:`memory_child` run in a fresh Python process with its bytecode cached (a process
    that compiles pykvm's sources first has their garbage to reuse, which hid about a third of
    a Machine's own memory); raises RuntimeError if it fails."""
    import json
    tmp = os.path.dirname(os.path.abspath(image_path))
    env = _cached_bytecode_env(tmp)
    if not os.path.isdir(env["PYTHONPYCACHEPREFIX"]):      # warm the cache once
        subprocess.run([sys.executable, "-c", f"from pykvm import bench; "
                        f"bench.memory_child({kind!r}, 1, {image_path!r})"],
                       capture_output=True, env=env, timeout=300)
    code = f"from pykvm import bench; bench.memory_child({kind!r}, {count}, {image_path!r})"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"memory measurement ({kind}, {count} VMs) failed: "
                           f"{p.stderr[-500:]}")
    return json.loads(p.stdout.splitlines()[-1])


def memory(kvm, image_path, rounds: int, count: int) -> dict:
    """Resident host memory per VM (KiB) for raw C, the ``Vm`` API and a Machine with 16 MiB of
    RAM, each measured by :func:`memory_child` in a fresh Python process booting ``image_path``;
    ``rounds`` rounds of ``count`` VMs. Returns the summaries and the ``machine_vs_raw`` and
    ``vm_api_vs_raw`` ratios; raises RuntimeError if a child fails."""
    names = ("raw", "vm_api", "machine")
    kib = {k: [] for k in names}
    npages = 0
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:
            res = _memory_in_child(name, count, image_path)
            kib[name].append(res["kib"])
            npages = res["pages"]
    return {"ram_kib": MEM_RAM // 1024, "resident_guest_pages": npages, "vms": count,
            **{f"{k}_kib": _summary(v) for k, v in kib.items()},
            "machine_vs_raw": _ratio(kib["machine"], kib["raw"]),
            "vm_api_vs_raw": _ratio(kib["vm_api"], kib["raw"])}


# -- boot ------------------------------------------------------------------------------------
def _pykvm_command():
    exe = os.path.join(os.path.dirname(sys.executable), "pykvm")
    if os.access(exe, os.X_OK):
        return [exe]
    return [sys.executable, "-m", "pykvm"]


def _run_timed(cmd, env, expect):
    """(wall s, child CPU s) of one whole process; None if it did not exit with ``expect``."""
    import resource
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=120)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if p.returncode != expect:
        return None, None, (p.returncode, p.stderr.decode(errors="replace").strip()[-300:])
    return wall, cpu, None


def boot(tmp: str, rounds: int, qemu_rounds: int, notes: list) -> dict:
    """Boot-to-exit time of whole processes: ``pykvm run`` of the tiny ELF64 and multiboot guests
    (written into the directory ``tmp``) against ``python -c pass``, ``python -c "import pykvm"``
    and, where installed, QEMU and kvmtool (those only in the first ``qemu_rounds`` of ``rounds``
    rounds). Returns wall and CPU ms summaries and ratios; appends explanations to ``notes``.
    Raises RuntimeError when a contender other than kvmtool exits with the wrong status."""
    image = os.path.join(tmp, "tiny-multiboot.elf")
    with open(image, "wb") as f:
        f.write(tiny_multiboot())
    image64 = os.path.join(tmp, "tiny-elf64.elf")
    with open(image64, "wb") as f:
        f.write(tiny_elf64())
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        notes.append("boot and memory: this environment sets PYTHONDONTWRITEBYTECODE, which "
                     "makes every Python start recompile pykvm's sources; the Python processes "
                     "here run with their bytecode cached (PYTHONPYCACHEPREFIX in a temporary "
                     "directory, warmed once), as after a normal install")
    env = _cached_bytecode_env(tmp)
    cmds = {
        "pykvm_run": (_pykvm_command() + ["run", image64, "--timeout", "20"], 1),
        "pykvm_run_multiboot": (_pykvm_command() + ["run", image, "--timeout", "20"], 1),
        "python_floor": ([sys.executable, "-c", "pass"], 0),
        "import_pykvm": ([sys.executable, "-c", "import pykvm"], 0),
    }
    qemu = shutil.which("qemu-system-x86_64")
    if qemu and HOST_ARCH == "x86_64":
        cmds["qemu"] = ([qemu, "-accel", "kvm", "-kernel", image, "-display", "none",
                         "-serial", "stdio", "-nodefaults", "-no-reboot", "-m", "64",
                         "-device", "isa-debug-exit,iobase=0xf4,iosize=4"], 1)
    else:
        notes.append("boot: qemu-system-x86_64 not found (or not an x86_64 host): "
                     "boot_vs_qemu is null")
    lkvm = shutil.which("lkvm") or shutil.which("kvmtool")
    if lkvm:
        cmds["kvmtool"] = ([lkvm, "run", "-k", image, "-m", "64", "-c", "1",
                            "--console", "serial"], None)
    else:
        notes.append("boot: kvmtool (lkvm) is not installed; it is not packaged for Debian 12 "
                     "(bookworm), so there is no kvmtool figure")
    for name in ("pykvm_run", "pykvm_run_multiboot", "python_floor", "import_pykvm"):
        _run_timed(cmds[name][0], env, cmds[name][1])            # warm the bytecode cache
    wall = {k: [] for k in cmds}
    cpu = {k: [] for k in cmds}
    failed = {}
    for r in range(rounds):
        names = [k for k in cmds if k not in ("qemu", "kvmtool") or r < qemu_rounds]
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            cmd, expect = cmds[name]
            if name in failed:
                continue
            w, c, err = _run_timed(cmd, env, expect if expect is not None else 0)
            if err is not None:
                if name == "kvmtool":
                    failed[name] = err
                    notes.append(f"boot: kvmtool could not boot the multiboot guest "
                                 f"(exit {err[0]}: {err[1]})")
                    continue
                raise RuntimeError(f"boot contender {name} exited {err[0]}: {err[1]}")
            wall[name].append(w * 1e3)
            cpu[name].append(c * 1e3)
    out = {"images": {"pykvm_run": "tiny ELF64, pykvm's own guest format (bare x86 machine): "
                                    "isa-debug-exit 0",
                      "pykvm_run_multiboot": "tiny multiboot ELF32 (QEMU's -kernel format; the "
                                             "pc machine by default): prints 'ok' on COM1, "
                                             "isa-debug-exit 0"},
           "commands": {k: " ".join(v[0]) for k, v in cmds.items()}}
    for name in cmds:
        out[name] = {"wall_ms": _summary(wall[name]), "cpu_ms": _summary(cpu[name])}

    def vs(a, b, key):
        if wall[a] and wall[b]:
            n = min(len(wall[a]), len(wall[b]))
            out[key] = _ratio(wall[a][:n], wall[b][:n])
    vs("pykvm_run", "python_floor", "pykvm_run_vs_python_floor")
    vs("pykvm_run", "import_pykvm", "pykvm_run_vs_import_pykvm")
    vs("pykvm_run_multiboot", "python_floor", "pykvm_run_multiboot_vs_python_floor")
    if "qemu" in cmds:
        vs("pykvm_run_multiboot", "qemu", "pykvm_run_multiboot_vs_qemu")
    if "kvmtool" in cmds:
        vs("pykvm_run_multiboot", "kvmtool", "pykvm_run_multiboot_vs_kvmtool")
    return out


# -- virtio-blk ------------------------------------------------------------------------------
BLK_GUEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                         "bench", "virtio_blk_bench.c")
BLK_CASES = (("read", "r", 1), ("write", "w", 1), ("read_qd32", "r", 32))


def virtio_blk(tmp: str, rounds: int, n: int, notes: list, cases=BLK_CASES) -> dict:
    """Host CPU per 4 KiB virtio-blk request of a tiny guest (tests/bench/virtio_blk_bench.c, a
    multiboot ELF32 that makes ``n`` requests at queue depth 1 or 32 and halts between
    completions): ``pykvm run --disk`` with the Python data path (``PYKVM_VIRTIO_BLK_NATIVE=0``),
    with the C path (:mod:`pykvm.devices.virtio.fastpath`), and ``qemu-system-x86_64 -accel kvm
    -machine pc -kernel`` with ``-device virtio-blk-pci`` (modern only) on the same image file.
    Each figure is whole-process CPU (user + system, every thread) of a run with ``n`` requests
    minus that of a run with none, from the same round (so boot, SeaBIOS included, cancels),
    divided by ``n``; requests/s likewise from wall time. Returns {case: {contender: {"cpu_us",
    "req_per_s"}}, "cpu_vs_qemu": {case: {"python", "c"}}}, or None (with a note) where the
    guest source or QEMU is missing. Raises RuntimeError if a run fails."""
    from .guestbuild import build
    qemu = shutil.which("qemu-system-x86_64")
    if not os.path.isfile(BLK_GUEST) or not qemu or HOST_ARCH != "x86_64":
        notes.append("virtio_blk: needs a checkout (tests/bench/virtio_blk_bench.c), an x86_64 "
                     "host and qemu-system-x86_64; not measured")
        return None
    image = build(BLK_GUEST, mode="protected")
    disk = os.path.join(tmp, "blk-bench.img")
    with open(disk, "wb") as f:
        for _ in range(16):
            f.write(os.urandom(1 << 20))
    env = _cached_bytecode_env(tmp)

    def cmd(who, line):
        if who == "qemu":
            return ([qemu, "-accel", "kvm", "-machine", "pc", "-m", "64", "-display", "none",
                     "-nodefaults", "-no-reboot", "-kernel", image, "-append", line,
                     "-drive", f"file={disk},if=none,id=d0,format=raw",
                     "-device", "virtio-blk-pci,drive=d0,disable-legacy=on",
                     "-device", "isa-debug-exit,iobase=0xf4,iosize=4"], env)
        e = dict(env, PYKVM_VIRTIO_BLK_NATIVE="1" if who == "c" else "0")
        return (_pykvm_command() + ["run", image, "--no-input", "--disk", disk, "--cmdline",
                                    line, "--timeout", "600"], e)
    who_all = ("python", "c", "qemu")
    runs = [("idle", "n=0 d=1 o=r")] + [(c, f"n={n} d={d} o={o}") for c, o, d in cases]
    cpu = {(w, r): [] for w in who_all for r, _ in runs}
    wall = {(w, r): [] for w in who_all for r, _ in runs}
    _run_timed(*cmd("c", "n=0"), 1)                              # warm caches
    for rnd in range(rounds):
        order = runs[rnd % len(runs):] + runs[:rnd % len(runs)]
        for r, line in order:
            for w in who_all[rnd % 3:] + who_all[:rnd % 3]:
                c, e = cmd(w, line)
                wl, cp, err = _run_timed(c, e, 1)
                if err is not None:
                    raise RuntimeError(f"virtio_blk {w} {line!r} exited {err[0]}: {err[1]}")
                cpu[(w, r)].append(cp)
                wall[(w, r)].append(wl)
    out: dict = {"requests": n, "block": 4096, "rounds": rounds, "cpu_vs_qemu": {}}
    lost = 0
    for case, _o, _d in cases:
        row = {}
        per = {}
        for w in who_all:
            # a round whose run with requests took no more CPU than the one without measured
            # only start-up noise (QEMU's SeaBIOS varies by more than a quick run's requests
            # cost): it is left out rather than read as a negative cost
            us = [(a - b) / n * 1e6 if a > b else None
                  for a, b in zip(cpu[(w, case)], cpu[(w, "idle")])]
            lost += us.count(None)
            rate = [n / (a - b) if a > b else None
                    for a, b in zip(wall[(w, case)], wall[(w, "idle")])]
            per[w] = us
            row[w] = {"cpu_us": _summary(us), "req_per_s": _summary(rate)}
        out[case] = row
        out["cpu_vs_qemu"][case] = {w: _ratio(per[w], per["qemu"]) for w in ("python", "c")}
    if lost:
        notes.append(f"virtio_blk: {lost} round(s) left out: their start-up noise (qemu's "
                     "SeaBIOS above all) was larger than the cost of the requests")
    notes.append("virtio_blk: host CPU per request is whole-process CPU (vCPU thread, device "
                 "threads, QEMU's I/O threads) of n requests minus a run with none, so the "
                 "guest's own instructions are in it for every contender alike (on kvm_pvm "
                 "hosts ring-0 guest code is emulated, which makes that part large)")
    return out


# -- pytest plugin import --------------------------------------------------------------------
def importtime_lines(stderr: str) -> list:
    """[(indent level, cumulative µs, module)] for each line of ``python -X importtime`` output
    in ``stderr`` (other lines are skipped)."""
    rows = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$", line)
        if m:
            rows.append((len(m.group(3)) // 2, int(m.group(2)), m.group(4)))
    return rows


def pykvm_cost_us(rows: list) -> int:
    """Cumulative import time (µs) of pykvm's modules in :func:`importtime_lines` ``rows``, each
    counted once: a pykvm line nested under another pykvm line (its cost is already in that
    line's cumulative figure) is not added again. importtime prints children before their
    parent, one indent level deeper."""
    def is_ours(name):
        return name == "pykvm" or name.startswith("pykvm.")
    total = 0
    for i, (level, cum, name) in enumerate(rows):
        if not is_ours(name):
            continue
        lvl, nested = level, False
        for plevel, _, pname in rows[i + 1:]:     # walk up through the enclosing imports
            if plevel < lvl:
                if is_ours(pname):
                    nested = True
                    break
                lvl = plevel
        if not nested:
            total += cum
    return total


PLUGIN_PROBE = "import pytest; import pykvm.testing.plugin"


def plugin_import(tmp: str, rounds: int, notes: list):
    """What registering pykvm's pytest plugin adds to a pytest start-up: ``rounds`` runs of
    ``python -X importtime -c`` :data:`PLUGIN_PROBE` with bytecode cached in ``tmp`` (as after
    an install). pytest loads entry-point plugins through ``importlib``, which importtime does
    not list at top level, so the plugin module is imported explicitly, after pytest. Returns
    {"plugin_us", "pytest_us": summaries of µs, "vs_pytest": per-round ratio plugin/pytest,
    "modules": the pykvm modules imported}, or None (with a note) where pytest is not installed.
    Raises RuntimeError if the probe fails."""
    import importlib.util
    if importlib.util.find_spec("pytest") is None:
        notes.append("plugin import: pytest is not installed here, so there is no pytest run "
                     "for the plugin to cost anything in; not measured")
        return None
    env = _cached_bytecode_env(tmp)
    cmd = [sys.executable, "-X", "importtime", "-c", PLUGIN_PROBE]
    subprocess.run(cmd, env=env, capture_output=True, timeout=120)         # warm the cache
    ours, theirs, modules = [], [], set()
    for _ in range(rounds):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        rows = importtime_lines(p.stderr)
        top = [cum for level, cum, name in rows if level == 0 and name == "pytest"]
        if p.returncode != 0 or not top:
            raise RuntimeError(f"plugin import probe exited {p.returncode}: {p.stderr[-300:]}")
        ours.append(pykvm_cost_us(rows))
        theirs.append(top[0])
        modules |= {n for _, _, n in rows if n == "pykvm" or n.startswith("pykvm.")}
    return {"probe": PLUGIN_PROBE, "plugin_us": _summary(ours), "pytest_us": _summary(theirs),
            "vs_pytest": _ratio(ours, theirs), "modules": sorted(modules)}


# -- scaling ---------------------------------------------------------------------------------
def scaling(kvm, n: int) -> list:
    """Aggregate exit rate of the C run loop (I/O out to port 0x80) with 1, 2, 4, ... vCPUs up to
    the host's CPU count, one thread per vCPU running ``n`` exits. Returns one dict per vCPU count:
    "vcpus", "exits", "seconds" (wall) and "exits_per_s"."""
    cpus = os.cpu_count() or 1
    counts = sorted({c for c in (1, 2, 4, 8, 16, 32, 64, 128) if c <= cpus} | {cpus})
    rows = []
    for k in counts:
        total, dt = _exit_rate(kvm, k, n)
        rows.append({"vcpus": k, "exits": total, "seconds": round(dt, 4),
                     "exits_per_s": round(total / dt)})
    return rows


# -- the whole run ---------------------------------------------------------------------------
def host_info() -> dict:
    """The host as the report describes it: architecture, CPU model and count, kernel release, the
    loaded KVM module (kvm_intel, kvm_amd, kvm_pvm or "unknown"), Python version and load averages
    (None where unavailable)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    backend = next((m for m in ("kvm_pvm", "kvm_intel", "kvm_amd")
                    if os.path.isdir(f"/sys/module/{m}")), "unknown")
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"machine": HOST_ARCH, "cpu": model, "cpus": os.cpu_count(),
            "kernel": platform.release(), "kvm_module": backend, "python": platform.python_version(),
            "loadavg": load}


def _headline(res: dict) -> tuple:
    """(ratios, ranges): the issue's headline ratios (None where a contender could not run)."""
    ratios, ranges = {}, {}

    def put(name, summary):
        ratios[name] = summary["median"] if summary else None
        if summary:
            ranges[name] = [summary["min"], summary["max"]]
    ex = res["exit_cost"]
    put("c_loop_vs_raw", ex["io_out"]["c_loop"]["cpu_vs_raw"])
    put("python_vs_raw", ex["io_out"]["python"]["cpu_vs_raw"])
    put("machine_on_vs_raw", ex["io_out"]["machine"]["cpu_vs_raw"])
    put("machine_on_vs_python", ex["io_out"]["machine"].get("cpu_vs_python"))
    for kind in KINDS:
        put(f"c_loop_vs_raw_{kind}", ex[kind]["c_loop"]["cpu_vs_raw"])
        put(f"python_vs_raw_{kind}", ex[kind]["python"]["cpu_vs_raw"])
    put("lifecycle_vs_raw", res["lifecycle"]["cpu_vs_raw"])
    put("reset_vs_raw", res["reset"]["reset_vs_raw"])
    put("recreate_vs_reset", res["reset"]["recreate_vs_reset"])
    put("machine_mem_vs_raw", res["memory"]["machine_vs_raw"])
    put("boot_vs_qemu", res["boot"].get("pykvm_run_multiboot_vs_qemu"))
    put("boot_vs_python_floor", res["boot"].get("pykvm_run_vs_python_floor"))
    put("boot_multiboot_vs_python_floor", res["boot"].get("pykvm_run_multiboot_vs_python_floor"))
    put("boot_vs_kvmtool", res["boot"].get("pykvm_run_multiboot_vs_kvmtool"))
    blk = res.get("virtio_blk")
    put("virtio_blk_cpu_vs_qemu", blk["cpu_vs_qemu"]["read"]["c"] if blk else None)
    pl = res.get("plugin_import")
    put("plugin_import_vs_pytest", pl["vs_pytest"] if pl else None)
    wall = {"c_loop_vs_raw": ex["io_out"]["c_loop"]["wall_vs_raw"],
            "python_vs_raw": ex["io_out"]["python"]["wall_vs_raw"],
            "lifecycle_vs_raw": res["lifecycle"]["wall_vs_raw"]}
    return ratios, ranges, {k: v["median"] if v else None for k, v in wall.items()}


def run(quick: bool = False, exits: int = 0) -> dict:
    """Every measurement; returns the JSON-ready result (see the module doc)."""
    from .kvm import Kvm
    s = dict(QUICK if quick else FULL)
    if exits:
        s["exits"] = exits
    notes = []
    t0 = time.monotonic()
    res = {"host": host_info(), "quick": quick, "settings": s}
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp, Kvm() as kvm:
        image = os.path.join(tmp, "tiny-elf64.elf")
        with open(image, "wb") as f:
            f.write(tiny_elf64())
        res["exit_cost"] = exit_cost(kvm, s["rounds"], s["exits"])
        res["lifecycle"] = lifecycle(kvm, s["rounds"], s["life"])
        res["reset"] = reset(kvm, s["reset_rounds"], s["resets"], s["recreates"])
        res["memory"] = memory(kvm, image, s["mem_rounds"], s["mem_vms"])
        res["scaling"] = scaling(kvm, s["scale_exits"])
        res["boot"] = boot(tmp, s["boot"], s["boot_qemu"], notes)
        res["virtio_blk"] = virtio_blk(tmp, s["blk_rounds"], s["blk_requests"], notes)
        res["plugin_import"] = plugin_import(tmp, s["plugin_rounds"], notes)
    notes.append("exit cost and lifecycle ratios compare the calling thread's CPU time (per-round "
                 "medians of contender/raw): what the work costs, however loaded the machine "
                 "is; wall-clock figures and ratios are reported beside them (ratios_wall)")
    notes.append("reset: wall time of each reset (they are all synchronous ioctls), the raw-C "
                 "reset loading the same vCPU/VM state (11 ioctls: completing the guest's "
                 "pending exit, KVM_GET_DIRTY_LOG, 8 vCPU SETs, KVM_SET_CLOCK); recreate_vs_reset: "
                 "how many times longer destroying and re-creating the Machine takes than "
                 "Machine.reset()")
    notes.append("memory: resident set growth per VM for a second batch of VMs made after a "
                 "first (the marginal cost per VM), each measured in a fresh process; 16 "
                 "MiB of RAM with the same guest pages resident: raw C copies the pages a "
                 "Machine has resident after loading a tiny ELF64 guest (bare x86 platform, "
                 "long mode)")
    ratios, ranges, wall = _headline(res)
    out = {"ratios": ratios, "ratio_ranges": ranges, "ratios_wall": wall,
           "thresholds": THRESHOLDS, "notes": notes}
    out.update(res)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


# -- output ----------------------------------------------------------------------------------
def _fmt(summary, unit="", digits=2):
    if not summary:
        return "n/a"
    return (f"{summary['median']:.{digits}f}{unit} ({summary['min']:.{digits}f}–"
            f"{summary['max']:.{digits}f})")


def report(res: dict) -> str:
    """The human-readable text of a :func:`run` result: each figure as median (min–max), each
    headline ratio against its limit, then the notes."""
    h = res["host"]
    lines = [f"pykvm bench{' --quick' if res['quick'] else ''} on {h['cpu']} ({h['cpus']} CPUs), "
             f"Linux {h['kernel']}, {h['kvm_module']}, Python {h['python']}, load {h['loadavg']}",
             "", "exit cost, µs of CPU per exit: median (min–max)"]
    for kind in KINDS:
        row = res["exit_cost"][kind]
        lines.append(f"  {kind:<11}" + "".join(f"  {k} {_fmt(v['cpu_us'])}" for k, v in row.items()))
    lc = res["lifecycle"]
    lines += ["", f"VM lifecycle, µs of CPU per VM: raw C {_fmt(lc['raw']['cpu_us'], digits=0)}, "
                  f"pykvm {_fmt(lc['pykvm']['cpu_us'], digits=0)}; VMs/s (wall): raw C "
                  f"{lc['raw']['vms_per_s']}, pykvm {lc['pykvm']['vms_per_s']}"]
    rs = res["reset"]

    def us(k):
        s = rs[k]["us"]
        return f"{s['median']:.1f} ({s['p10']:.1f}–{s['p90']:.1f})"
    lines.append(f"reset to a checkpoint ({rs['pages_per_reset']} pages dirtied), µs per reset, "
                 f"median (p10–p90): Machine.reset() {us('machine_reset')}, raw C "
                 f"{us('raw_reset')} (dirty ring {us('raw_reset_ring')}, manual protect "
                 f"{us('raw_reset_log_manual')}); destroy + re-create: Machine "
                 f"{us('machine_recreate')}, raw C {us('raw_recreate')}; state restored: "
                 f"{'yes' if rs['restored'] else 'NO'}")
    m = res["memory"]
    lines.append(f"memory per VM ({m['ram_kib']} KiB RAM, {m['resident_guest_pages']} guest pages "
                 f"resident), KiB: raw C {_fmt(m['raw_kib'], digits=1)}, Vm API "
                 f"{_fmt(m['vm_api_kib'], digits=1)}, Machine {_fmt(m['machine_kib'], digits=1)}")
    b = res["boot"]
    lines.append("boot to exit, ms wall: " + ", ".join(
        f"{k} {_fmt(b[k]['wall_ms'], digits=1)}" for k in
        ("pykvm_run", "pykvm_run_multiboot", "python_floor", "import_pykvm", "qemu",
         "kvmtool") if k in b))
    blk = res.get("virtio_blk")
    for case in (k for k, _o, _d in BLK_CASES if blk and k in blk):
        lines.append(f"virtio-blk 4 KiB {case}, µs of host CPU per request (requests/s): " +
                     ", ".join(f"{w} {_fmt(v['cpu_us'], digits=1)} ({v['req_per_s']['median']:.0f})"
                               for w, v in blk[case].items()))
    pl = res.get("plugin_import")
    if pl:
        lines.append(f"pytest plugin import, µs: pykvm's modules {_fmt(pl['plugin_us'], digits=0)} "
                     f"against pytest's own {_fmt(pl['pytest_us'], digits=0)} "
                     f"({', '.join(pl['modules'])})")
    lines.append("scaling (C loop, I/O out): " + ", ".join(
        f"{r['vcpus']} vCPU {r['exits_per_s'] / 1e3:.0f}k exits/s" for r in res["scaling"]))
    lines += ["", "ratios (median of per-round ratios; limit):"]
    for k, v in res["ratios"].items():
        lim = res["thresholds"].get(k)
        rng = res["ratio_ranges"].get(k)
        verdict = "" if lim is None or v is None else ("  ok" if v <= lim else "  OVER")
        lines.append(f"  {k:<28} {'n/a' if v is None else f'{v:.3f}':>7}"
                     f"{f'  ({rng[0]:.3f}–{rng[1]:.3f})' if rng else ''}"
                     f"{f'  ≤ {lim}' if lim else ''}{verdict}")
    lines += [""] + [f"note: {n}" for n in res["notes"]]
    lines.append(f"({res['seconds']} s)")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    """The ratios as horizontal bars with min–max whiskers, log scale, limits marked."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("pykvm bench --plot needs matplotlib (pip install 'pykvm-vmm[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in ("c_loop_vs_raw", "python_vs_raw", "machine_on_vs_raw",
                         "machine_on_vs_python", "python_vs_raw_io_in", "python_vs_raw_mmio_write",
                         "python_vs_raw_mmio_read", "python_vs_raw_hlt", "lifecycle_vs_raw",
                         "reset_vs_raw",
                         "machine_mem_vs_raw", "boot_vs_python_floor",
                         "boot_multiboot_vs_python_floor", "boot_vs_qemu",
                         "plugin_import_vs_pytest")
             if res["ratios"].get(k) is not None]
    vals = [res["ratios"][k] for k in names]
    lo = [v - res["ratio_ranges"].get(k, [v, v])[0] for k, v in zip(names, vals)]
    hi = [res["ratio_ranges"].get(k, [v, v])[1] - v for k, v in zip(names, vals)]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.6))
    y = list(range(len(names)))[::-1]
    colors = []
    for k, v in zip(names, vals):
        lim = THRESHOLDS.get(k)
        colors.append("#4c72b0" if lim is None else ("#55a868" if v <= lim else "#c44e52"))
    ax.barh(y, vals, color=colors, xerr=[lo, hi], capsize=3, ecolor="#333333", height=0.6)
    for yi, k, v, up in zip(y, names, vals, hi):
        lim = THRESHOLDS.get(k)
        right = v + up
        if lim is not None:
            ax.plot([lim, lim], [yi - 0.42, yi + 0.42], color="#111111", linewidth=2.5)
            right = max(right, lim)
        label = (f"{v:.2f}" if v >= 0.1 else f"{v:.3f}") + (f"  (≤ {lim})" if lim else "")
        ax.text(right * 1.07, yi, label, va="center", fontsize=8)
    ax.axvline(1.0, color="#888888", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(min(vals + [0.5]) / 1.6, max(v + u for v, u in zip(vals, hi)) * 2.6)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=9)
    ax.set_xlabel("pykvm / contender (log scale; dashed: parity; black tick: required limit; "
                  "whiskers: min–max over rounds)", fontsize=8)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color="#55a868", label="within its limit"),
                       Patch(color="#c44e52", label="over its limit"),
                       Patch(color="#4c72b0", label="reported (no limit)")],
              fontsize=8, loc="lower right")
    h = res["host"]
    ax.set_title(f"pykvm bench{' --quick' if res['quick'] else ''}: {h['cpu']}, {h['cpus']} CPUs, "
                 f"Linux {h['kernel']} ({h['kvm_module']}), load {h['loadavg'][0] if h['loadavg'] else '?'}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    """The ``pykvm bench`` command: measure (``args.quick``, ``args.exits``), draw the ratios to
    ``args.plot`` if set, and print the result as JSON (``args.json``) or as the text report;
    with ``args.curves`` the cost curves instead (:func:`curves`, drawn by :func:`plot_curves`).
    Returns the exit status: 0, or :data:`pykvm.status.OVER_LIMIT` (10) when a headline ratio
    is over its limit in this run and again when measured a second time (one line on stderr
    names each)."""
    import json
    if getattr(args, "curves", False):
        res = curves(quick=getattr(args, "quick", False))
        if getattr(args, "plot", None):
            plot_curves(res, args.plot)
        print(json.dumps(res, indent=2) if args.json else curves_report(res))
        return 0
    quick, exits = getattr(args, "quick", False), getattr(args, "exits", 0) or 0
    res = run(quick=quick, exits=exits)
    over = over_limits(res)
    res["remeasured"] = {}
    if over:
        # once more, to tell a slow host from a moment of noise: a ratio is over its limit only
        # if the second measurement says so too
        print(f"pykvm bench: {', '.join(over)} over the limit; measuring again", file=sys.stderr,
              flush=True)
        again = run(quick=quick, exits=exits)
        res["remeasured"] = {k: again["ratios"][k] for k in over}
        over = [k for k in over if k in over_limits(again)]
    res["over_limit"] = over
    if getattr(args, "plot", None):
        plot(res, args.plot)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(report(res))
    if over:
        th = res["thresholds"]
        print("pykvm bench: over the limit on this host, measured twice: " + ", ".join(
            f"{k} {res['ratios'][k]:.2f} then {res['remeasured'][k]:.2f} (limit {th[k]})"
            for k in over), file=sys.stderr)
        return status.OVER_LIMIT
    return 0


def over_limits(res: dict) -> list:
    """Names of the headline ratios of a :func:`run` result that are over their limits."""
    th = res["thresholds"]
    return [k for k, v in res["ratios"].items()
            if v is not None and th.get(k) is not None and v > th[k]]


# -- cost curves -----------------------------------------------------------------------------
# ``pykvm bench --curves``: how each cost grows as the work grows, measured on this host, with
# the published figures of Firecracker beside the matching curves (reference values, measured
# by Firecracker on its own hosts and guests: never a limit this bench holds pykvm to).
ALIVE_COUNTS = (0, 10, 100, 1000)       # other VMs alive during the create→run→destroy loop
MEM_COUNTS = (1, 10, 100)               # VMs alive when the marginal memory per VM is taken
RAM_SIZES = (64 << 20, 256 << 20, 1 << 30, 4 << 30, 16 << 30, 64 << 30)   # guest RAM, bytes
KUT_TESTS_QUICK = ("smptest", "vmexit_cpuid")
KUT_TESTS_FULL = ("smptest", "vmexit_cpuid", "vmexit_mov_to_cr8", "vmexit_inl_pmtimer",
                  "vmexit_ipi", "idt_test")
CURVES_QUICK = dict(scale_exits=5000, scale_reps=1, life=30, life_rounds=2, mem_rounds=1,
                    ram_reps=1, kut_tests=KUT_TESTS_QUICK)
CURVES_FULL = dict(scale_exits=100000, scale_reps=3, life=100, life_rounds=5, mem_rounds=5,
                   ram_reps=5, kut_tests=KUT_TESTS_FULL)
CURVE_NAMES = ("exits_vs_vcpus", "lifecycle_vs_alive", "memory_per_vm_vs_vms",
               "create_ms_vs_ram", "resident_vs_ram", "kut_vs_qemu")
ANCHORS = {
    "firecracker_creation_rate": {
        "value": 5.0, "unit": "microVMs/s per host core",
        "label": "Firecracker: 5 microVMs per host core per second",
        "source": "Firecracker docs/design.md: \"a steady mutation rate of 5 microVMs per host "
                  "core per second\" (a microVM with a minimal Linux kernel, 1 vCPU, 128 MiB)",
        "url": "https://github.com/firecracker-microvm/firecracker/blob/main/docs/design.md"},
    "firecracker_vmm_overhead": {
        "value": 5120.0, "unit": "KiB per VM (at most)",
        "label": "Firecracker: ≤ 5 MiB VMM overhead per microVM",
        "source": "Firecracker SPECIFICATION.md: the VMM threads' memory overhead <= 5 MiB "
                  "(a microVM of 1 vCPU and 128 MiB, Firecracker-tuned guest kernel)",
        "url": "https://github.com/firecracker-microvm/firecracker/blob/main/SPECIFICATION.md"},
}


def _progress(msg: str) -> None:
    print(f"pykvm bench --curves: {msg}", file=sys.stderr, flush=True)


def _curve(title: str, x: str, x_unit: str, y: str, y_unit: str, series: dict, main: str,
           anchor=None, notes=(), not_measured=None, log_x=False, log_y=False, **extra) -> dict:
    """One curve as ``curves`` returns it: ``points`` (the main series, [x, y] pairs), every
    ``series`` by label, the quantities and units of both axes, the anchor beside it (None where
    none applies), notes, and ``not_measured`` (None, or why the curve has no points)."""
    return {"title": title, "x": x, "x_unit": x_unit, "y": y, "y_unit": y_unit,
            "main_series": main, "points": series.get(main, []), "series": series,
            "anchor": anchor, "notes": list(notes), "not_measured": not_measured,
            "log_x": log_x, "log_y": log_y, **extra}


def _anchor(key: str, **over) -> dict:
    return dict(ANCHORS[key], key=key, **over)


def _exit_rate(kvm, k: int, n: int) -> tuple:
    """(exits, wall seconds) of ``k`` vCPUs of one VM, one thread each, every thread running the
    C loop for ``n`` I/O-out exits (port 0x80), started together behind a barrier."""
    from .runloop import LoopConfig, RunLoop
    code = guest_code("io_out")
    vm, v0 = _real_mode_vcpu(kvm, code)
    with vm:
        vcpus = [v0]
        for _ in range(k - 1):
            vcpus.append(_real_mode_start(vm.create_vcpu()))
        cfg = LoopConfig(serial_base=0, exit_port=0, debugcon_port=PORT, console_limit=1 << 12)
        loops = [RunLoop(v, config=cfg) for v in vcpus]
        barrier = threading.Barrier(k + 1)
        errors: list = []

        def work(loop, barrier: threading.Barrier, errors: list) -> None:
            barrier.wait()
            try:
                loop.run(budget=n)
            except Exception as e:  # noqa: BLE001 pragma: no cover — re-raised below
                errors.append(e)
        threads = [threading.Thread(target=work, args=(lp, barrier, errors)) for lp in loops]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        if errors:
            raise errors[0]
        return sum(lp.exits_total for lp in loops), dt


def exits_vs_vcpus(kvm, n: int, reps: int) -> dict:
    """Curve: aggregate exits/s (wall) of one VM's vCPUs all running the C loop, for 1, 2, 4, ...
    vCPUs up to twice the host's CPU count (beyond the CPU count the vCPU threads are
    overcommitted); ``n`` exits per vCPU, the median of ``reps`` runs per point."""
    cpus = os.cpu_count() or 1
    counts = sorted({c for c in (1 << i for i in range(12)) if c <= 2 * cpus} | {cpus, 2 * cpus}
                    | (set(range(1, 2 * cpus + 1)) if cpus <= 4 else set()))
    pts, per = [], []
    for k in counts:
        rates = []
        for _ in range(reps):
            total, dt = _exit_rate(kvm, k, n)
            rates.append(total / dt)
        rate = statistics.median(rates)
        pts.append([k, round(rate)])
        per.append([k, round(rate / k)])
        _progress(f"exits/s with {k} vCPU(s): {rate / 1e3:.0f}k")
    return _curve("I/O exits per second against vCPUs (C run loop, one VM)", "vCPUs", "vCPUs",
                  "exits per second, all vCPUs together", "exits/s",
                  {"all vCPUs": pts, "per vCPU": per}, "all vCPUs", host_cpus=cpus,
                  notes=[f"one thread per vCPU, {n} I/O-out exits (port 0x80) each, wall clock "
                         f"from a common start to the last thread's end, median of {reps}; "
                         f"the host has {cpus} CPUs: counts above it are overcommitted"])


def _life_machine(kvm, count):
    from .machine import Machine
    with _Clock() as c:
        for _ in range(count):
            with Machine(b"\xF4", flat_addr=CODE_GPA, flat_mode="real", mem_size=RAM,
                         kvm=kvm) as m:
                ev = m.step(timeout=30)
                if ev.kind != "exit":
                    raise RuntimeError(f"lifecycle Machine: {m.describe(ev)}")
    return c.cpu / count / 1e3, c.wall / count / 1e3


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def lifecycle_vs_alive(kvm, count: int, rounds: int, notes: list) -> dict:
    """Curve: create→run→destroy rate (VMs/s, wall) of raw C, pykvm's Vm API and a Machine (one
    512 KiB slot, one vCPU, run to HLT) while 0, 10, 100 and 1000 other VMs stay alive in this
    process; ``rounds`` rounds of ``count`` VMs per contender and point. Raises the soft
    RLIMIT_NOFILE to the hard limit if the alive VMs need it (restored afterwards); where the
    largest count cannot be reached (the fd limit, or a failure to create a VM) measures at the
    largest count reached and says why in the curve's notes."""
    import resource
    cnotes = []
    f0 = _open_fds()
    vm, v = _real_mode_vcpu(kvm, b"\xF4")
    per_vm = max(1, _open_fds() - f0)
    vm.close()
    margin = 64
    need = _open_fds() + max(ALIVE_COUNTS) * per_vm + margin
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = saved
    if soft != resource.RLIM_INFINITY and soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            cnotes.append(f"the soft open-files limit (ulimit -n) {soft} was raised to the hard "
                          f"limit {hard} for this curve ({need} descriptors wanted)")
            soft = hard
        except (OSError, ValueError) as e:
            cnotes.append(f"the soft open-files limit {soft} could not be raised to {hard}: {e}")
    targets = list(ALIVE_COUNTS)
    if soft != resource.RLIM_INFINITY and soft < need:
        top = max(0, (soft - _open_fds() - margin) // per_vm)
        cnotes.append(f"{max(ALIVE_COUNTS)} VMs alive need about {need} open files "
                      f"({per_vm} per VM) but the limit is {soft}: measured up to {top}")
        targets = sorted({min(t, top) for t in targets})
    names = {"raw C": _life_raw, "pykvm Vm API": _life_pykvm, "Machine": _life_machine}
    for fn in names.values():                   # warm the code paths and the kernel's caches
        fn(kvm, max(1, count // 4))
    series = {k: [] for k in names}
    cpu_us = {k: [] for k in names}
    alive: list = []
    try:
        for target in targets:
            stuck = None
            while len(alive) < target:
                try:
                    vm, v = _real_mode_vcpu(kvm, b"\xF4")
                except OSError as e:
                    stuck = e
                    break
                alive.append(vm)
                v.run()
            if stuck is not None:
                cnotes.append(f"could not keep {target} VMs alive: creating VM {len(alive) + 1} "
                              f"failed ({stuck}); measured with {len(alive)}")
            x = len(alive)
            if series["raw C"] and series["raw C"][-1][0] == x:
                break
            wall = {k: [] for k in names}
            cpu = {k: [] for k in names}
            for r in range(rounds):
                order = list(names)[r % 3:] + list(names)[:r % 3]
                for name in order:
                    c, w = names[name](kvm, count)
                    cpu[name].append(c)
                    wall[name].append(w)
            for name in names:
                series[name].append([x, round(1e6 / statistics.median(wall[name]), 1)])
                cpu_us[name].append([x, round(statistics.median(cpu[name]), 1)])
            _progress(f"create→run→destroy with {x} VMs alive: " + ", ".join(
                f"{k} {series[k][-1][1]:.0f} VMs/s" for k in names))
            if stuck is not None:
                break
    finally:
        for vm in alive:
            vm.close()
        if resource.getrlimit(resource.RLIMIT_NOFILE) != saved:
            resource.setrlimit(resource.RLIMIT_NOFILE, saved)
    notes.extend(cnotes)
    cpus = os.cpu_count() or 1
    return _curve(
        "create→run→destroy rate against VMs alive in the process", "other VMs alive", "VMs",
        "VMs created, run to HLT and destroyed per second (one thread)", "VMs/s", series,
        "pykvm Vm API", log_x=True, log_y=True, cpu_us_per_vm=cpu_us, fds_per_vm=per_vm,
        anchor=_anchor("firecracker_creation_rate", host_value=5.0 * cpus,
                       comparable=f"drawn at 5 VMs/s, one core's share (each loop here runs on "
                       f"one thread); this {cpus}-CPU host's share would be {5 * cpus} VMs/s. "
                       "Not like for like: a Firecracker microVM boots a Linux kernel in its "
                       "own process; the VMs here run one HLT instruction"),
        notes=cnotes + [f"each point: {count} VMs per contender, median of {rounds} rounds "
                        "(order rotating); the alive VMs are Vm-API VMs of the same shape, "
                        "each run to HLT once; CPU µs per VM in cpu_us_per_vm"])


def memory_vs_vms(image_path: str, rounds: int) -> dict:
    """Curve: resident host memory per VM (KiB, marginal: the growth for N more VMs made after a
    first N, in a fresh process by :func:`memory_child`) for N = 1, 10, 100 Machines (16 MiB of
    RAM, the tiny ELF64 guest loaded, not started) and raw-C VMs with the same
    guest pages resident; the median of ``rounds`` processes per point. Raises RuntimeError if a
    child fails."""
    kinds = {"Machine": "machine", "raw C": "raw"}
    series: dict = {k: [] for k in kinds}
    series["Machine less its guest pages"] = []
    for n in MEM_COUNTS:
        got: dict = {k: [] for k in kinds}
        pages = 0
        for _ in range(rounds):
            for label, kind in kinds.items():
                res = _memory_in_child(kind, n, image_path)
                got[label].append(res["kib"])
                pages = res["pages"]
        for label in kinds:
            series[label].append([n, round(statistics.median(got[label]), 1)])
        series["Machine less its guest pages"].append(
            [n, round(statistics.median(got["Machine"]) - pages * 4, 1)])
        _progress(f"resident memory per VM with {n} alive: Machine "
                  f"{series['Machine'][-1][1]:.0f} KiB, raw C {series['raw C'][-1][1]:.0f} KiB")
    return _curve(
        "resident host memory per VM against VMs alive", "VMs alive (N)", "VMs",
        "resident host memory per VM (marginal)", "KiB", series, "Machine", log_x=True,
        log_y=True,
        anchor=_anchor("firecracker_vmm_overhead",
                       comparable="Firecracker counts its VMM threads' memory apart from the "
                       "guest's; 'Machine less its guest pages' is the matching figure here "
                       "(resident growth less the guest RAM pages resident)"),
        notes=[f"{MEM_RAM >> 20} MiB of guest RAM per VM, the tiny ELF64 guest loaded (bare x86 "
               "machine, long mode, not started); resident set growth per VM for a second batch "
               f"of N made after a first N, each point in a fresh process, median of {rounds}; "
               "kernel memory (KVM's own structures) is not in the resident set"])


def ram_child(image_path: str, reps: int) -> dict:
    """In a fresh process: Machine create time (ms, wall, the constructor) and resident set
    growth (KiB, after running to the first exit) for each size of ``RAM_SIZES``, in real mode
    (a flat one-instruction HLT guest) and in long mode (the tiny ELF64 at ``image_path``); the
    median of ``reps`` per size. A size a mode refuses (ValueError/OSError) is recorded with the
    refusal's text under "refused". Prints and returns {"real": [[MiB, ms, KiB]...], "long":
    [...], "refused": {"long:MiB": text}}."""
    import json
    from .kvm import Kvm
    from .machine import Machine
    out: dict = {"real": [], "long": [], "refused": {}}
    with Kvm() as kvm:
        def make(mode: str, size: int):
            if mode == "real":
                return Machine(b"\xF4", flat_addr=CODE_GPA, flat_mode="real", mem_size=size,
                               kvm=kvm)
            return Machine(image_path, mem_size=size, kvm=kvm)
        for mode in ("real", "long"):
            make(mode, RAM_SIZES[0]).close()                 # warm the code paths
            for size in RAM_SIZES:
                ms, kib = [], []
                try:
                    for _ in range(reps):
                        gc.collect()
                        r0 = _rss_kib()
                        t0 = time.perf_counter()
                        m = make(mode, size)
                        t1 = time.perf_counter()
                        try:
                            m.step(timeout=30)
                            kib.append(_rss_kib() - r0)
                        finally:
                            m.close()
                        ms.append((t1 - t0) * 1e3)
                except (ValueError, OSError) as e:
                    out["refused"][f"{mode}:{size >> 20}"] = str(e)
                    continue
                out[mode].append([size >> 20, round(statistics.median(ms), 2),
                                  statistics.median(kib)])
    print(json.dumps(out))
    return out


def ram_curves(image_path: str, reps: int, notes: list) -> tuple:
    """Curves: Machine create time (ms) and resident host memory (KiB) against guest RAM size,
    64 MiB to 64 GiB, measured by :func:`ram_child` in a fresh process."""
    import json
    code = f"from pykvm import bench; bench.ram_child({image_path!r}, {reps})"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"create time against RAM size failed: {p.stderr[-500:]}")
    res = json.loads(p.stdout.splitlines()[-1])
    cnotes = [f"long mode refused {int(k.split(':')[1]) >> 10} GiB: {v}" if
              int(k.split(":")[1]) >= 1024 else f"{k} refused: {v}"
              for k, v in res["refused"].items()]
    notes.extend(cnotes)
    labels = {"real": "real mode (flat HLT guest)", "long": "long mode (tiny ELF64)"}
    ms = {labels[m]: [[mib, t] for mib, t, _ in res[m]] for m in labels}
    kib = {labels[m]: [[mib, r] for mib, _, r in res[m]] for m in labels}
    for m in labels:
        _progress(f"{labels[m]}: create ms by RAM MiB " +
                  ", ".join(f"{mib}: {t:.1f}" for mib, t, _ in res[m]))
    common = [f"bare x86 machine; RAM mapped lazily (MAP_NORESERVE); median of {reps}; the "
              "long-mode boot page tables map 32 GiB of addresses, so long mode stops at 31 GiB "
              "(RAM above 3 GiB sits above the PCI hole)"] + cnotes
    main = labels["real"]
    return (_curve("Machine create time against guest RAM size", "guest RAM", "MiB",
                   "Machine() create time (wall)", "ms", ms, main, log_x=True, notes=common),
            _curve("resident host memory of one Machine against guest RAM size", "guest RAM",
                   "MiB", "resident set growth after running to the first exit", "KiB", kib,
                   main, log_x=True, log_y=True, notes=common + [
                       "kernel memory (KVM's per-slot arrays, which grow with RAM size) is not "
                       "in the resident set"],
                   anchor=_anchor("firecracker_vmm_overhead",
                                  comparable="Firecracker's VMM overhead excludes guest memory; "
                                  "here the guest touches a page or two")))


def _kut_dir():
    """(kvm-unit-tests tree, tests/kut/compare.py) or (None, why not)."""
    kut = os.environ.get("PYKVM_KUT_DIR")
    if not kut:
        return None, "no kvm-unit-tests build (PYKVM_KUT_DIR is not set; see " \
                     "docs/kvm-unit-tests.md)"
    if not os.path.isfile(os.path.join(kut, "x86", "unittests.cfg")):
        return None, f"no kvm-unit-tests build: {kut}/x86/unittests.cfg not found"
    compare = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "tests", "kut", "compare.py")
    if not os.path.isfile(compare):
        return None, "tests/kut/compare.py (in a source checkout of pykvm) is needed"
    if not shutil.which("qemu-system-x86_64"):
        return None, "qemu-system-x86_64 is not installed"
    return (kut, compare), None


def kut_vs_qemu(tests, notes: list) -> dict:
    """Curve: wall seconds of kvm-unit-tests tests under ``pykvm run`` against QEMU ``-accel
    kvm`` (tests/kut/compare.py, one run each), one point per test both pass: [QEMU s, pykvm s].
    Without a kvm-unit-tests build (PYKVM_KUT_DIR) the curve has no points and says why."""
    import json
    title = "kvm-unit-tests wall time: pykvm against QEMU"
    found, why = _kut_dir()
    series: dict = {"tests both pass": []}
    kw = dict(log_x=False, anchor=None)
    if found is None:
        notes.append(f"kvm-unit-tests against QEMU: not measured: {why}")
        return _curve(title, "QEMU -accel kvm wall time", "s", "pykvm run wall time", "s",
                      series, "tests both pass", not_measured=why, **kw)
    kut, compare = found
    with tempfile.TemporaryDirectory(prefix="pykvm-curves-kut-") as tmp:
        out = os.path.join(tmp, "kut.json")
        cmd = [sys.executable, compare, kut, "--json", out, "--pykvm",
               " ".join(_pykvm_command())]
        for t in tests:
            cmd += ["-k", t]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        try:
            with open(out) as f:
                res = json.load(f)
        except (OSError, ValueError):
            why = f"tests/kut/compare.py failed (exit {p.returncode}): {p.stderr[-300:]}"
            notes.append(f"kvm-unit-tests against QEMU: not measured: {why}")
            return _curve(title, "QEMU -accel kvm wall time", "s", "pykvm run wall time", "s",
                          series, "tests both pass", not_measured=why, **kw)
    names = []
    for name, q in res.get("qemu", {}).items():
        pk = res.get("pykvm", {}).get(name)
        if q["verdict"] == "PASS" and pk and pk["verdict"] == "PASS":
            series["tests both pass"].append([round(q["seconds"], 3), round(pk["seconds"], 3)])
            names.append(name)
    _progress(f"kvm-unit-tests: {len(names)} tests pass under both")
    nm = None if names else "no selected kvm-unit-tests test passed under both QEMU and pykvm"
    return _curve(title, "QEMU -accel kvm wall time", "s", "pykvm run wall time", "s", series,
                  "tests both pass", not_measured=nm, tests=names, **kw,
                  notes=["whole processes, one run each (tests/kut/compare.py); points below "
                         "the diagonal are tests pykvm finishes sooner"])


def curves(quick: bool = False) -> dict:
    """``pykvm bench --curves``: every cost curve of this host (see ``CURVE_NAMES``), with the
    Firecracker anchors beside the matching ones, the host (load average included) and the
    settings; progress lines go to stderr. Returns the JSON-ready result."""
    from .kvm import Kvm
    s = dict(CURVES_QUICK if quick else CURVES_FULL)
    notes: list = []
    t0 = time.monotonic()
    out: dict = {"kind": "curves", "host": host_info(), "quick": quick,
                 "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
                 "anchors": ANCHORS, "curves": {}}
    c = out["curves"]
    with tempfile.TemporaryDirectory(prefix="pykvm-curves-") as tmp, Kvm() as kvm:
        image = os.path.join(tmp, "tiny-elf64.elf")
        with open(image, "wb") as f:
            f.write(tiny_elf64())
        _progress("exits/s against vCPUs")
        c["exits_vs_vcpus"] = exits_vs_vcpus(kvm, s["scale_exits"], s["scale_reps"])
        _progress("create→run→destroy rate against VMs alive")
        c["lifecycle_vs_alive"] = lifecycle_vs_alive(kvm, s["life"], s["life_rounds"], notes)
        _progress("resident memory per VM against VMs alive")
        c["memory_per_vm_vs_vms"] = memory_vs_vms(image, s["mem_rounds"])
        _progress("create time and resident memory against guest RAM size")
        c["create_ms_vs_ram"], c["resident_vs_ram"] = ram_curves(image, s["ram_reps"], notes)
        _progress("kvm-unit-tests against QEMU")
        c["kut_vs_qemu"] = kut_vs_qemu(s["kut_tests"], notes)
    out["host"]["loadavg_after"] = host_info()["loadavg"]
    out["notes"] = notes
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _fmt_num(v) -> str:
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{int(v)}"


def curves_report(res: dict) -> str:
    """The human-readable text of a :func:`curves` result: each curve's points per series, its
    anchor and notes."""
    h = res["host"]
    lines = [f"pykvm bench --curves{' --quick' if res['quick'] else ''} on {h['cpu']} "
             f"({h['cpus']} CPUs), Linux {h['kernel']}, {h['kvm_module']}, load {h['loadavg']}"]
    for name, cv in res["curves"].items():
        lines += ["", f"{cv['title']} ({name}): {cv['y_unit']} by {cv['x']} ({cv['x_unit']})"]
        if cv["not_measured"]:
            lines.append(f"  not measured: {cv['not_measured']}")
        for label, pts in cv["series"].items():
            if pts:
                lines.append(f"  {label:<30} " + "  ".join(
                    f"{_fmt_num(x)}: {_fmt_num(y)}" for x, y in pts))
        if cv.get("tests"):
            lines.append("  tests: " + ", ".join(cv["tests"]))
        a = cv["anchor"]
        if a:
            lines.append(f"  anchor: {a['label']} ({a['source']})")
    lines += [""] + [f"note: {n}" for n in res["notes"]]
    lines.append(f"({res['seconds']} s)")
    return "\n".join(lines)


def plot_curves(res: dict, path: str) -> None:
    """Draw every curve of a :func:`curves` result in its own panel (anchors dashed, the host in
    the title) to ``path`` (PNG, matplotlib's Agg backend)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("pykvm bench --plot needs matplotlib (pip install 'pykvm-vmm[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in CURVE_NAMES if n in res["curves"]]
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows + 0.8), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        cv = res["curves"][name]
        ax.set_title(cv["title"], fontsize=9)
        ax.set_xlabel(f"{cv['x']} ({cv['x_unit']})", fontsize=8)
        ax.set_ylabel(f"{cv['y']} ({cv['y_unit']})", fontsize=8)
        ax.tick_params(labelsize=7)
        if cv["not_measured"] and not any(cv["series"].values()):
            ax.text(0.5, 0.5, "not measured:\n" + textwrap.fill(cv["not_measured"], 40),
                    ha="center", va="center", fontsize=8, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for label, pts in cv["series"].items():
            if not pts:
                continue
            xs = [max(x, 0.5) if cv["log_x"] else x for x, _ in pts]
            ax.plot(xs, [y for _, y in pts], marker="o", markersize=3, label=label,
                    linestyle="none" if name == "kut_vs_qemu" else "-")
            if cv["log_y"]:                     # small values far below the anchor: label them
                for x, (_, y) in zip(xs, pts):
                    ax.annotate(_fmt_num(y), (x, max(y, 1)), fontsize=6,
                                textcoords="offset points", xytext=(3, 3))
        if name == "kut_vs_qemu":
            for test, (x, y) in zip(cv.get("tests", []), cv["points"]):
                ax.annotate(test, (x, y), fontsize=6, textcoords="offset points",
                            xytext=(3, 3))
            top = max(max(x, y) for pts in cv["series"].values() for x, y in pts)
            ax.plot([0, top], [0, top], color="#888888", linestyle=":", linewidth=1,
                    label="same time")
        if cv.get("host_cpus"):
            ax.axvline(cv["host_cpus"], color="#888888", linestyle=":", linewidth=1,
                       label=f"host CPUs ({cv['host_cpus']})")
        if cv["anchor"]:
            ax.axhline(cv["anchor"]["value"], color="#c44e52", linestyle="--", linewidth=1.2,
                       label=cv["anchor"]["label"])
        if cv["log_x"]:
            ax.set_xscale("log")
            if name == "lifecycle_vs_alive":
                ax.set_xticks([max(x, 0.5) for x, _ in cv["points"]])
                ax.set_xticklabels([str(int(x)) for x, _ in cv["points"]])
        if name == "exits_vs_vcpus":
            ax.set_xticks([x for x, _ in cv["points"]])
        if cv["log_y"]:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6.5)
    h = res["host"]
    fig.suptitle(f"pykvm cost curves{' (--quick)' if res['quick'] else ''} on {h['cpu']}, "
                 f"{h['cpus']} CPUs, Linux {h['kernel']}, KVM backend {h['kvm_module']}, load "
                 f"{h['loadavg'][0] if h['loadavg'] else '?'}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
