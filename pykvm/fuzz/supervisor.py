"""Random-guest fuzzing: ``python -m pykvm.fuzz``.

Each *case* is a small guest built from a seed and an index: random bytes or a random but valid
x86 instruction stream (moves, ALU, port and string I/O, MMIO stores, HLT, CLI/STI, UD2, INT3,
RDMSR/WRMSR, CPUID, moves to control registers, LGDT/LIDT, far jumps, mode switches ...), random
general registers, flags and entry points, one to four vCPUs, in real, protected or long mode.
Every case runs in a fresh VM under a deadline and ends in an *outcome*: the typed exit that
ended it (``IO``, ``MMIO``, ``HLT``, ``SHUTDOWN``, ``INTERNAL_ERROR``, ``FAIL_ENTRY`` ...),
``debug_exit``, ``deadline``, or the class name of a :class:`~pykvm.errors.PykvmError` pykvm
raised (``KvmInvalid``, ``GuestError`` ...).

Everything else is a *finding*, saved as a reproducer that ``--replay`` runs again:

* ``crash``     the worker process died (a signal, or an exit status) while running the case;
* ``hang``      the case ran past its deadline + 2 s;
* ``exception`` pykvm raised something that is not a ``PykvmError`` (the traceback is kept);
* ``leak``      the worker's fd count or RSS grew past a bound over the baseline taken after a
                warm-up (the reproducer names the range of cases to run again);
* ``vmm_error`` (device mode) the guest ended the machine with pykvm's VMM-error status (8): a
                device or exit handler raised, or KVM refused what a device asked of it;
* ``cpu``       (device mode) the VMM's host CPU time exceeded the bound per guest access
                (:data:`pykvm.fuzz_devices.CPU_PER_ACCESS_S`).

``--devices`` switches to the device mode (:mod:`pykvm.fuzz_devices`): each case is a PC machine
with the optional devices, whose one to four vCPUs drive every device with random accesses and
programming sequences.

Cases run in worker processes (``python -m pykvm.fuzz`` started with a hidden worker option);
the supervisor hands them index ranges over a pipe, reads one JSON line per case back, kills and
restarts a worker that hangs or dies, and samples ``/proc/PID/fd`` and ``/proc/PID/status``.
See docs/fuzzing.md.
"""
import argparse
import collections
import errno
import faulthandler
import json
import math
import os
import random
import re
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Dict, List, Optional

from . import _cliutil, fuzz_devices
from .outfile import ReportPathError, check_report_path, write_report

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 8            # as pykvm.status.VMM_ERROR: /dev/kvm or the host unusable
EXIT_INTERRUPTED = 130

MODES = ("real", "protected", "long")
CASE_FORMAT = "pykvm-fuzz-case/1"
FINDING_FORMAT = "pykvm-fuzz-finding/1"
FINDING_KINDS = ("crash", "hang", "exception", "leak", "vmm_error", "cpu")

DEFAULT_DEADLINE = 0.05
DEFAULT_OUT = os.path.join("build", "fuzz-findings")
HANG_GRACE = 2.0              # a case running past deadline + this is a hang
WORKER_START_TIMEOUT = 60.0
BATCH = 25                    # cases per message to a worker
WARMUP = 100                  # cases a worker runs before its fd/RSS baseline is taken
FD_SLACK = 16                 # fds over the baseline that count as a leak
RSS_SLACK_MB = 96             # MiB of RSS over the baseline that count as a leak
THREAD_SLACK = 8              # threads over the baseline (a case uses up to max_vcpus + timers)
CHECK_INTERVAL = 1.0          # seconds between fd/RSS samples of a worker
PROGRESS_INTERVAL = 5.0
MAX_FILES_PER_SIGNATURE = 20  # reproducers saved per distinct finding (the rest are counted)

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# The guest-physical layout of a random-guest case and the instruction-stream generator live in
# pykvm.fuzz_stream (the device fuzzer, pykvm.fuzz_devices, uses them too).
from .fuzz_stream import (  # noqa: E402,F401  (re-exported: pykvm.fuzz.RAM_SIZE ...)
    CPUID_LEAVES, CR0_BITS, CR4_BITS, D_GDT32, D_GDT64, D_IDT32, D_IDT64, D_IVT, D_JUNK,
    D_LGDT32, DESC_ADDR, HIGH_IMAGE, IDT32_ADDR, IDT64_ADDR, LONG_GDT_ADDR, MMIO_ADDRS, MSRS,
    PML4, PORTS, RAM_SIZE, REAL_IMAGE, ROM_ADDR, ROM_SIZE, SELECTORS, _le, _Stream,
    blobs_from_json, blobs_to_json)

# Exits after which the vCPU is run again (until the case's stop budget is used up).
RESUMABLE = frozenset({"IO", "MMIO", "HLT", "INTR", "IRQ_WINDOW_OPEN", "DEBUG", "X86_RDMSR",
                       "X86_WRMSR", "HYPERCALL", "NMI", "EXCEPTION", "debug_exit"})


# ================================================================================================
# Case generation
# ================================================================================================

def _descriptors(rng: random.Random) -> bytes:
    """The pseudo-descriptor block at DESC_ADDR (see the D_* offsets)."""
    from .arch.x86 import layout as L
    d = bytearray(0x80)
    struct.pack_into("<HI", d, 0x00, L.GDT_LIMIT, L.GDT_ADDR)
    struct.pack_into("<HQ", d, 0x10, L.GDT_LIMIT, LONG_GDT_ADDR)
    struct.pack_into("<HI", d, 0x20, L.GDT_LIMIT, LONG_GDT_ADDR)
    struct.pack_into("<HI", d, 0x30, 256 * 8 - 1, IDT32_ADDR)
    struct.pack_into("<HQ", d, 0x40, 256 * 16 - 1, IDT64_ADDR)
    struct.pack_into("<HI", d, 0x50, 0x3FF, 0)
    d[0x60:0x70] = rng.randbytes(16)
    return bytes(d)


def _gates(rng: random.Random, targets: List[int], wide: bool) -> bytes:
    """256 interrupt/trap gates (CS 0x08) whose handlers are ``targets`` (a few are junk)."""
    out = bytearray()
    for _ in range(256):
        if rng.random() < 0.05:
            out += rng.randbytes(16 if wide else 8)
            continue
        off = rng.choice(targets)
        typ = rng.choice((0x8E, 0x8E, 0x8F))
        lo = (off & 0xFFFF) | 0x08 << 16 | typ << 40 | ((off >> 16) & 0xFFFF) << 48
        out += struct.pack("<Q", lo)
        if wide:
            out += struct.pack("<Q", off >> 32)
    return bytes(out)


def _reg_value(rng: random.Random, wide: bool) -> int:
    k = rng.random()
    if k < 0.2:
        return 0
    if k < 0.4:
        return rng.randrange(0x10000)
    if k < 0.6:
        return rng.randrange(RAM_SIZE)
    if k < 0.75:
        return rng.choice(PORTS + MSRS + MMIO_ADDRS)
    if k < 0.9 or not wide:
        return rng.getrandbits(32)
    return rng.getrandbits(64)


def _rflags(rng: random.Random, mode: str) -> int:
    k = rng.random()
    if k < 0.01:
        return rng.getrandbits(64)                  # reserved bits and all
    f = 0x2
    for bit in (0, 2, 4, 6, 7, 10, 11):             # CF PF AF ZF SF DF OF
        if rng.random() < 0.3:
            f |= 1 << bit
    if rng.random() < 0.2:
        f |= 1 << 9                                 # IF
    if rng.random() < 0.03:
        f |= 1 << 8                                 # TF
    if rng.random() < 0.1:
        f |= rng.randrange(4) << 12                 # IOPL
    for bit in (14, 16, 18, 21):                    # NT RF AC ID
        if rng.random() < 0.05:
            f |= 1 << bit
    if mode != "long" and rng.random() < 0.02:
        f |= 1 << 17                                # VM: virtual-8086 mode
    return f


_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEG_BITS = {"type": 4, "present": 1, "dpl": 2, "db": 1, "s": 1, "l": 1, "g": 1, "avl": 1,
             "unusable": 1, "selector": 16, "limit": 32, "base": 64}


def _sregs_noise(rng: random.Random) -> dict:
    """A few special-register fields set to odd values (KVM may refuse them: KvmInvalid)."""
    out = {}
    for _ in range(rng.randint(1, 3)):
        k = rng.random()
        if k < 0.4:
            name = rng.choice(("cr0", "cr4", "efer", "cr3", "cr8", "apic_base", "cr2"))
            bits = {"cr0": CR0_BITS, "cr4": CR4_BITS}.get(name)
            if bits and rng.random() < 0.7:
                value = sum(b for b in bits if rng.random() < 0.3)
            elif name == "efer":
                value = rng.choice((0x100, 0x400, 0x500, 0xD01, 0x800, rng.getrandbits(16)))
            else:
                value = rng.getrandbits(rng.choice((8, 32, 64)))
        else:
            field = rng.choice(tuple(_SEG_BITS))
            name = f"{rng.choice(_SEGMENTS)}.{field}"
            w = _SEG_BITS[field]
            value = rng.getrandbits(w) if rng.random() < 0.7 else rng.getrandbits(min(w, 8)) & \
                ((1 << w) - 1)
        out[name] = value
    return out


def generate_case(seed: int, index: int, *, modes=MODES, max_vcpus: int = 4,
                  deadline: float = DEFAULT_DEADLINE) -> dict:
    """The case ``index`` of run ``seed``: a pure function of its arguments (the supervisor
    regenerates a finding's case from them to write the reproducer)."""
    from .arch.x86 import modes as cpu_modes, layout as L
    assert L.PML4_ADDR == PML4 and DESC_ADDR + 0x80 <= L.GDT_ADDR   # our tables fit the layout
    rng = random.Random(f"pykvm-fuzz:{seed}:{index}")
    mode = rng.choice(list(modes))
    nvcpus = 1 if max_vcpus == 1 or rng.random() < 0.5 else rng.randint(2, max_vcpus)
    base = REAL_IMAGE if mode == "real" else HIGH_IMAGE
    bits = {"real": 16, "protected": 32, "long": 64}[mode]
    page_tables = mode != "long" and rng.random() < 0.3

    style = rng.choices(("valid", "raw", "tiny"), (70, 20, 10))[0]
    size = int(math.exp(rng.uniform(math.log(16), math.log(2048))))
    bounds = [0]
    if style == "raw":
        image = rng.randbytes(size)
    elif style == "tiny":
        image = rng.choice((b"", b"\xF4", b"\xEB\xFE", b"\x0F\x0B", b"\xCC", b"\xB0\x01\xE6\xF4",
                            b"\xFA\xF4", b"\xFB\xF4", b"\xE4\x60", b"\x0F\x01\xC1",
                            b"\xF3\x6C", b"\x0F\x30", b"\x0F\x32", b"\x0F\xA2\xF4",
                            rng.randbytes(rng.randrange(1, 8))))
    else:
        s = _Stream(rng, bits, base, page_tables=page_tables)
        while len(s.code) < size:
            s.one()
        if rng.random() < 0.8:
            s.terminate()
        image, bounds = bytes(s.code), s.bounds or [0]
    if not image:
        bounds = [0]

    blobs = [(base, image), (DESC_ADDR, _descriptors(rng))]
    handlers = [base + b for b in bounds]
    blobs.append((IDT32_ADDR, _gates(rng, handlers, wide=False)))
    blobs.append((LONG_GDT_ADDR, cpu_modes.gdt_bytes("long")))
    blobs.append((IDT64_ADDR, _gates(rng, handlers, wide=True)))
    if mode == "real":
        blobs.append((L.GDT_ADDR, cpu_modes.gdt_bytes("protected")))     # for real -> protected
        if rng.random() < 0.5:                                     # an IVT into the image
            ivt = b"".join(struct.pack("<HH", (base + rng.choice(bounds)) & 0xFFFF, 0)
                           for _ in range(256))
            blobs.append((0, ivt))
    if rng.random() < 0.1:                                         # junk somewhere in RAM
        blobs.append((rng.randrange(0x100000, RAM_SIZE - 0x1000), rng.randbytes(rng.randrange(1, 512))))

    slots = [{"gpa": 0, "size": RAM_SIZE, "readonly": False}]
    if rng.random() < 0.2:
        slots.append({"gpa": ROM_ADDR, "size": ROM_SIZE, "readonly": True})
        blobs.append((ROM_ADDR, rng.randbytes(ROM_SIZE)))

    vcpus = []
    for i in range(nvcpus):
        k = rng.random()
        if k < 0.8:
            entry = base + rng.choice(bounds)
        elif k < 0.9:
            entry = base + rng.randrange(max(len(image), 1))
        elif k < 0.96:
            entry = rng.randrange(RAM_SIZE)
        else:
            entry = rng.choice(MMIO_ADDRS) if mode != "real" else rng.randrange(0x100000)
        v = {"regs": {name: _reg_value(rng, mode == "long") for name in _GPRS}}
        if mode == "real":
            if rng.random() < 0.05:
                cs, ip = rng.getrandbits(16), rng.getrandbits(16)
            else:
                cs, ip = cpu_modes.real_mode_entry(entry % 0x100000)
            v["cs"] = cs
            v["regs"]["rip"] = ip
            v["regs"]["rsp"] = L.REAL_MODE_STACK_TOP if rng.random() < 0.8 else rng.getrandbits(16)
        else:
            v["regs"]["rip"] = entry
            v["regs"]["rsp"] = L.stack_top(i) if rng.random() < 0.8 else _reg_value(rng, mode == "long")
        v["regs"]["rflags"] = _rflags(rng, mode)
        if rng.random() < 0.05:
            v["sregs"] = _sregs_noise(rng)
        if mode == "protected" and rng.random() < 0.4:
            v["idt"] = [IDT32_ADDR, 256 * 8 - 1]
        elif mode == "long" and rng.random() < 0.4:
            v["idt"] = [IDT64_ADDR, 256 * 16 - 1]
        vcpus.append(v)

    irqchip = rng.random() < 0.1
    return {
        "format": CASE_FORMAT, "seed": seed, "index": index, "mode": mode, "style": style,
        "deadline": deadline, "max_stops": rng.choice((1, 1, 2, 3, 4, 8)),
        "irqchip": irqchip, "pit": irqchip and rng.random() < 0.5,
        "cpuid": rng.random() < 0.95, "native": rng.random() < 0.9,
        "page_tables": page_tables, "slots": slots, "blobs": blobs, "vcpus": vcpus,
        "io_seed": rng.getrandbits(32),
    }


def _generate(gen: dict, index: int) -> dict:
    """Case ``index`` of the run that ``gen`` (Supervisor.gen) describes, either mode."""
    make = fuzz_devices.generate_case if gen.get("devices") else generate_case
    return make(gen["seed"], index, modes=gen["modes"], max_vcpus=gen["max_vcpus"],
                deadline=gen["deadline"])


def _case_to_json(case: dict) -> dict:
    if case.get("format") == fuzz_devices.CASE_FORMAT:
        return fuzz_devices.case_to_json(case)
    return case_to_json(case)


def _case_from_json(d: dict) -> dict:
    if d.get("format") == fuzz_devices.CASE_FORMAT:
        return fuzz_devices.case_from_json(d)
    return case_from_json(d)


def case_to_json(case: dict) -> dict:
    """``case`` with its blobs in JSON form (a reproducer's "case")."""
    return dict(case, blobs=blobs_to_json(case["blobs"]))


def case_from_json(d: dict) -> dict:
    if d.get("format") != CASE_FORMAT:
        raise ValueError(f"not a pykvm fuzz case (format {d.get('format')!r})")
    return dict(d, blobs=blobs_from_json(d["blobs"]))


# ================================================================================================
# Running a case (inside a worker)
# ================================================================================================

class _Injected(Exception):
    """What the hidden --_inject raise@K option raises: not a PykvmError, so a finding."""


def _parse_inject(specs) -> Dict[int, List[str]]:
    out: Dict[int, List[str]] = {}
    for spec in specs or ():
        kind, _, at = spec.partition("@")
        out.setdefault(int(at), []).append(kind)
    return out


def _error_detail(e) -> str:
    """What a typed error was about, for the summary: the ioctl and errno of a KvmError."""
    if getattr(e, "ioctl", None):
        return f"{e.ioctl} {getattr(e, 'errno_name', '')}".strip()
    return str(e).split(":")[0][:60]


class CaseRunner:
    """Runs cases in fresh VMs on one open :class:`~pykvm.Kvm`."""

    def __init__(self, kvm, inject=()):
        self.kvm = kvm
        self.cpuid = kvm.supported_cpuid()
        self.inject = _parse_inject(inject)
        self._leaked: list = []
        self._leaking = None            # "fd"/"mem": the injected leak, once it has started
        self.background_errors: List[str] = []

    def _cpuid_for(self, index: int):
        out = []
        for e in self.cpuid:
            e = tuple(e)
            if e[0] == 1:
                e = e[:4] + ((e[4] & 0x00FFFFFF) | (index << 24),) + e[5:]
            elif e[0] in (0xB, 0x1F):
                e = e[:6] + (index,)
            out.append(e)
        return out

    def _injections(self, index: int) -> None:
        kinds = self.inject.get(index, ())
        for k in kinds:
            if k in ("leakfd", "leakmem"):
                self._leaking = k
        if self._leaking == "leakfd":
            self._leaked.append(os.open("/dev/null", os.O_RDONLY))
        elif self._leaking == "leakmem":
            self._leaked.append(bytearray(b"\1" * (1 << 20)))
        if "crash" in kinds:
            os.kill(os.getpid(), signal.SIGSEGV)
        if "hang" in kinds:
            while True:
                time.sleep(3600)
        if "raise" in kinds:
            raise _Injected(f"injected exception at case {index}")

    def run(self, case: dict) -> dict:
        """Run ``case``; returns {"outcome", "stops", "seconds"} and, for a finding,
        "finding" = {"kind": "exception", "detail": traceback}."""
        from .errors import PykvmError
        t0 = time.perf_counter()
        res = {"outcome": None, "stops": []}
        try:
            self._injections(case["index"])
            if case.get("format") == fuzz_devices.CASE_FORMAT:
                res.update(fuzz_devices.run_case(self.kvm, case,
                                                 inject=self.inject.get(case["index"], ())))
            else:
                with self.kvm.create_vm() as vm:
                    self._run_in_vm(vm, case, res)
        except PykvmError as e:
            res["outcome"] = type(e).__name__
            res["detail"] = _error_detail(e)
            res["error"] = str(e)[:300]
        except Exception as e:                                  # noqa: BLE001 — a finding
            res["outcome"] = f"exception:{type(e).__name__}"
            res["finding"] = {"kind": "exception", "detail": traceback.format_exc()}
        if self.background_errors and not res.get("finding"):
            # An exception in another thread (a timer, a finalizer) is a finding too; it may
            # belong to the case before this one if it fired after that case ended.
            res["outcome"] = "exception:background"
            res["finding"] = {"kind": "exception",
                              "detail": "raised outside the vCPU threads during or just before "
                                        "this case:\n" + "\n".join(self.background_errors)}
        self.background_errors.clear()
        res["seconds"] = time.perf_counter() - t0
        return res

    def install_hooks(self) -> None:
        """Collect exceptions raised in other threads and in finalizers (which Python would
        only print) so that they become findings."""
        def thread_hook(a):
            self.background_errors.append(
                f"in thread {a.thread.name if a.thread else '?'}:\n" +
                "".join(traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback)))

        def unraisable_hook(u):
            self.background_errors.append(
                f"unraisable ({u.err_msg or 'exception ignored'} in {u.object!r}):\n" +
                "".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
        threading.excepthook = thread_hook
        sys.unraisablehook = unraisable_hook

    def _run_in_vm(self, vm, case: dict, res: dict) -> None:
        from .arch.x86 import modes as cpu_modes
        from .runloop import make_loop
        vm.set_tss_addr(0xFFFBD000)
        vm.set_identity_map_addr(0xFFFBC000)
        if case["irqchip"]:
            vm.create_irqchip()
            if case["pit"]:
                vm.create_pit2()
        for s in case["slots"]:
            vm.add_memory(s["gpa"], s["size"], readonly=s["readonly"])
        mem = vm.memory
        mode = case["mode"]
        vcpus = []
        for i, spec in enumerate(case["vcpus"]):
            v = vm.create_vcpu(i)
            vcpus.append(v)
            if case["cpuid"]:
                v.set_cpuid(self._cpuid_for(i))
            regs = spec["regs"]
            if mode == "long":
                cpu_modes.setup_long_mode(v, mem, regs["rip"], regs["rsp"], vcpu_index=i,
                                     write_tables=(i == 0))
            elif mode == "protected":
                cpu_modes.setup_protected_mode(v, mem, regs["rip"], esp=regs["rsp"], vcpu_index=i)
            else:
                cpu_modes.setup_real_mode(v, spec["cs"], regs["rip"], sp=regs["rsp"] & 0xFFFF)
            if spec.get("idt") or spec.get("sregs"):
                s = v.get_sregs()
                if spec.get("idt"):
                    s.idt.base, s.idt.limit = spec["idt"]
                for field, value in spec.get("sregs", {}).items():
                    obj = s
                    *path, last = field.split(".")
                    for part in path:
                        obj = getattr(obj, part)
                    setattr(obj, last, value)
                v.set_sregs(s)
            r = v.get_regs()
            for name, value in regs.items():
                setattr(r, name, value)
            v.set_regs(r)
        if case["page_tables"]:
            cpu_modes.write_identity_map(mem)
        for gpa, data in case["blobs"]:
            mem.write(gpa, data)
        loops = [make_loop(v, native=case["native"]) for v in vcpus]

        state = {"winner": None, "results": [None] * len(vcpus)}
        lock = threading.Lock()
        deadline = time.monotonic() + case["deadline"]

        def drive(i):
            out = self._drive(loops[i], i, case, deadline, state)
            state["results"][i] = out
            with lock:
                if state["winner"] is None and out["outcome"] != "kick":
                    state["winner"] = i
                    for j, other in enumerate(loops):
                        if j != i:
                            other.kick()

        if len(vcpus) == 1:
            drive(0)
        else:
            threads = [threading.Thread(target=drive, args=(i,), name=f"fuzz-vcpu{i}", daemon=True)
                       for i in range(len(vcpus))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        results = state["results"]
        w = state["winner"] if state["winner"] is not None else 0
        res["outcome"] = results[w]["outcome"]
        res["stops"] = [s for r in results for s in r["stops"]]
        for r in results:                          # a finding on any vCPU is the case's finding
            if r.get("finding"):
                res["outcome"] = r["outcome"]
                res["finding"] = r["finding"]
                break
        if not res.get("finding"):
            for k in ("detail", "error"):
                if results[w].get(k):
                    res[k] = results[w][k]
        for v in vcpus:                            # the state must stay readable after anything
            v.get_regs()
            v.get_sregs()

    def _drive(self, loop, i: int, case: dict, deadline: float, state: dict) -> dict:
        """Run vCPU ``i`` for up to ``max_stops`` stops, answering reads with random data."""
        from .errors import PykvmError
        rng = random.Random(f"{case['io_seed']}:{i}")
        stops: List[str] = []
        out = {"stops": stops, "outcome": None}
        detail = None
        try:
            for _ in range(case["max_stops"]):
                if state["winner"] is not None:
                    name = "kick"
                    break
                s = loop.run(deadline=deadline)
                name = s.exit.name if s.kind == "exit" else s.kind
                stops.append(name)
                detail = None
                if s.kind == "exit":
                    ex = s.exit
                    ex.fields()
                    repr(ex)
                    if name == "INTERNAL_ERROR":
                        detail = ex.suberror_name
                    elif name == "FAIL_ENTRY":
                        detail = f"reason {ex.hardware_entry_failure_reason:#x}"
                    if name == "IO" and not ex.is_out:
                        ex.respond(rng.randbytes(ex.size * ex.count))
                    elif name == "MMIO" and not ex.is_write:
                        ex.respond(rng.randbytes(ex.len))
                if name not in RESUMABLE:
                    break
            out["outcome"] = name
            if detail:
                out["detail"] = detail
        except PykvmError as e:
            out["outcome"] = type(e).__name__
            out["detail"] = _error_detail(e)
            out["error"] = str(e)[:300]
        except Exception as e:                                  # noqa: BLE001 — a finding
            out["outcome"] = f"exception:{type(e).__name__}"
            out["finding"] = {"kind": "exception", "detail": traceback.format_exc()}
        return out


# ================================================================================================
# The worker process
# ================================================================================================

def _worker_main(inject) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    proto = os.fdopen(os.dup(1), "w", buffering=1)         # our replies; stray output -> stderr
    os.dup2(2, 1)

    def send(obj):
        proto.write(json.dumps(obj, separators=(",", ":")) + "\n")

    from .errors import PykvmError
    from .kvm import Kvm
    try:
        kvm = Kvm()
        runner = CaseRunner(kvm, inject)
        runner.install_hooks()
    except PykvmError as e:
        send({"ev": "fatal", "error": str(e)})
        return EXIT_ENVIRONMENT
    send({"ev": "ready", "pid": os.getpid()})
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg["op"]
        if op == "run":
            g = msg["gen"]
            for index in range(msg["start"], msg["stop"]):
                case = _generate(g, index)
                r = runner.run(case)
                r.update(ev="result", index=index, mode=case["mode"])
                send(r)
        elif op == "case":
            case = _case_from_json(msg["case"])
            r = runner.run(case)
            r.update(ev="result", index=case["index"], mode=case["mode"])
            send(r)
        elif op == "exit":
            break
    return EXIT_OK


# ================================================================================================
# The supervisor
# ================================================================================================

def _proc_fds(pid: int) -> Optional[int]:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _proc_status(pid: int, field: str) -> Optional[int]:
    """An integer field of /proc/PID/status ("VmRSS" in KiB, "Threads")."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _signature(f: dict) -> str:
    """Findings with the same signature are the same bug: the kind and the last line of the
    detail (the exception, or how the worker died)."""
    if f["kind"] == "exception":
        lines = f["detail"].strip().splitlines()
        return f"exception: {lines[-1][:160] if lines else '?'}"
    if f["kind"] == "crash":
        return f"crash: {f.get('signal') or ('exit status %s' % f.get('exit_status'))}"
    if f["kind"] == "leak":
        return f"leak: {f.get('resource')}"
    if f["kind"] == "vmm_error":
        return f"vmm_error: {_where(f['detail'])}"
    return f["kind"]


_FRAME = re.compile(r'File "([^"]*)", line \d+, in (\S+)')


def _where(detail: str) -> str:
    """"ExceptionType at module.py:function" for a VMM-error detail: the exception and the
    innermost frame in a device model or run loop (else in pykvm), or the verdict line without
    its numbers when there is no traceback."""
    lines = detail.strip().splitlines()
    frames = [(m.group(1), m.group(2)) for m in _FRAME.finditer(detail) if "/pykvm/" in m.group(1)]
    if not frames:
        return re.sub(r"0x[0-9a-fA-F]+|\d+", "N", lines[0] if lines else "?")[:160]
    pick = [f for f in frames if "/arch/" in f[0] or "runloop" in f[0]] or frames
    path, func = pick[-1]
    exc = lines[-1].split(":")[0].strip() if lines else "?"
    return f"{exc} at {path.split('/pykvm/', 1)[1]}:{func}"


class _Worker:
    def __init__(self, sup, wid: int):
        self.id = wid
        self.err = tempfile.TemporaryFile(prefix="pykvm-fuzz-worker-")
        argv = [sys.executable, "-m", "pykvm.fuzz", "--_worker"]
        for spec in sup.inject:
            argv += ["--_inject", spec]
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=env, start_new_session=True)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buf = b""
        self.eof = False
        self.queue: collections.deque = collections.deque()     # indices sent, not reported
        self.ready = False
        self.since = time.monotonic()       # when the in-flight case (or the start) began
        self.done = 0                       # cases reported by this process
        self.baseline = None                # (fds, rss KiB, cases done) after the warm-up
        self.baseline_index = None
        self.last_check = 0.0
        self.last_index = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, obj) -> bool:
        try:
            self.proc.stdin.write((json.dumps(obj, separators=(",", ":")) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def read_lines(self) -> List[dict]:
        """Messages that have arrived (sets ``eof`` once the worker's end is closed)."""
        out = []
        try:
            while True:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    self.eof = True
                    break
                self.buf += chunk
        except BlockingIOError:
            pass
        except (OSError, ValueError):
            self.eof = True
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stderr_tail(self, n: int = 6000) -> str:
        try:
            self.err.flush()
            size = self.err.seek(0, os.SEEK_END)
            self.err.seek(max(0, size - n))
            return self.err.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.err.close()


class Supervisor:
    """Hands case ranges to ``jobs`` worker processes and watches them."""

    def __init__(self, *, runs: int, seed: int, jobs: int, deadline: float, modes, max_vcpus: int,
                 out_dir: str, quiet: bool = False, inject=(), start: int = 0,
                 warmup: int = WARMUP, fd_slack: int = FD_SLACK, rss_slack_mb: float = RSS_SLACK_MB,
                 check_interval: float = CHECK_INTERVAL, grace: float = HANG_GRACE,
                 progress_interval: float = PROGRESS_INTERVAL, devices: bool = False):
        self.runs, self.seed, self.jobs = runs, seed, jobs
        self.deadline, self.modes, self.max_vcpus = deadline, list(modes), max_vcpus
        self.out_dir, self.quiet, self.inject = out_dir, quiet, list(inject)
        self.start = start
        self.warmup, self.fd_slack, self.rss_slack_kib = warmup, fd_slack, int(rss_slack_mb * 1024)
        self.check_interval, self.grace = check_interval, grace
        self.progress_interval = progress_interval
        self.devices = devices
        self.gen = {"seed": seed, "modes": self.modes, "max_vcpus": max_vcpus, "deadline": deadline}
        if devices:
            self.gen["devices"] = True
        self.pending: collections.deque = collections.deque()    # indices not yet handed out
        self.outcomes: collections.Counter = collections.Counter()
        self.by_mode: Dict[str, collections.Counter] = {m: collections.Counter() for m in self.modes}
        self.stops: collections.Counter = collections.Counter()
        self.details: collections.Counter = collections.Counter()
        self.findings: List[dict] = []
        self.signatures: collections.Counter = collections.Counter()
        self.completed = 0
        self.slowest = (0.0, None)
        self.t0 = time.monotonic()
        self.interrupted = False
        self.workers: List[_Worker] = []
        self.sel = selectors.DefaultSelector()
        self.failed_starts = 0
        self.save_error: Optional[OSError] = None   # the first reproducer that could not be saved

    # -- bookkeeping ------------------------------------------------------------------------
    def _record(self, w: _Worker, msg: dict) -> None:
        index = msg["index"]
        if w.queue and w.queue[0] == index:
            w.queue.popleft()
        else:
            try:
                w.queue.remove(index)
            except ValueError:
                pass
        w.since = time.monotonic()
        w.done += 1
        w.last_index = index
        self.completed += 1
        outcome = msg["outcome"]
        self.stops.update(msg.get("stops", ()))
        if msg.get("seconds", 0) > self.slowest[0]:
            self.slowest = (msg["seconds"], index)
        if msg.get("finding"):
            f = msg["finding"]
            self._finding(f["kind"], index, detail=f.get("detail", ""), outcome=outcome)
            return
        self.outcomes[outcome] += 1
        if msg.get("detail"):
            self.details[f"{outcome} ({msg['detail']})"] += 1
        self.by_mode.setdefault(msg["mode"], collections.Counter())[outcome] += 1

    def _finding(self, kind: str, index: Optional[int], *, detail: str = "", outcome=None,
                 extra: Optional[dict] = None) -> dict:
        f = {"kind": kind, "index": index, "detail": detail}
        if outcome:
            f["outcome"] = outcome
        if extra:
            f.update(extra)
        sig = _signature(f)
        self.signatures[sig] += 1
        self.findings.append(f)
        if self.signatures[sig] > MAX_FILES_PER_SIGNATURE:
            f["file"] = None                 # the same finding again: counted, not saved
            return f
        try:
            f["file"] = self._save(f)
        except OSError as e:                 # the findings directory cannot take it (full ...)
            f["file"] = None
            if self.save_error is None:
                self.save_error = e
                _cliutil.err(f"{PROG}: {e}")
        if not self.quiet:
            where = f"case {index}" if index is not None else "worker"
            first = (detail.strip().splitlines() or [""])[-1][:200]
            print(f"pykvm.fuzz: finding: {kind} at {where}: {first} -> "
                  f"{f['file'] or '(reproducer not saved)'}",
                  file=sys.stderr, flush=True)
        return f

    def _save(self, f: dict) -> str:
        """Write the finding's reproducer into the findings directory (created if missing) as
        pykvm.outfile writes reports: atomically, never over a device, FIFO or symlink. Raises
        ReportPathError (one line) when it cannot be written."""
        doc = {"format": FINDING_FORMAT, "kind": f["kind"], "detail": f.get("detail", ""),
               "seed": self.seed, "index": f["index"], "inject": self.inject,
               "generator": self.gen, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if f["kind"] == "leak":                  # the bounds it was found with, for --replay
            doc["fd_slack"], doc["rss_slack_mb"] = self.fd_slack, self.rss_slack_kib / 1024
        for k in ("outcome", "signal", "exit_status", "stderr", "resource", "baseline", "value",
                  "start", "stop"):
            if k in f:
                doc[k] = f[k]
        if f["kind"] != "leak" and f["index"] is not None:
            case = _generate(self.gen, f["index"])
            doc["mode"], doc["vcpus"] = case["mode"], len(case["vcpus"])
            doc["case"] = _case_to_json(case)
            name = f"{f['kind']}-s{self.seed}-i{f['index']}.json"
        else:
            name = f"{f['kind']}-s{self.seed}-{f.get('start', 0)}-{f.get('stop', 0)}.json"
        path = os.path.join(self.out_dir, name)
        write_report(path, json.dumps(doc, indent=1) + "\n", "the reproducer")  # atomically
        return path

    # -- workers ----------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        w = _Worker(self, len(self.workers))
        self.workers.append(w)
        self.sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        return w

    def _retire(self, w: _Worker, requeue: bool = True) -> None:
        try:
            self.sel.unregister(w.proc.stdout)
        except (KeyError, ValueError):
            pass
        if requeue:
            self.pending.extendleft(reversed(w.queue))
        w.queue.clear()
        w.kill()
        self.workers.remove(w)

    def _feed(self, w: _Worker) -> None:
        """Keep two batches queued at each ready worker."""
        while w.ready and len(w.queue) < 2 * BATCH and self.pending:
            start = self.pending.popleft()
            stop = start + 1
            while (stop - start < BATCH and self.pending and self.pending[0] == stop):
                self.pending.popleft()
                stop += 1
            if not w.queue:
                w.since = time.monotonic()
            w.queue.extend(range(start, stop))
            if not w.send({"op": "run", "gen": self.gen, "start": start, "stop": stop}):
                break

    def _dead(self, w: _Worker) -> None:
        """A worker's pipe closed or its process ended: a crash if a case was in flight."""
        for msg in w.read_lines():
            self._handle(w, msg)
        try:
            w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        rc = w.proc.returncode
        how = _signal_name(-rc) if rc < 0 else f"exit status {rc}"
        tail = w.stderr_tail()
        if w.queue:
            index = w.queue.popleft()
            self.completed += 1
            extra = {"stderr": tail}
            if rc < 0:
                extra["signal"] = _signal_name(-rc)
            else:
                extra["exit_status"] = rc
            self._finding("crash", index, detail=f"worker {w.pid} died ({how}) running case "
                          f"{index}", extra=extra)
        elif not w.ready:
            self.failed_starts += 1
            if not self.quiet or self.failed_starts >= 3:
                print(f"pykvm.fuzz: worker {w.pid} failed to start ({how}): "
                      f"{tail.strip()[-500:]}", file=sys.stderr)
        else:
            self._finding("crash", w.last_index, detail=f"worker {w.pid} died ({how}) "
                          f"between cases", extra={"stderr": tail,
                                                   "exit_status": rc})
        self._retire(w)

    def _hang(self, w: _Worker) -> None:
        index = w.queue.popleft()
        self.completed += 1
        try:                                   # ask faulthandler for every thread's stack
            os.kill(w.pid, signal.SIGUSR1)
            time.sleep(0.3)
        except ProcessLookupError:
            pass
        tail = w.stderr_tail()
        self._finding("hang", index, detail=f"case {index} still running "
                      f"{self.deadline + self.grace:.2f} s after it started "
                      f"(deadline {self.deadline} s); worker {w.pid} killed",
                      extra={"stderr": tail})
        self._retire(w)

    def _check_resources(self, w: _Worker, now: float, final: bool = False) -> None:
        if not final and (w.done < self.warmup or now - w.last_check < self.check_interval):
            return
        if w.done < self.warmup:
            return
        w.last_check = now
        fds, rss = _proc_fds(w.pid), _proc_status(w.pid, "VmRSS")
        threads = _proc_status(w.pid, "Threads")
        if fds is None or rss is None or threads is None:
            return
        if w.baseline is None:
            w.baseline = (fds, rss, threads)
            w.baseline_index = w.last_index
            return
        leak = None
        if fds > w.baseline[0] + self.fd_slack:
            leak = ("fds", w.baseline[0], fds)
        elif rss > w.baseline[1] + self.rss_slack_kib:
            leak = ("rss_kib", w.baseline[1], rss)
        elif threads > w.baseline[2] + 2 * self.max_vcpus + THREAD_SLACK:
            leak = ("threads", w.baseline[2], threads)
        if leak:
            start = w.baseline_index + 1 if w.baseline_index is not None else 0
            stop = (w.last_index or start) + 1
            self._finding("leak", None, detail=f"worker {w.pid}: {leak[0]} grew from {leak[1]} "
                          f"to {leak[2]} over {w.done} cases (cases {start}..{stop - 1} ran in "
                          f"it after the baseline)",
                          extra={"resource": leak[0], "baseline": leak[1], "value": leak[2],
                                 "start": start, "stop": stop})
            self._retire(w)

    def _handle(self, w: _Worker, msg: dict) -> None:
        ev = msg.get("ev")
        if ev == "ready":
            w.ready = True
            w.since = time.monotonic()
            self._feed(w)
        elif ev == "result":
            self._record(w, msg)
        elif ev == "fatal":
            raise RuntimeError(msg.get("error", "worker could not start"))

    # -- the main loop ----------------------------------------------------------------------
    def _progress(self) -> None:
        if self.quiet:
            return
        el = time.monotonic() - self.t0
        rate = self.completed / el if el > 0 else 0.0
        left = self.runs - self.completed
        eta = f", ETA {int(left / rate) // 60}m{int(left / rate) % 60:02d}s" if rate and left else ""
        line = (f"pykvm.fuzz: {self.completed}/{self.runs} runs ({100 * self.completed / self.runs:.1f}%), "
                f"{rate:.0f} runs/s, {len(self.findings)} findings{eta}")
        print(line, file=sys.stderr, flush=True)

    def run(self) -> None:
        self.pending.extend(range(self.start, self.start + self.runs))
        self.t0 = time.monotonic()
        last_progress = self.t0
        try:
            for _ in range(min(self.jobs, self.runs)):
                self._spawn()
            while self.pending or any(w.queue for w in self.workers):
                if self.failed_starts >= 3:
                    raise RuntimeError("workers keep failing to start")
                while len(self.workers) < self.jobs and len(self.workers) < len(self.pending):
                    self._spawn()
                now = time.monotonic()
                wait = self.check_interval
                for w in self.workers:
                    limit = WORKER_START_TIMEOUT if not w.ready else self.deadline + self.grace
                    if w.queue or not w.ready:
                        wait = min(wait, max(0.0, w.since + limit - now))
                for key, _ in self.sel.select(timeout=max(0.01, wait)):
                    w = key.data
                    if w not in self.workers:
                        continue
                    for msg in w.read_lines():
                        self._handle(w, msg)
                    if w.eof:
                        self._dead(w)
                now = time.monotonic()
                for w in list(self.workers):
                    if w.proc.poll() is not None:
                        self._dead(w)
                        continue
                    if not w.ready:
                        if now - w.since > WORKER_START_TIMEOUT:
                            self.failed_starts += 1
                            self._retire(w)
                        continue
                    if w.queue and now - w.since > self.deadline + self.grace:
                        self._hang(w)
                        continue
                    self._check_resources(w, now)
                    if w in self.workers:
                        self._feed(w)
                if now - last_progress >= self.progress_interval:
                    last_progress = now
                    self._progress()
            now = time.monotonic()
            for w in list(self.workers):                # a last, quiet sample: between cases
                self._check_resources(w, now, final=True)
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            self.elapsed = time.monotonic() - self.t0
            for w in list(self.workers):
                w.send({"op": "exit"})
                self._retire(w, requeue=False)

    # -- results ----------------------------------------------------------------------------
    def summary(self) -> dict:
        kinds = collections.Counter(f["kind"] for f in self.findings)
        el = getattr(self, "elapsed", time.monotonic() - self.t0)
        return {
            "runs": self.completed, "requested": self.runs, "seed": self.seed, "jobs": self.jobs,
            "modes": self.modes, "max_vcpus": self.max_vcpus, "deadline": self.deadline,
            "seconds": round(el, 3), "runs_per_s": round(self.completed / el, 1) if el else 0.0,
            "outcomes": dict(self.outcomes.most_common()),
            "outcomes_by_mode": {m: dict(c.most_common()) for m, c in self.by_mode.items()},
            "outcome_details": dict(self.details.most_common()),
            "stops": dict(self.stops.most_common()),
            "crashes": kinds["crash"], "hangs": kinds["hang"], "leaks": kinds["leak"],
            "exceptions": kinds["exception"], "vmm_errors": kinds["vmm_error"],
            "cpu_overruns": kinds["cpu"], "devices": self.devices,
            "finding_signatures": dict(self.signatures.most_common()),
            "findings": [{k: f[k] for k in ("kind", "index", "detail", "file") if k in f}
                         for f in self.findings[:500]],
            "slowest_case": {"index": self.slowest[1], "seconds": round(self.slowest[0], 4)},
            "interrupted": self.interrupted,
        }


def _print_summary(s: dict, out=None) -> None:
    out = sys.stdout if out is None else out     # the stdout of now (a program watches it)
    p = lambda *a: print(*a, file=out)       # noqa: E731
    state = " (interrupted)" if s["interrupted"] else ""
    what = " --devices" if s.get("devices") else ""
    p(f"pykvm fuzz{what}{state}: {s['runs']} runs in {s['seconds']:.1f} s ({s['runs_per_s']:.1f} runs/s); "
      f"seed {s['seed']}, jobs {s['jobs']}, modes {','.join(s['modes'])}, "
      f"deadline {s['deadline']} s, up to {s['max_vcpus']} vCPUs")
    p("outcomes:")
    for name, n in s["outcomes"].items():
        per = ", ".join(f"{m} {c[name]}" for m, c in s["outcomes_by_mode"].items() if c.get(name))
        p(f"  {name:<22} {n:>8}   ({per})")
    if s.get("outcome_details"):
        p("details:")
        for name, n in s["outcome_details"].items():
            p(f"  {name:<46} {n:>8}")
    p(f"crashes: {s['crashes']}")
    p(f"hangs: {s['hangs']}")
    p(f"leaks: {s['leaks']}")
    p(f"exceptions: {s['exceptions']}")
    if s.get("devices"):
        p(f"vmm errors: {s['vmm_errors']}")
        p(f"cpu overruns: {s['cpu_overruns']}")
    if s["findings"]:
        p("findings:")
        for sig, n in s["finding_signatures"].items():
            p(f"  {n:>6} x {sig}")
        saved = [f for f in s["findings"] if f.get("file")]
        for f in saved[:20]:
            where = f"case {f['index']}" if f.get("index") is not None else "worker"
            p(f"  {f['kind']:<10} {where:<12} {f['file']}")
        if len(saved) > 20:
            p(f"  ... {len(saved) - 20} more reproducers in the findings directory")
    else:
        p("findings: none")


# ================================================================================================
# Replay
# ================================================================================================

def replay(path: str, *, as_json: bool = False, grace: float = HANG_GRACE,
           out_dir: str = DEFAULT_OUT, quiet: bool = False) -> int:
    """Run a reproducer (a finding file or a bare case file) again, supervised."""
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") == FINDING_FORMAT and doc.get("kind") == "leak":
        # The recorded range runs in one worker (twice as many cases from its start, so that
        # a leak found at the range's end grows past the bound again), sampled every 50 ms
        # against the bounds it was found with.
        g = doc["generator"]
        n = doc["stop"] - doc["start"]
        sup = Supervisor(runs=2 * n, start=doc["start"], seed=g["seed"],
                         jobs=1, deadline=g["deadline"], modes=g["modes"],
                         max_vcpus=g["max_vcpus"], out_dir=out_dir, quiet=quiet,
                         inject=doc.get("inject", ()), devices=bool(g.get("devices")),
                         warmup=min(WARMUP, max(1, n // 4)), check_interval=0.05,
                         fd_slack=doc.get("fd_slack", FD_SLACK),
                         rss_slack_mb=doc.get("rss_slack_mb", RSS_SLACK_MB))
        sup.run()
        s = sup.summary()
        s["replay"] = path
        s["reproduced"] = bool(s["leaks"])
        print(json.dumps(s, indent=1)) if as_json else _print_summary(s)
        return EXIT_INTERRUPTED if s["interrupted"] else (EXIT_FINDINGS if s["findings"] else EXIT_OK)
    if doc.get("format") == FINDING_FORMAT:
        case_doc, inject, expected = doc["case"], doc.get("inject", []), doc["kind"]
    else:
        case_doc, inject, expected = doc, [], None
    case = _case_from_json(case_doc)
    sup = Supervisor(runs=1, seed=case["seed"], jobs=1, deadline=case["deadline"],
                     modes=[case["mode"]], max_vcpus=len(case["vcpus"]), out_dir=out_dir,
                     quiet=True, inject=inject, grace=grace,
                     devices=case.get("format") == fuzz_devices.CASE_FORMAT)
    result = _replay_one(sup, case, case_doc)
    result.update(replay=path, expected=expected, mode=case["mode"], vcpus=len(case["vcpus"]),
                  seed=case["seed"], index=case["index"])
    result["reproduced"] = expected is not None and result["finding"] == expected
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        print(f"replay {path}: seed {case['seed']} case {case['index']}, {case['mode']} mode, "
              f"{len(case['vcpus'])} vCPU(s)")
        print(f"  outcome: {result['outcome']}")
        if result["finding"]:
            print(f"  finding: {result['finding']}: {result['detail'].strip()[:2000]}")
        if expected:
            print(f"  reproduced: {'yes' if result['reproduced'] else 'no'} (recorded: {expected})")
    if result.get("interrupted"):
        return EXIT_INTERRUPTED
    return EXIT_FINDINGS if result["finding"] else EXIT_OK


def _replay_one(sup: Supervisor, case: dict, case_doc: dict) -> dict:
    w = _Worker(sup, 0)
    limit = case["deadline"] + sup.grace
    out = {"outcome": None, "finding": None, "detail": ""}
    try:
        t_start = time.monotonic()
        ready = False
        sent_at = None
        while True:
            now = time.monotonic()
            if not ready and now - t_start > WORKER_START_TIMEOUT:
                out.update(outcome="error", detail="worker did not start")
                break
            if sent_at is not None and now - sent_at > limit:
                try:
                    os.kill(w.pid, signal.SIGUSR1)
                    time.sleep(0.3)
                except ProcessLookupError:
                    pass
                out.update(outcome="hang", finding="hang",
                           detail=f"still running {limit:.2f} s after it started\n" + w.stderr_tail())
                break
            r = _select_one(w, 0.05)
            for msg in w.read_lines():
                if msg.get("ev") == "ready":
                    ready = True
                    w.send({"op": "case", "case": case_doc})
                    sent_at = time.monotonic()
                elif msg.get("ev") == "fatal":
                    raise RuntimeError(msg.get("error"))
                elif msg.get("ev") == "result":
                    out["outcome"] = msg["outcome"]
                    out["stops"] = msg.get("stops", [])
                    out["seconds"] = msg.get("seconds")
                    if msg.get("error"):
                        out["error"] = msg["error"]
                    if msg.get("finding"):
                        out["finding"] = msg["finding"]["kind"]
                        out["detail"] = msg["finding"].get("detail", "")
                    return out
            if r == "eof" or w.proc.poll() is not None:
                w.proc.wait()
                rc = w.proc.returncode
                how = _signal_name(-rc) if rc < 0 else f"exit status {rc}"
                out.update(outcome="crash", finding="crash",
                           detail=f"worker died ({how})\n" + w.stderr_tail())
                break
    except KeyboardInterrupt:
        out["interrupted"] = True
    finally:
        w.send({"op": "exit"})
        w.kill()
    return out


def _select_one(w: _Worker, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(w.proc.stdout, selectors.EVENT_READ)
    try:
        if sel.select(timeout):
            chunk = b""
            try:
                chunk = os.read(w.proc.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                return "idle"
            if not chunk:
                return "eof"
            w.buf += chunk
            return "data"
        return "idle"
    finally:
        sel.close()


# ================================================================================================
# Command line
# ================================================================================================

PROG = "python -m pykvm.fuzz"
_invocation = {"json": False}     # whether this command line asked for --json


def _json_requested(argv) -> bool:
    args = list(argv)
    if "--" in args:
        args = args[:args.index("--")]
    return "--json" in args and not any(a in ("-h", "--help") for a in args)


def _fail(code: int, line: str) -> int:
    """A run that ended without a summary: ``line`` on stderr and, with --json, one JSON object
    on stdout (``exit``, ``exit_code``, ``detail``). Returns ``code``."""
    if _invocation["json"]:
        name = {EXIT_USAGE: "bad_input", EXIT_ENVIRONMENT: "host_error",
                EXIT_INTERRUPTED: "interrupted"}.get(code, "error")
        try:
            print(json.dumps({"exit": name, "exit_code": code, "detail": line}, indent=1))
        except (OSError, ValueError):        # stdout failed: told by the program's exit
            pass
    _cliutil.err(line)
    return code


# errnos that mean the host, not the command line, failed a path (a full disk, no memory ...)
_HOST_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
                errno.EROFS)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SystemExit(_fail(EXIT_USAGE, f"{self.prog}: error: {message}"))


def _positive_int(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return n


def _seed(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return n


def _jobs(text: str) -> int:
    n = _positive_int(text)
    if n > 64:
        raise argparse.ArgumentTypeError(f"at most 64 jobs: {text!r}")
    return n


def _vcpus(text: str) -> int:
    n = _positive_int(text)
    if n > 16:
        raise argparse.ArgumentTypeError(f"at most 16 vCPUs: {text!r}")
    return n


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(v) or v <= 0 or v > 60:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds in (0, 60]: {text!r}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return v


def _modes(text: str) -> List[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("no modes given (use real,protected,long)")
    bad = [p for p in parts if p not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode {bad[0]!r} (choose from {','.join(MODES)})")
    return [m for m in MODES if m in parts]          # canonical order: cases depend on it


def _inject_spec(text: str) -> str:
    kind, sep, at = text.partition("@")
    if not sep or kind not in ("crash", "hang", "raise", "leakfd", "leakmem", "vmmerror", "cpu"):
        raise argparse.ArgumentTypeError(f"bad injection {text!r} (KIND@INDEX)")
    try:
        int(at)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad injection {text!r} (KIND@INDEX)") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m pykvm.fuzz",
        description="Run random guests (random bytes and random valid x86 instruction streams, "
                    "random registers, flags and entry points, 1-N vCPUs) in real, protected "
                    "and long mode on /dev/kvm, each in a fresh VM under a deadline, and count "
                    "how they end. Worker crashes, hangs, unexpected Python exceptions and "
                    "fd/RSS growth are findings, saved as reproducers for --replay.",
        epilog="Device mode (--devices): each case is a PC machine with a random subset of the "
               "optional devices edu and intel-iommu whose 1-4 vCPUs (long or protected mode) "
               "drive every device concurrently: random port and MMIO accesses of every width "
               "and alignment, fw_cfg, PCI configuration (BARs, MSI), VT-d (tables, queues, "
               "interrupt remapping, faults), edu DMA and interrupts, RTC, ACPI PM, pc-testdev, "
               "the 16550 and resets, with tables, queues and DMA buffers at random addresses. "
               "There a guest that ends the machine with the VMM-error status (vmm_error) or "
               "costs the host more than 2 ms of CPU per access on average (cpu) is a finding "
               "too. Exit status: 0 no findings, 1 findings, 2 bad arguments, 8 /dev/kvm or the "
               "host unusable (stdout closed or full, a reproducer that could not be saved), "
               "141 stdout's reader gone, 130 interrupted (the summary so far is printed). See "
               "docs/fuzzing.md.",
    )
    p.add_argument("--devices", action="store_true",
                   help="device mode: fuzz the PC machine's devices instead of the CPU (see "
                        "below); --modes then picks from protected,long")
    p.add_argument("--runs", type=_positive_int, default=1000, metavar="N",
                   help="number of cases to run (default %(default)s)")
    p.add_argument("--seed", type=_seed, default=0, metavar="S",
                   help="run seed: case I of seed S is always the same guest (default %(default)s)")
    p.add_argument("--jobs", type=_jobs, default=min(os.cpu_count() or 1, 4), metavar="J",
                   help="worker processes (default: CPUs, at most 4: %(default)s here)")
    p.add_argument("--deadline", type=_seconds, default=None, metavar="SECONDS",
                   help=f"how long each guest may run (default {DEFAULT_DEADLINE}, "
                        f"{fuzz_devices.DEFAULT_DEADLINE} with --devices); a case still running "
                        "2 s past its deadline is a hang")
    p.add_argument("--modes", type=_modes, default=None, metavar="LIST",
                   help="comma-separated CPU modes to draw from (default "
                        f"{','.join(MODES)}; {','.join(fuzz_devices.MODES)} with --devices)")
    p.add_argument("--max-vcpus", type=_vcpus, default=4, metavar="N",
                   help="most vCPUs in one guest, each run in its own thread (default %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="where reproducers of findings are written (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--replay", metavar="FILE",
                   help="run a reproducer (or a saved case file) again, supervised, instead of "
                        "fuzzing; exit 1 if it still produces a finding")
    p.add_argument("--quiet", action="store_true", help="no progress lines or finding notices on stderr")
    # Test and tuning hooks, not part of the documented interface.
    S = argparse.SUPPRESS
    p.add_argument("--_worker", action="store_true", help=S)
    p.add_argument("--_inject", action="append", type=_inject_spec, default=[], help=S)
    p.add_argument("--_warmup", type=_positive_int, default=WARMUP, help=S)
    p.add_argument("--_fd-slack", dest="_fd_slack", type=_positive_int, default=FD_SLACK, help=S)
    p.add_argument("--_rss-slack-mb", dest="_rss_slack_mb", type=_nonneg_float,
                   default=RSS_SLACK_MB, help=S)
    p.add_argument("--_check-interval", dest="_check_interval", type=_nonneg_float,
                   default=CHECK_INTERVAL, help=S)
    p.add_argument("--_grace", type=_nonneg_float, default=HANG_GRACE, help=S)
    p.add_argument("--_start", type=_seed, default=0, help=S)
    return p


def _check_kvm() -> Optional[str]:
    from .errors import PykvmError
    from .kvm import Kvm
    try:
        Kvm().close()
    except PykvmError as e:
        return str(e)
    return None


def _check_out_dir(path: str) -> "tuple[int, str] | None":
    """Refuse, before any case runs, a findings directory reproducers can never be written to:
    (status, one line), or None when ``path`` is (or can be made) a writable directory.
    A file, device or FIFO where the directory should be is bad input (2); a host that cannot
    create it (a full or read-only file system) is a host failure (8)."""
    where = f"{PROG}: error: --out {path}"
    try:
        if os.path.lexists(path):
            if not os.path.isdir(path):
                return EXIT_USAGE, f"{where}: not a directory"
        else:
            check_report_path(path, "reproducers")      # its nearest parent: a directory
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            return EXIT_USAGE, f"{where}: {os.strerror(errno.EACCES)}"
    except ReportPathError as e:
        return (EXIT_ENVIRONMENT if e.errno in _HOST_ERRNOS else EXIT_USAGE), f"{PROG}: error: {e}"
    except OSError as e:
        return ((EXIT_ENVIRONMENT if e.errno in _HOST_ERRNOS else EXIT_USAGE),
                f"{where}: {e.strerror or e}")
    return None


def main(argv=None) -> int:
    """``python -m pykvm.fuzz``; returns the exit status (docs/fuzzing.md "Exit status"):
    0 no findings, 1 findings, 2 bad arguments, 8 /dev/kvm or the host unusable (including a
    stdout or findings directory that cannot take the output), 130 interrupted. Every failure
    is one line on stderr and, with --json, one JSON object on stdout."""
    _invocation["json"] = _json_requested(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._worker:
        return _worker_main(args._inject)
    if args.devices and not fuzz_devices.supported():
        return _fail(EXIT_USAGE, f"{PROG}: error: --devices drives the x86 PC machine's "
                     f"devices; this host is {fuzz_devices.host_arch()}")
    if args.deadline is None:
        args.deadline = fuzz_devices.DEFAULT_DEADLINE if args.devices else DEFAULT_DEADLINE
    if args.modes is None:
        args.modes = list(fuzz_devices.MODES if args.devices else MODES)
    elif args.devices:
        bad = [m for m in args.modes if m not in fuzz_devices.MODES]
        if bad:
            parser.error(f"argument --modes: device mode runs in {','.join(fuzz_devices.MODES)}, "
                         f"not {bad[0]!r}")
    try:
        if args.replay:
            if not os.path.isfile(args.replay):
                return _fail(EXIT_USAGE, f"{PROG}: error: no such file: {args.replay}")
            try:
                return replay(args.replay, as_json=args.json, grace=args._grace, out_dir=args.out,
                              quiet=args.quiet)
            except (ValueError, KeyError, TypeError) as e:
                return _fail(EXIT_USAGE, f"{PROG}: error: {args.replay} is not a reproducer: {e}")
        bad_out = _check_out_dir(args.out)
        if bad_out:
            return _fail(*bad_out)
        err = _check_kvm()
        if err:
            return _fail(EXIT_ENVIRONMENT, f"{PROG}: {err}")
        sup = Supervisor(runs=args.runs, seed=args.seed, jobs=args.jobs, deadline=args.deadline,
                         modes=args.modes, max_vcpus=args.max_vcpus, out_dir=args.out,
                         quiet=args.quiet, inject=args._inject, start=args._start,
                         warmup=args._warmup, fd_slack=args._fd_slack,
                         rss_slack_mb=args._rss_slack_mb, check_interval=args._check_interval,
                         grace=args._grace, devices=args.devices)
        try:
            sup.run()
        except RuntimeError as e:
            return _fail(EXIT_ENVIRONMENT, f"{PROG}: {e}")
        s = sup.summary()
        if args.json:
            print(json.dumps(s, indent=1))
        else:
            _print_summary(s)
        sys.stdout.flush()
        if s["interrupted"]:
            return EXIT_INTERRUPTED
        if sup.save_error is not None:       # findings whose reproducers were lost: said once
            return EXIT_ENVIRONMENT
        return EXIT_FINDINGS if s["findings"] else EXIT_OK
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, f"{PROG}: interrupted")


def _program() -> int:
    """``python -m pykvm.fuzz`` as a program: stdout that cannot take the output (closed, full,
    a reader gone) is one line on stderr and status 8 (141 for a closed pipe), never success and
    never a traceback; stderr that cannot be written only loses its messages."""
    if "--_worker" in sys.argv[1:]:              # a worker: its stdout is the protocol pipe
        return main()

    def host_failure(e) -> int:                  # the host failed us (fds, processes, disk)
        if isinstance(e, MemoryError):
            return _fail(EXIT_ENVIRONMENT, f"{PROG}: out of memory")
        where = f"{e.filename}: " if e.filename else ""
        return _fail(EXIT_ENVIRONMENT, f"{PROG}: {where}{e.strerror or e}")
    return _cliutil.run_program(main, PROG, EXIT_ENVIRONMENT, EXIT_USAGE, host_failure)


if __name__ == "__main__":
    sys.exit(_program())
