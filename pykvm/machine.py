"""A small machine: VM + RAM + vCPUs + the platform's devices + a loaded guest.

    with Machine("hello") as m:
        result = m.run(timeout=5)
        print(result.console_text, result.exit_code)

For tests, :meth:`Machine.step` runs one vCPU until the guest reports something (the kernel
selftests' "run, read the guest's report, assert" loop).
"""
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

from . import guests
from .arch import current as _arch
from .errors import PykvmError
from .exits import Exit
from .kvm import Kvm
from .report import GuestAssertion, Report
from .runloop import make_loop


@dataclass
class Event:
    """What :meth:`Machine.step` returns.

    ``kind``: "report" (``report`` holds a SYNC/DONE/ASSERT/... :class:`Report`), "debug_exit"
    (``value``), "exit" (an exit nobody handled: ``exit``), "timeout", "kick" or "budget"."""
    kind: str
    vcpu: int = 0
    report: Optional[Report] = None
    exit: Optional[Exit] = None
    value: Optional[int] = None

    @property
    def name(self) -> str:
        if self.kind == "report":
            return self.report.kind
        if self.kind == "exit":
            return self.exit.name
        return self.kind


@dataclass
class RunResult:
    exit: str                         # "done", "debug_exit", "timeout", "assert", an exit name...
    exit_code: int
    console: bytes
    exits: Dict[str, int]
    seconds: float
    detail: str = ""
    debug_exit_value: Optional[int] = None
    reports: List[Report] = field(default_factory=list)

    @property
    def console_text(self) -> str:
        return self.console.decode("utf-8", "replace")

    def as_dict(self) -> dict:
        return {"exit": self.exit, "exit_code": self.exit_code, "console": self.console_text,
                "exits": self.exits, "seconds": round(self.seconds, 6), "detail": self.detail,
                "debug_exit_value": self.debug_exit_value}


# Exit status of `pykvm run` for each way a run can end.
EXIT_TIMEOUT = 124
EXIT_GUEST_FAILURE = 1


def debug_exit_status(value: int) -> int:
    """QEMU isa-debug-exit convention: a write of V exits with (V << 1) | 1."""
    return ((value << 1) | 1) & 0xFF


class Machine:
    """A VM with RAM, ``vcpus`` vCPUs and ``guest`` loaded (a built-in guest name, a path, or
    image bytes). Options go to the arch platform (x86: ``irqchip``, ``pit``, ``cpuid``;
    RISC-V: ``cpu_type``, ``suspend_seconds``, ...)."""

    def __init__(self, guest: Union[str, bytes, None] = None, *, mem_size: int = 64 << 20,
                 vcpus: int = 1, cmdline: str = "", native: bool = True, kvm: Optional[Kvm] = None,
                 on_console: Optional[Callable[[bytes], None]] = None,
                 flat_addr: Optional[int] = None, flat_mode: str = "real", **platform_opts):
        if vcpus < 1:
            raise ValueError("a machine needs at least one vCPU")
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.console = bytearray()
        self.on_console = on_console
        self.reports: List[Report] = []
        self.handlers: Dict[str, Callable] = {}
        self.trace: Optional[Callable[[str], None]] = None   # called with one line per event
        self._lock = threading.Lock()
        self._stop = threading.Event()
        try:
            self.vm = self.kvm.create_vm()
            self.platform = _arch.Platform(self, **platform_opts)
            self.platform.create_devices()
            self.ram = self.vm.add_memory(self.platform.ram_base, mem_size)
            image = guests.path(guest or guests.DEFAULT_GUEST) if guest is None or \
                isinstance(guest, str) else guest
            self.image_name = image if isinstance(image, str) else "<bytes>"
            self.image = self.platform.load(image, cmdline=cmdline, flat_addr=flat_addr,
                                            flat_mode=flat_mode)
            self.vcpus = [self.vm.create_vcpu(i) for i in range(vcpus)]
            for i, v in enumerate(self.vcpus):
                self.platform.setup_vcpu(v, i)
            self.loops = [make_loop(v, native=native, config=self.platform.loop_config(),
                                    on_console=self._console_out) for v in self.vcpus]
        except BaseException:
            self.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def memory(self):
        return self.vm.memory

    def _console_out(self, data: bytes) -> None:
        with self._lock:
            self.console += data
        if self.on_console:
            self.on_console(data)

    def on(self, exit_name: str, handler: Callable) -> None:
        """Handle exits named ``exit_name`` ("MMIO", "IO", "HLT", ...): ``handler(machine,
        vcpu_index, exit)`` returns None to resume the guest, or anything else to end the step
        with an "exit" event."""
        self.handlers[exit_name] = handler

    def set_params(self, *values: int) -> None:
        """Write ``values`` into the guest's ``pykvm_params[]`` array (before running)."""
        addr = self.image.params_addr
        if addr is None:
            raise PykvmError(f"{self.image_name} has no pykvm_params symbol")
        if len(values) > 16:
            raise ValueError("pykvm_params holds 16 values")
        for i, v in enumerate(values):
            self.memory.write_u64(addr + 8 * i, v)

    # -- running ----------------------------------------------------------------------------
    def step(self, index: int = 0, *, timeout: Optional[float] = 10.0, budget: int = 0) -> Event:
        """Run vCPU ``index`` until the guest reports (PRINT reports go to the console and
        do not end the step), or the run ends some other way."""
        loop = self.loops[index]
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            stop = loop.run(deadline=deadline, budget=budget)
            if stop.kind == "debug_exit":
                return Event("debug_exit", index, value=stop.value)
            if stop.kind != "exit":
                return Event("timeout" if stop.kind == "deadline" else stop.kind, index)
            ex = stop.exit
            if self.trace:
                self.trace(f"vcpu{index}: {ex!r}")
            rep = self.platform.report_from_exit(index, ex)
            if rep is not None:
                rep.vcpu = index
                if self.trace:
                    self.trace(f"vcpu{index}: guest report {rep.describe()}")
                if rep.kind == "print":
                    self._console_out(rep.text.encode())
                    continue
                with self._lock:
                    self.reports.append(rep)
                return Event("report", index, report=rep)
            handler = self.handlers.get(ex.name)
            if handler is not None:
                if handler(self, index, ex) is None:
                    continue
                return Event("exit", index, exit=ex)
            if self.platform.handle_exit(index, ex):
                continue
            return Event("exit", index, exit=ex)

    def expect(self, kind: str, index: int = 0, *, timeout: Optional[float] = 10.0) -> Event:
        """Step and insist on a report of ``kind`` ("sync", "done"); a guest assertion or
        exception raises :class:`~pykvm.report.GuestAssertion`, anything else AssertionError."""
        ev = self.step(index, timeout=timeout)
        if ev.kind == "report" and ev.report.kind in ("assert", "exception", "trap"):
            raise GuestAssertion(ev.report)
        if ev.name != kind:
            raise AssertionError(f"expected a guest {kind} report from vCPU {index}, got "
                                 f"{self.describe(ev)}")
        return ev

    def sync(self, index: int = 0, stage: Optional[int] = None, *, timeout: float = 10.0):
        """Expect GUEST_SYNC (optionally of ``stage``) and return its values after the stage."""
        ev = self.expect("sync", index, timeout=timeout)
        if stage is not None and ev.report.stage != stage:
            raise AssertionError(f"guest synced stage {ev.report.stage}, expected {stage}")
        return ev.report.values_list

    def done(self, index: int = 0, *, timeout: float = 10.0) -> None:
        self.expect("done", index, timeout=timeout)

    def describe(self, ev: Event) -> str:
        if ev.kind == "report":
            return ev.report.describe()
        if ev.kind == "exit":
            return f"{ev.exit.name} exit {ev.exit!r}"
        if ev.kind == "debug_exit":
            return f"isa-debug-exit write of {ev.value:#x}"
        return ev.kind

    def kick_all(self) -> None:
        self._stop.set()
        for l in self.loops:
            l.kick()

    def _run_one(self, index: int, deadline: Optional[float], results: list) -> None:
        while True:
            if self._stop.is_set():
                results[index] = Event("kick", index)
                return
            left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
            ev = self.step(index, timeout=left)
            if ev.kind == "report" and ev.report.kind == "sync":
                continue                       # nobody waits for syncs in a plain run
            results[index] = ev
            if not (ev.kind == "report" and ev.report.kind == "done"):
                self.kick_all()                # one vCPU ending the machine stops the rest
            return

    def run(self, timeout: Optional[float] = None) -> RunResult:
        """Run every vCPU (one thread each) until the guest is done, exits, fails or times
        out; the result carries the console output and exit counts."""
        t0 = time.monotonic()
        deadline = t0 + timeout if timeout else None
        results: List[Optional[Event]] = [None] * len(self.vcpus)
        if len(self.vcpus) == 1:
            self._run_one(0, deadline, results)
        else:
            threads = [threading.Thread(target=self._run_one, args=(i, deadline, results),
                                        name=f"vcpu{i}", daemon=True)
                       for i in range(len(self.vcpus))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        seconds = time.monotonic() - t0
        counts: Dict[str, int] = {}
        for l in self.loops:
            for k, v in l.counts.items():
                counts[k] = counts.get(k, 0) + v
        ev = self._decisive(results)
        exit_name, code, detail, dbg = self._verdict(ev)
        return RunResult(exit_name, code, bytes(self.console), counts, seconds, detail, dbg,
                         list(self.reports))

    @staticmethod
    def _decisive(results: List[Optional[Event]]) -> Event:
        """The event that ended the run: anything but DONE/kick wins."""
        for ev in results:
            if ev is not None and ev.kind not in ("kick",) and ev.name != "done":
                return ev
        return next((ev for ev in results if ev is not None and ev.name == "done"),
                    results[0] or Event("kick"))

    def _verdict(self, ev: Event):
        if ev.kind == "report":
            r = ev.report
            if r.kind == "done":
                return "done", 0, "", None
            return r.kind, EXIT_GUEST_FAILURE, r.describe(), None
        if ev.kind == "debug_exit":
            return "debug_exit", debug_exit_status(ev.value), "", ev.value
        if ev.kind == "timeout":
            return "timeout", EXIT_TIMEOUT, "guest did not finish in time", None
        if ev.kind == "exit":
            code, detail = self.platform.exit_verdict(ev.exit)
            return ev.exit.name, code, detail, None
        return ev.kind, EXIT_GUEST_FAILURE, "", None

    def close(self) -> None:
        for v in getattr(self, "vcpus", []):
            v.close()
        if getattr(self, "vm", None) is not None:
            self.vm.close()
        if self._own_kvm and getattr(self, "kvm", None) is not None:
            self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
