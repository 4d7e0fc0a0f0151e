"""A small machine: VM + RAM + vCPUs + the platform's devices + a loaded guest.

    with Machine("hello") as m:
        result = m.run(timeout=5)
        print(result.console_text, result.exit_code)

For tests, :meth:`Machine.step` runs one vCPU until the guest reports something (the kernel
selftests' "run, read the guest's report, assert" loop).
"""
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

from . import status
from .arch import current as _arch
from .errors import Closed, GuestError, KvmError, PykvmError
from .exits import Exit
from .kvm import Kvm
from .report import GuestAssertion, Report
from .runloop import make_loop
from .status import debug_exit_status  # noqa: F401  (re-exported for callers)


@dataclass
class Event:
    """What :meth:`Machine.step` returns.

    ``kind``: "report" (``report`` holds a SYNC/DONE/ASSERT/... :class:`Report`), "debug_exit"
    (``value``), "exit" (an exit nobody handled: ``exit``), "timeout", "kick", "budget", or
    "error" (only from :meth:`Machine.run`: ``error`` holds the exception a vCPU's thread
    raised)."""
    kind: str
    vcpu: int = 0
    report: Optional[Report] = None
    exit: Optional[Exit] = None
    value: Optional[int] = None
    error: Optional[BaseException] = None

    @property
    def name(self) -> str:
        """A short name: the report kind, the exit name, or ``kind``."""
        if self.kind == "report":
            return self.report.kind
        if self.kind == "exit":
            return self.exit.name
        return self.kind


@dataclass
class RunResult:
    """How :meth:`Machine.run` ended.

    ``exit``: "done", "debug_exit", "timeout", a report kind ("assert", "exception", "trap"),
    "guest_error", "vmm_error", "handler_error", or the name of an unhandled exit ("HLT",
    "SHUTDOWN", "MMIO"...). ``exit_code``: the status ``pykvm run`` exits with (see
    :mod:`pykvm.status`). ``console``: the last ``console_limit`` bytes of output
    (``console_dropped`` counts older bytes not kept). ``exits``: exit counts by reason name.
    ``seconds``: wall time of the run. ``vcpu``: the vCPU whose event decided the run.
    ``error``: the exception behind an ``..._error`` outcome (not in :meth:`as_dict`)."""
    exit: str
    exit_code: int
    console: bytes
    exits: Dict[str, int]
    seconds: float
    detail: str = ""
    debug_exit_value: Optional[int] = None
    reports: List[Report] = field(default_factory=list)
    console_dropped: int = 0
    reports_dropped: int = 0
    vcpu: int = 0
    error: Optional[BaseException] = None

    @property
    def console_text(self) -> str:
        """The retained console output decoded as UTF-8 (bad bytes replaced)."""
        return self.console.decode("utf-8", "replace")

    def as_dict(self) -> dict:
        """A JSON-ready dict (what ``pykvm run --json`` prints)."""
        return {"exit": self.exit, "exit_code": self.exit_code, "console": self.console_text,
                "exits": self.exits, "seconds": round(self.seconds, 6), "detail": self.detail,
                "debug_exit_value": self.debug_exit_value, "vcpu": self.vcpu,
                "console_dropped": self.console_dropped, "reports": len(self.reports),
                "reports_dropped": self.reports_dropped}


def _is_image_path(name: str) -> bool:
    """A name pykvm.guests.path() would return as it is (a path to an image, not a built-in
    guest's name or a source to build)."""
    return not name.endswith((".c", ".S")) and ("/" in name or name.endswith((".elf", ".bin")))


# What a handler the run loop calls for Machine.on (Machine._fast_handler) returns besides None
# (resume) and a guest report: leave the exit to step() / a handler ended the step.
_SLOW = object()
_HANDLED = object()

# Kept for callers of earlier versions; see pykvm.status for the whole table.
EXIT_TIMEOUT = status.TIMEOUT
EXIT_GUEST_FAILURE = status.GUEST_FAILURE


class Machine:
    """A VM with RAM, ``vcpus`` vCPUs and ``guest`` loaded (a built-in guest name, a path, or
    image bytes). Options go to the arch platform (x86: ``irqchip``, ``pit``, ``cpuid``;
    RISC-V: ``cpu_type``, ``suspend_seconds``, ...).

    ``mem_size``: guest RAM in bytes (mapped ``MAP_NORESERVE``: it costs host memory only as
    the guest touches it). ``console_limit``: bytes of console output kept in :attr:`console`
    (older bytes are counted in ``console_dropped``; ``on_console`` still sees everything).
    ``report_limit``: guest reports kept in :attr:`reports` (more are counted in
    ``reports_dropped``). ``initrd``: paths of files to hand the guest (QEMU's ``-initrd``: on
    x86 multiboot each is a module; on RISC-V the one file is the initrd).

    Raises :class:`ValueError` for bad arguments, :class:`~pykvm.loader.LoadError` for a bad
    image, :class:`~pykvm.errors.HostMemoryError` when RAM cannot be mapped and
    :class:`~pykvm.errors.KvmError` when KVM refuses a step. :meth:`close` may be called from
    any thread at any time; afterwards every method raises :class:`~pykvm.errors.Closed`."""

    def __init__(self, guest: Union[str, bytes, None] = None, *, mem_size: int = 64 << 20,
                 vcpus: int = 1, cmdline: str = "", native: bool = True, kvm: Optional[Kvm] = None,
                 on_console: Optional[Callable[[bytes], None]] = None,
                 flat_addr: Optional[int] = None, flat_mode: str = "real",
                 console_limit: int = 1 << 20, report_limit: int = 4096,
                 initrd: Sequence[str] = (), **platform_opts):
        if not isinstance(vcpus, int) or vcpus < 1:
            raise ValueError(f"a machine needs at least one vCPU, got {vcpus!r}")
        self._closed = False
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self._console = bytearray()
        self.console_limit = console_limit
        self._console_total = 0
        self.on_console = on_console
        self.reports: List[Report] = []
        self.report_limit = report_limit
        self.reports_dropped = 0
        self.handlers: Dict[str, Callable] = {}
        self.trace: Optional[Callable[[str], None]] = None   # called with one line per event
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._stop = False                 # a plain flag: set from signal handlers too
        self.vcpu_count = vcpus            # known to the platform before the vCPUs exist
        try:
            max_vcpus = self.kvm.check_extension("MAX_VCPUS") or self.kvm.check_extension("NR_VCPUS")
            if max_vcpus and vcpus > max_vcpus:
                raise ValueError(f"{vcpus} vCPUs requested; this KVM allows at most {max_vcpus}")
            self.vm = self.kvm.create_vm()
            self.platform = _arch.Platform(self, **platform_opts)
            self.platform.create_devices()
            add_ram = getattr(self.platform, "add_ram", None)     # x86: RAM around the hole
            self.ram = add_ram(mem_size) if add_ram else \
                self.vm.add_memory(self.platform.ram_base, mem_size)
            image = guest
            if guest is None or (isinstance(guest, str) and not _is_image_path(guest)):
                from . import guests               # (lazy: it loads subprocess to build them)
                image = guests.path(guest or guests.DEFAULT_GUEST)
            self.image_name = image if isinstance(image, str) else "<bytes>"
            self.image = self.platform.load(image, cmdline=cmdline, initrd=tuple(initrd),
                                            flat_addr=flat_addr,
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
    def _check_open(self) -> None:
        if self._closed:
            raise Closed("Machine is closed")

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun."""
        return self._closed

    @property
    def memory(self):
        """Guest memory (:class:`~pykvm.memory.GuestMemory`), addressed by guest-physical
        address."""
        self._check_open()
        return self.vm.memory

    @property
    def console(self) -> bytes:
        """The last ``console_limit`` bytes the guest wrote to its console."""
        with self._lock:
            return bytes(self._console[-self.console_limit:]) if self.console_limit > 0 else b""

    @property
    def console_dropped(self) -> int:
        """Console bytes the guest wrote that :attr:`console` no longer holds."""
        with self._lock:
            return self._console_total - min(len(self._console), max(self.console_limit, 0))

    def _console_out(self, data: bytes) -> None:
        with self._lock:
            self._console += data
            self._console_total += len(data)
            if len(self._console) > 2 * self.console_limit:     # trim in amortised O(1)
                del self._console[:len(self._console) - self.console_limit]
        if self.on_console:
            self.on_console(data)

    def _keep_report(self, rep: Report) -> None:
        with self._lock:
            if len(self.reports) < self.report_limit:
                self.reports.append(rep)
            else:
                self.reports_dropped += 1

    def on(self, exit_name: str, handler: Callable) -> None:
        """Handle exits named ``exit_name`` ("MMIO", "IO", "HLT", ...): ``handler(machine,
        vcpu_index, exit)`` returns None to resume the guest, or anything else to end the step
        with an "exit" event.

        The handler is called from inside the vCPU's run loop (no return through :meth:`step`
        per exit; guest reports are still recognised first). Its exit object is valid during
        the call and is reused for later exits unless the handler keeps a reference to it."""
        self.handlers[exit_name] = handler
        for i, loop in enumerate(getattr(self, "loops", ())):
            try:
                loop.on(exit_name, self._fast_handler(i))
            except ValueError:             # not an exit reason the loop knows: step() serves it
                pass

    def _fast_handler(self, index: int) -> Callable:
        """What the run loop calls for an exit some handler of :meth:`on` may want: the same
        order as :meth:`step` (a guest report first, then the handler), without leaving the
        loop when the handler resumes the guest."""
        platform, handlers = self.platform, self.handlers

        def on_exit(ex):
            if self.trace is not None:
                return _SLOW                   # step() traces every exit
            rep = platform.report_from_exit(index, ex)
            if rep is not None:
                rep.vcpu = index
                if rep.kind == "print":
                    self._console_out(rep.text.encode())
                    return None
                return rep                     # step() takes it from Stop.result
            h = handlers.get(ex.name)
            if h is None:
                return _SLOW
            if h(self, index, ex) is None:
                return None
            return _HANDLED
        return on_exit

    def set_params(self, *values: int) -> None:
        """Write ``values`` into the guest's ``pykvm_params[]`` array (before running)."""
        self._check_open()
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
        do not end the step), or the run ends some other way; returns the :class:`Event`.

        ``timeout``: seconds (None or 0 = no deadline). ``budget``: the most exits this step
        handles (0 = no cap), PRINT reports included. Raises :class:`~pykvm.errors.Closed`
        after :meth:`close`, :class:`~pykvm.errors.GuestError` for a report pykvm cannot read,
        :class:`~pykvm.errors.KvmError` if KVM_RUN fails, and whatever an exit handler raises."""
        self._check_open()
        if not isinstance(index, int) or not 0 <= index < len(self.loops):
            raise IndexError(f"no vCPU {index!r} (this machine has {len(self.loops)})")
        loop = self.loops[index]
        deadline = time.monotonic() + timeout if timeout else None
        start_exits = loop.exits_total
        while True:
            left = 0
            if budget:
                left = budget - (loop.exits_total - start_exits)
                if left <= 0:
                    return Event("budget", index)
            stop = loop.run(deadline=deadline, budget=left)
            if stop.kind == "debug_exit":
                return Event("debug_exit", index, value=stop.value)
            if stop.kind != "exit":
                return Event("timeout" if stop.kind == "deadline" else stop.kind, index)
            ex = stop.exit
            res = stop.result
            if res is _HANDLED:                # a handler of on() ended the step
                return Event("exit", index, exit=ex)
            if self.trace:
                self.trace(f"vcpu{index}: {ex!r}")
            rep = res if isinstance(res, Report) else self.platform.report_from_exit(index, ex)
            if rep is not None:
                rep.vcpu = index
                if self.trace:
                    self.trace(f"vcpu{index}: guest report {rep.describe()}")
                if rep.kind == "print":
                    self._console_out(rep.text.encode())
                    continue
                self._keep_report(rep)
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
        """Expect GUEST_DONE from vCPU ``index`` within ``timeout`` seconds (see :meth:`expect`)."""
        self.expect("done", index, timeout=timeout)

    def describe(self, ev: Event) -> str:
        """One human-readable line for an :class:`Event` (used in assertion messages)."""
        if ev.kind == "report":
            return ev.report.describe()
        if ev.kind == "exit":
            return f"{ev.exit.name} exit {ev.exit!r}"
        if ev.kind == "debug_exit":
            return f"isa-debug-exit write of {ev.value:#x}"
        return ev.kind

    def kick_all(self) -> None:
        """Stop every vCPU's run (or its next one) and end :meth:`run`. Takes no lock: safe
        from another thread and from a signal handler. Raises :class:`~pykvm.errors.Closed`
        after :meth:`close`."""
        self._check_open()
        self._kick_all()

    def _kick_all(self) -> None:
        self._stop = True
        for l in getattr(self, "loops", ()):
            try:
                l.kick()
            except Closed:
                pass

    def _run_one(self, index: int, deadline: Optional[float], results: list) -> None:
        """One vCPU's part of :meth:`run`: every outcome, exceptions included, lands in
        ``results[index]``; anything but DONE stops the other vCPUs."""
        try:
            while True:
                if self._stop:
                    results[index] = Event("kick", index)
                    return
                left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
                ev = self.step(index, timeout=left)
                if ev.kind == "report" and ev.report.kind == "sync":
                    continue                       # nobody waits for syncs in a plain run
                if ev.kind == "kick" and not self._stop and \
                        getattr(self.platform, "hold", lambda i: False)(index):
                    continue                       # the platform paused this vCPU (x86 S3)
                results[index] = ev
                break
        except Exception as e:                     # guest, KVM or handler error: the result
            ev = results[index] = Event("error", index, error=e)
        if not (ev.kind == "report" and ev.report.kind == "done"):
            self._kick_all()                       # one vCPU ending the machine stops the rest

    def _vcpu_thread(self, index: int, deadline: Optional[float], results: list) -> None:
        # Process-directed signals (Ctrl-C, SIGTERM) belong to the main thread, which reacts
        # to them; a vCPU thread blocks them so they cannot stall in KVM_RUN there.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        self._run_one(index, deadline, results)

    def run(self, timeout: Optional[float] = None) -> RunResult:
        """Run every vCPU (one thread each) until the guest is done, exits, fails or times
        out, and return a :class:`RunResult` (console output, exit counts, verdict and
        status).

        ``timeout``: seconds (None or 0 = no deadline). The first vCPU to fail (a guest
        failure, an unhandled exit, a KVM error, an exception from an exit handler) stops all
        the others and decides the result. If the calling thread is interrupted (e.g.
        KeyboardInterrupt), every vCPU is stopped before the exception propagates. Raises
        :class:`~pykvm.errors.Closed` if the machine is (or gets) closed."""
        self._check_open()
        self._stop = False
        t0 = time.monotonic()
        deadline = t0 + timeout if timeout else None
        results: List[Optional[Event]] = [None] * len(self.vcpus)
        if len(self.vcpus) == 1:
            self._run_one(0, deadline, results)
        else:
            threads = [threading.Thread(target=self._vcpu_thread, args=(i, deadline, results),
                                        name=f"vcpu{i}", daemon=True)
                       for i in range(len(self.vcpus))]
            try:
                for t in threads:
                    t.start()
                for t in threads:
                    while t.is_alive():
                        t.join(0.1)
            except BaseException:
                self._kick_all()
                for t in threads:
                    if t.ident is not None:
                        t.join()
                raise
        if self._closed:
            raise Closed("Machine was closed while it ran")
        seconds = time.monotonic() - t0
        counts: Dict[str, int] = {}
        for l in self.loops:
            for k, v in l.counts.items():
                counts[k] = counts.get(k, 0) + v
        ev = self._decisive(results)
        exit_name, code, detail, dbg = self._verdict(ev)
        console, dropped = self.console, self.console_dropped
        return RunResult(exit_name, code, console, counts, seconds, detail, dbg,
                         list(self.reports), dropped, self.reports_dropped,
                         ev.vcpu, ev.error)

    @staticmethod
    def _decisive(results: List[Optional[Event]]) -> Event:
        """The event that ended the run: an error first, then anything but DONE/kick."""
        for ev in results:
            if ev is not None and ev.kind == "error":
                return ev
        for ev in results:
            if ev is not None and ev.kind not in ("kick",) and ev.name != "done":
                return ev
        return next((ev for ev in results if ev is not None and ev.name == "done"),
                    results[0] or Event("kick"))

    def _verdict(self, ev: Event):
        if ev.kind == "report":
            r = ev.report
            if r.kind == "done":
                return "done", status.OK, "", None
            return r.kind, status.GUEST_FAILURE, r.describe(), None
        if ev.kind == "debug_exit":
            return "debug_exit", debug_exit_status(ev.value), "", ev.value
        if ev.kind == "timeout":
            return "timeout", status.TIMEOUT, "guest did not finish in time", None
        if ev.kind == "exit":
            code, detail = self.platform.exit_verdict(ev.exit)
            return ev.exit.name, code, detail, None
        if ev.kind == "error":
            e = ev.error
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if isinstance(e, GuestError):
                return "guest_error", status.GUEST_FAILURE, f"vCPU {ev.vcpu}: {msg}", None
            if isinstance(e, (KvmError, PykvmError)):
                return "vmm_error", status.VMM_ERROR, f"vCPU {ev.vcpu}: {msg}", None
            return ("handler_error", status.VMM_ERROR,
                    f"vCPU {ev.vcpu}: exit handler raised {type(e).__name__}: {msg}", None)
        if ev.kind == "budget":
            return "budget", status.TIMEOUT, "exit budget used up", None
        return ev.kind, status.VMM_ERROR, "run stopped before the guest finished", None

    def close(self) -> None:
        """Stop every vCPU (waiting until each has left KVM_RUN), then close the VM, its memory
        and (if the machine opened it) /dev/kvm. Idempotent; safe from any thread, including
        while :meth:`run` is in progress elsewhere (that run then raises Closed)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._kick_all()
        close = getattr(getattr(self, "platform", None), "close", None)
        if close is not None:
            close()                        # platform timers and threads
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
