"""A small machine: VM + RAM + vCPUs + the platform's devices + a loaded guest.

    with Machine("hello") as m:
        result = m.run(timeout=5)
        print(result.console_text, result.exit_code)

For tests, :meth:`Machine.step` runs one vCPU until the guest reports something (the kernel
selftests' "run, read the guest's report, assert" loop).
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time

from ._record import field, Record
from . import abi, status
from . import guests
from .boot import read_head
from .arch.x86 import paging
from .arch.x86.paging import PageAllocator
from .boot.symbols import GuestGlobals, Symbols
from .platform import MachineControl, choose as choose_platform
from .errors import (Busy, Closed, GuestError, GuestMemoryError, HostResourceError,
                     InvalidArgument, KvmError, MachineEnded, PykvmError, host_resource_error,
                     shown)
from .exits import Exit
from .devices.virtio.fs import VirtioFs
from .kvm import Kvm
from .report import GuestAssertion, Report
from .runloop import ConsoleBuffer, LoopBase, RunLoop, exit_reason
from .status import debug_exit_status
from .rewind import MachineBaseline
from . import snapshot as _snapshot

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import (Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple,
                        Union)


class Event(Record, slots=True):
    """What :meth:`Machine.step` returns.

    ``kind``: "report" (``report`` holds a SYNC/DONE/ASSERT/... :class:`Report`), "debug_exit"
    (``value``: what the guest wrote), "exit" (``exit``: an exit nobody handled, or one whose
    :meth:`Machine.on` handler ended the step, ``value`` then holding what the handler
    returned), "timeout", "kick", "budget", or "error" (only from :meth:`Machine.run`:
    ``error`` holds the exception a vCPU's thread raised)."""
    kind: str
    vcpu: int = 0
    report: Optional[Report] = None
    exit: Optional[Exit] = None
    value: Optional[object] = None
    error: Optional[BaseException] = None

    @property
    def name(self) -> str:
        """A short name: the report kind, the exit name, or ``kind``."""
        if self.kind == "report":
            return self.report.kind
        if self.kind == "exit":
            return self.exit.name
        return self.kind


class RunResult(Record):
    """How :meth:`Machine.run` ended.

    ``exit``: "done", "debug_exit", "timeout", a report kind ("assert", "exception", "trap"),
    "guest_error", "vmm_error", "handler_error", "stopped" (:meth:`Machine.stop`, status 0),
    or the name of an unhandled exit ("HLT", "SHUTDOWN", "MMIO"...). ``exit_code``: the status ``pykvm run`` exits with (see
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
    guest's name or a source to build), or a file that exists under that name (``Image``,
    ``vmlinux`` in the current directory: as for QEMU's -kernel, a path naming a file wins over
    a built-in guest's name)."""
    return not name.endswith((".c", ".S")) and ("/" in name or name.endswith((".elf", ".bin"))
                                                or os.path.isfile(name))


# Kept for callers of earlier versions; see pykvm.status for the whole table.
EXIT_TIMEOUT = status.TIMEOUT
EXIT_GUEST_FAILURE = status.GUEST_FAILURE
PAUSE = "pause"                      # the owner of pause()'s hold (Machine.hold)


def _one_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


def _exit_brief(ex) -> str:
    """A short description of the exit being served (``"MMIO write at 0x..."``)."""
    if ex is None:
        return ""
    try:
        return f"{ex.name} exit {ex!r}"
    except Exception:                          # noqa: BLE001 — a stale or odd exit
        return f"{ex.name} exit"


def _guest_fault(ex, e: GuestMemoryError) -> GuestError:
    """The guest's fault for a guest-chosen address outside RAM (``e``) met while serving
    ``ex`` (or None when unknown): one line naming both."""
    what = _exit_brief(ex)
    return GuestError(f"guest fault: {_one_line(e)}" + (f" (serving its {what})" if what else ""))


def _seconds(what: str, value: object, none_ok: bool = True) -> Optional[float]:
    """``value`` checked as the duration argument ``what`` of a public method: None where
    ``none_ok``, else an int or float (not a bool) from 0 to ``threading.TIMEOUT_MAX``
    seconds, returned as a float. Raises :class:`~pykvm.errors.InvalidArgument` for anything
    else (NaN, infinities, negative or absurdly large values, strings)."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{what} must be a number of seconds"
                              f"{' or None' if none_ok else ''}, not {shown(value)}")
    if not 0 <= value <= threading.TIMEOUT_MAX:        # NaN fails the comparison too
        raise InvalidArgument(f"{what} must be a finite number of seconds from 0 to "
                              f"{threading.TIMEOUT_MAX:.0f}, not {shown(value)}")
    return float(value)


def _budget_left(loop: "LoopBase", budget: int, start_exits: int) -> Optional[int]:
    """The exits a step of ``budget`` exits (0: no cap) begun when ``loop`` had handled
    ``start_exits`` may still handle: 0 for no cap, None once the budget is spent."""
    if not budget:
        return 0
    left = budget - (loop.exits_total - start_exits)
    return left if left > 0 else None


class Machine:
    """A VM with RAM, ``vcpus`` vCPUs and ``guest`` loaded (a built-in guest name, a path, or
    image bytes) on the machine ``machine``: "pc" or "bare" on x86, "virt" on RISC-V, or "auto"
    (the default: :func:`pykvm.platform.choose` picks by the image). Other keyword options go
    to the machine (pc: ``devices``, ``cpuid``; bare: ``irqchip``, ``pit``, ``cpuid``; virt:
    ``cpu_type``, ``disable``, ``suspend_seconds``, ...).

    ``disks``: virtio-blk disks (a list; None: none), each a raw image path with kvmtool's
    options (``"FILE[,ro][,serial=NAME]"``, a comma in FILE written ``,,``), an
    :class:`os.PathLike` or a :class:`pykvm.devices.virtio.blk.VirtioBlk`; ``rng`` (bool): a
    virtio-rng device; ``console``: "serial" (the 16550 only) or "virtio" (also a virtio
    console, :attr:`virtio_console`, whose output joins :attr:`console` and whose ``feed(bytes)``
    is its input); ``nets``: virtio-net interfaces (a list), each
    ``"user|tap[,ifname=NAME][,mac=MAC][,mtu=N][,link=up|down]"`` (user: passt; tap: a tap
    device created or attached) or a :class:`pykvm.devices.virtio.net.VirtioNet`; ``vsock``: a
    virtio-vsock device bridged to Unix sockets as Firecracker's (None: none), given as
    ``"cid=N,uds=PATH"``, a :class:`pykvm.devices.virtio.vsock.VsockSpec` or a
    :class:`~pykvm.devices.virtio.vsock.VirtioVsock` (host processes connect to PATH and write
    ``CONNECT <port>``; the guest's connections to host port P go to ``PATH_P``); ``shares``:
    host directories in the guest through virtio-fs (a list), each ``"DIR[,tag=TAG][,ro]"``
    (the guest mounts it with ``mount -t virtiofs TAG DIR``; tag default ``hostshare``), a
    :class:`pykvm.devices.virtio.fs.ShareSpec` or a :class:`~pykvm.devices.virtio.fs.VirtioFs`,
    each served by a virtiofsd of its own (the Debian package ``virtiofsd``); with a share, all
    guest RAM is a shared memfd (:attr:`pykvm.vm.Vm.shared_memory`). They are
    virtio 1.2 devices on the machine's transport (pc: PCI functions 00:04.0 onwards, in this
    order; auto picks pc for them); the machine closes them.

    ``mem_size``: guest RAM in bytes (mapped ``MAP_NORESERVE``: it costs host memory only as
    the guest touches it). ``console_limit``: bytes of console output kept in :attr:`console`
    (older bytes are counted in ``console_dropped``; ``on_console`` still sees everything).
    ``report_limit``: guest reports kept in :attr:`reports` (more are counted in
    ``reports_dropped``). ``initrd``: paths of files to hand the guest (QEMU's ``-initrd``: on
    x86 multiboot each is a module; on RISC-V the one file is the initrd). ``loop``: the run-loop
    class for each vCPU, called as ``loop(vcpu, config=, on_console=)``
    (:class:`~pykvm.runloop.RunLoop`, the C loop, by default; the reference Python loop of
    :mod:`pykvm.testing` serves differential tests). ``vm_setup``: a callable taken with the
    new :class:`~pykvm.vm.Vm` right after KVM_CREATE_VM, before the machine adds memory, the
    irqchip and the vCPUs, for the VM ioctls KVM accepts only then (``vm.ioctl(
    "KVM_SET_BOOT_CPU_ID", 1)``, ``vm.enable_cap(...)`` of a VM capability,
    ``vm.enable_dirty_ring(size)``); what it raises closes the machine and propagates.

    Raises :class:`ValueError` for bad arguments — among them options the machine cannot
    honour, refused before any VM is created and naming the limit (more vCPUs than KVM allows,
    KVM_CAP_MAX_VCPUS / KVM_CAP_MAX_VCPU_ID, or than the platform's tables can describe, e.g.
    the pc machine's 255) —, :class:`~pykvm.boot.LoadError` for a bad image,
    :class:`~pykvm.errors.HostResourceError` when the host runs out of something (its
    ``resource``: memory — :class:`~pykvm.errors.HostMemoryError` —, file descriptors,
    threads) and :class:`~pykvm.errors.KvmError` when KVM refuses a step. :meth:`close` may be
    called from any thread at any time; afterwards every method raises
    :class:`~pykvm.errors.Closed`."""

    def __init__(self, guest: Union[str, bytes, None] = None, *, mem_size: int = 64 << 20,
                 vcpus: int = 1, cmdline: str = "", loop: Optional[Callable] = None, kvm: Optional[Kvm] = None,
                 on_console: Optional[Callable[[bytes], None]] = None,
                 flat_addr: Optional[int] = None, flat_mode: str = "real",
                 console_limit: int = 1 << 20, report_limit: int = 4096,
                 initrd: Sequence[str] = (), machine: str = "auto", disks: Sequence = (),
                 rng: bool = False, console: str = "serial", nets: Sequence = (),
                 vsock=None, shares: Sequence = (), vm_setup: Optional[Callable] = None,
                 **platform_opts):
        if not isinstance(vcpus, int) or isinstance(vcpus, bool):
            raise InvalidArgument(f"vcpus must be an integer, not {shown(vcpus)}")
        if vcpus < 1:
            raise InvalidArgument(f"a machine needs at least one vCPU, got {shown(vcpus)}")
        if not isinstance(mem_size, int) or isinstance(mem_size, bool) or mem_size < 1:
            raise InvalidArgument(f"mem_size must be a positive number of bytes (an int), "
                                  f"not {shown(mem_size)}")
        if isinstance(guest, str) and not guest:
            raise InvalidArgument("guest must name a built-in guest or an image file, not ''")
        if not (isinstance(loop, type) and issubclass(loop, LoopBase)) and loop is not None:
            raise InvalidArgument(f"loop must be a run-loop class (pykvm.runloop.RunLoop or a "
                                  f"subclass of LoopBase), not {shown(loop)}")
        for name, value in (("console_limit", console_limit), ("report_limit", report_limit)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(f"{name} must be an int >= 0, not {shown(value)}")
        for name, fn in (("on_console", on_console), ("vm_setup", vm_setup)):
            if fn is not None and not callable(fn):
                raise InvalidArgument(f"{name} must be callable or None, not {shown(fn)}")
        if kvm is not None and not isinstance(kvm, Kvm):
            raise InvalidArgument(f"kvm must be a pykvm.kvm.Kvm (an open /dev/kvm) or None, "
                                  f"not {shown(kvm)}")
        self._closed = False
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self._console = ConsoleBuffer(console_limit, on_console)
        self.reports: List[Report] = []
        self.report_limit = report_limit
        self.reports_dropped = 0
        self.handlers: Dict[str, Callable] = {}
        self._trace: Optional[Callable[[str], None]] = None
        self._in_loops: Dict[str, Callable] = {}   # the handlers the run loops call now
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._run_owner: Optional[object] = None   # the token of the run() in progress
        self._stop = False                 # a plain flag: set from signal handlers too
        self.vcpu_count = vcpus            # known to the platform before the vCPUs exist
        self._ended: Optional[str] = None  # why the machine cannot run again, once it cannot
        # vCPUs whose guest reported done (index -> the report): a later run or step does not
        # resume them past it; kept by checkpoint()/reset() and by snapshots (finished_vcpus)
        self._finished: Dict[int, Report] = {}
        self._finished_at_checkpoint: Dict[int, Report] = {}
        self._symbols = None               # the image's symbol table, read on first need
        self.virtio_console = None         # the virtio console (console="virtio"), if any
        self._virtio: Sequence = ()        # virtio models made here, closed with the machine
        # pause()/resume()/stop() (the control socket's verbs): the vCPUs pause() holds wait on
        # _pause_cv; _pauses counts pause() calls, so that a vCPU tells a pause's kick (taken
        # at once, or after it was already held) from one that ends the run
        self._pause_cv = threading.Condition()
        # who holds the vCPUs out of KVM_RUN now (hold()): "pause" for pause() until resume(),
        # "gdb" for a debugger's stop, a token of its own for each short internal hold
        self._holders: set = set()
        self._pauses = 0                   # pause() calls begun (counted before their kicks)
        self._pauses_kicked = 0            # _pauses when no pause() was still kicking
        self._pauses_kicking = 0           # pause() calls sending their kicks now
        self._kicks_seen: Dict[int, int] = {}   # vCPU -> _pauses when its last kick was taken
        self._held: set = set()            # vCPUs held by pause() now
        self._held_time: Optional[int] = None   # the guest's time while every vCPU is held
        # vCPUs that may enter KVM_RUN now: every vCPU of the run in progress from the moment
        # it starts (set under _pause_cv with _run_owner, so a hold never counts a vCPU whose
        # thread has not started yet as held) until its part ends, and the vCPU of each step()
        # another thread makes between runs
        self._active: set = set()
        # in a run's vCPU thread: the index of the vCPU it runs (a holding() block opened from
        # its exit handler or console callback counts that vCPU as out of KVM_RUN)
        self._run_tls = threading.local()
        # (thread ident, token) of each holding() block in force: no run or step starts and no
        # other thread's block begins until they end (blocks of one thread may nest)
        self._exclusive: List[Tuple[int, object]] = []
        # holding() calls waiting for another thread's block to end, in arrival order: a block
        # begins only when no other thread's waiter is ahead of it, so a thread that resets in
        # a loop cannot starve another thread's snapshot
        self._block_waiters: List[Tuple[int, object]] = []
        # vCPU index -> (thread ident, token) of each step() in progress between runs
        self._steppers: Dict[int, Tuple[int, object]] = {}
        self._stop_reason: Optional[str] = None   # why stop() ends the run
        self._baseline: Optional[MachineBaseline] = None   # checkpoint()'s, for reset()
        # host patches to guest RAM (a debugger's breakpoints): GPA -> (original, patched)
        self.ram_patches: Dict[int, Tuple[bytes, bytes]] = {}
        self._patch_lock = threading.RLock()
        try:
            if console not in ("serial", "virtio"):
                raise InvalidArgument(f"console must be 'serial' or 'virtio', not {shown(console)}")
            if disks is None:
                disks = ()
            if isinstance(disks, (str, bytes)) or not isinstance(disks, (list, tuple)):
                raise InvalidArgument(f"disks must be a list of disk images, not {shown(disks)}")
            if not isinstance(rng, bool):
                raise InvalidArgument(f"rng must be True or False, not {shown(rng)}")
            if nets is None:
                nets = ()
            if isinstance(nets, (str, bytes)) or not isinstance(nets, (list, tuple)):
                raise InvalidArgument(f"nets must be a list of networks, not {shown(nets)}")
            if shares is None:
                shares = ()
            if isinstance(shares, (str, bytes)) or not isinstance(shares, (list, tuple)):
                raise InvalidArgument(f"shares must be a list of shared directories, "
                                      f"not {shown(shares)}")
            if disks or rng or console != "serial" or nets or vsock is not None or shares:
                platform_opts["virtio_spec"] = (tuple(disks), bool(rng), console, tuple(nets),
                                                vsock, tuple(shares))
            image = guest
            if guest is None or (isinstance(guest, str) and not _is_image_path(guest)):
                image = guests.path(guest or guests.DEFAULT_GUEST)
            self.image_name = image if isinstance(image, str) else "<bytes>"
            # what Machine.snapshot() records to build the machine again (pykvm.snapshot)
            self._snapshot_config = dict(
                image=image, initrd=tuple(initrd), mem_size=mem_size, cmdline=cmdline,
                flat_addr=flat_addr, flat_mode=flat_mode, machine=machine,
                platform_opts={k: v for k, v in platform_opts.items() if k != "virtio_spec"})
            cls, fmt, platform_opts = choose_platform(machine, read_head(image),
                                                      **platform_opts)
            spec = platform_opts.pop("virtio_spec", None)
            if spec is not None:
                self._make_virtio(cls, spec, platform_opts)
            self._check_vcpu_limits(vcpus, cls, fmt, dict(platform_opts, flat_mode=flat_mode))
            self.vm = self.kvm.create_vm()
            if vm_setup is not None:
                vm_setup(self.vm)          # VM ioctls that must come before memory and vCPUs
            # virtio-fs: virtiofsd maps guest RAM, so all of it is a shareable memfd
            self.vm.shared_memory = any(isinstance(d, VirtioFs) for d in self._virtio)
            control = MachineControl(console=self._console_out, stopping=self._stopping,
                                     kick=self._kick_one, in_run=self._in_run)
            self.platform = cls(self.vm, self.kvm, control, vcpus=vcpus, mem_size=mem_size,
                                **platform_opts)
            self.ram = self.platform.ram
            self.image = self.platform.load(image, cmdline=cmdline, initrd=tuple(initrd),
                                            flat_addr=flat_addr, flat_mode=flat_mode)
            self.vcpus = [self.vm.create_vcpu(i) for i in range(vcpus)]
            for i, v in enumerate(self.vcpus):
                self.platform.setup_vcpu(v, i)
            loop_class = loop or RunLoop
            config = self.platform.loop_config()
            config.console_limit = 0           # the machine keeps the console, not each loop
            self.loops = [loop_class(v, config=config, on_console=self._console_out)
                          for v in self.vcpus]
        except BaseException as e:
            self.close()
            hr = host_resource_error(e)
            if hr is not None and hr is not e:
                raise hr from e                # the host ran out of something: say which
            raise

    def _make_virtio(self, cls, spec, platform_opts: dict) -> None:
        """Build the virtio models ``spec`` = (disks, rng, console, nets, vsock, shares) asks for
        through the machine class's ``make_virtio`` (machines with a virtio transport have one) and add them to its
        ``virtio`` option; the machine closes them. Raises ValueError for a bad value
        (:class:`~pykvm.devices.virtio.blk.DiskError` for a disk)."""
        disks, rng, console, nets, vsock, shares = spec  # choose_platform checked make_virtio
        devices, self.virtio_console = cls.make_virtio(disks, rng, console, self._console_out,
                                                       nets, vsock, shares=shares)
        self._virtio = tuple(devices)
        platform_opts["virtio"] = list(platform_opts.get("virtio") or ()) + devices

    def _check_vcpu_limits(self, vcpus: int, cls, image_format: str, options: dict) -> None:
        """Refuse (ValueError naming the limit) a vCPU count this KVM or the machine cannot
        honour, before any VM exists: KVM_CAP_MAX_VCPUS (else KVM_CAP_NR_VCPUS, the
        recommended count older kernels report) and KVM_CAP_MAX_VCPU_ID (ids run 0..vcpus-1),
        then the machine's own limit (``max_vcpus`` of the platform class ``cls``)."""
        kvm = self.kvm
        max_vcpus = kvm.check_extension("MAX_VCPUS") or kvm.check_extension("NR_VCPUS")
        if max_vcpus and vcpus > max_vcpus:
            raise ValueError(f"{vcpus} vCPUs requested; this KVM allows at most {max_vcpus} "
                             "(KVM_CAP_MAX_VCPUS)")
        max_id = kvm.check_extension("MAX_VCPU_ID")
        if max_id and vcpus > max_id:
            raise ValueError(f"{vcpus} vCPUs requested; this KVM's vCPU ids stop below "
                             f"{max_id} (KVM_CAP_MAX_VCPU_ID)")
        limit, why = cls.max_vcpus(image_format, **options)
        if limit is not None and vcpus > limit:
            raise ValueError(f"{vcpus} vCPUs requested; {why} at most {limit}")

    # -- the handles the platform gets (MachineControl) --------------------------------------
    def _stopping(self) -> bool:
        return self._stop or self._closed

    def _kick_one(self, index: int) -> None:
        self.loops[index].kick()

    def _in_run(self, index: int) -> bool:
        return self.vcpus[index].running

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
        return self._console.data

    @property
    def console_dropped(self) -> int:
        """Console bytes the guest wrote that :attr:`console` no longer holds."""
        return self._console.dropped

    @property
    def console_limit(self) -> int:
        """Bytes of console output :attr:`console` keeps (settable)."""
        return self._console.limit

    @console_limit.setter
    def console_limit(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(f"console_limit must be an int >= 0, not {shown(value)}")
        self._console.limit = value

    @property
    def on_console(self) -> Optional[Callable[[bytes], None]]:
        """Called with every piece of console output, as it comes (settable)."""
        return self._console.on_data

    @on_console.setter
    def on_console(self, fn: Optional[Callable[[bytes], None]]) -> None:
        self._console.on_data = fn

    def _console_out(self, data: bytes) -> None:
        self._console.append(data)

    # -- console input ------------------------------------------------------------------------
    def _serial(self):
        """The serial console's :class:`~pykvm.runloop.UartGroup`; ValueError if none."""
        self._check_open()
        loops = getattr(self, "loops", None) or ()
        c = loops[0].config if loops else None
        if c is None or c.uart_group is None or not (c.serial_base or c.uart_mmio_base):
            raise ValueError("this machine has no serial console to send input to")
        return c.uart_group

    def send_console(self, data: bytes) -> int:
        """Type ``data`` (bytes) into the guest's serial console: the 16550 the run loops serve
        (x86 pc and bare machines: COM1 at port 0x3F8, on IRQ 4 when the machine has an
        in-kernel irqchip; RISC-V virt: the ns16550a at 0x10000000). The bytes go to a 4 KiB
        input ring (:data:`pykvm.runloop.UartGroup.IN_CAP`) that feeds the UART's receiver as
        the guest reads it (LSR.DR, RBR, the 16-byte FIFO, the received-data interrupt, which
        wakes a vCPU halted with interrupts on), so nothing accepted is lost or reordered.

        Returns how many leading bytes of ``data`` were accepted: all of them, or fewer (0
        when the ring is full) while the guest has not read what waits; send the rest later.
        Never blocks; safe from any thread while :meth:`run` runs. Raises
        :class:`~pykvm.errors.Closed` after :meth:`close`, ValueError when the machine has no
        serial console (RISC-V ``uart=False``), TypeError for a ``str``."""
        return self._serial().feed(data)

    def flush_console(self) -> None:
        """Hand the serial console output the guest has written so far to :attr:`console`
        and ``on_console`` now, from any thread (an interactive console calls it a few times
        a second). Without it, output waits for its vCPU to leave the run loop (at most
        ``console_flush`` after the next UART access, or at the run's end), which a guest
        halted waiting for input does not do. Raises :class:`~pykvm.errors.Closed` after
        :meth:`close`, ValueError when the machine has no serial console."""
        self._serial().drain(self._console_out)

    def _keep_report(self, rep: Report) -> None:
        with self._lock:
            if len(self.reports) < self.report_limit:
                self.reports.append(rep)
            else:
                self.reports_dropped += 1

    def on(self, exit_name: Union[str, int], handler: Optional[Callable]) -> None:
        """Handle exits named ``exit_name`` ("MMIO", "IO", "HLT", ..., "KVM_EXIT_IO" or the
        number, any case; anything else raises ValueError, a non-callable handler TypeError):
        ``handler(machine,
        vcpu_index, exit)`` returns None to resume the guest, or anything else to end the step
        with an "exit" event. ``handler=None`` removes it.

        The run loop calls the handler itself, from inside the loop (no Python between them, no
        return through :meth:`step` per exit), after what comes first in every path (see
        :meth:`_serve`): guest reports and MMIO exits in guest RAM never reach it. Its exit
        object is valid during the call and is reused for later exits unless the handler keeps
        a reference to it. While :attr:`trace` is set, every exit goes through :meth:`step`."""
        n = exit_reason(exit_name)          # "io", "KVM_EXIT_IO" and 2 all name "IO"
        if n not in abi.EXIT_NAMES:
            raise ValueError(f"unknown exit reason {exit_name!r}")
        exit_name = abi.EXIT_NAMES[n]
        if handler is not None and not callable(handler):
            raise TypeError(f"an exit handler must be callable or None, not {handler!r}")
        if handler is None:
            self.handlers.pop(exit_name, None)
        else:
            self.handlers[exit_name] = handler
        self._sync_loops()

    @property
    def trace(self) -> Optional[Callable[[str], None]]:
        """Called with one line (str) per event and exit while set; None: no tracing."""
        return self._trace

    @trace.setter
    def trace(self, fn: Optional[Callable[[str], None]]) -> None:
        self._trace = fn
        self._sync_loops()

    def _sync_loops(self) -> None:
        """Give each run loop the handlers of :meth:`on`, each bound to this machine and the
        vCPU's index (``functools.partial``, called from C), none while tracing; guard the
        guest RAM slots there are now (:meth:`RunLoop.guard_ram`)."""
        loops = getattr(self, "loops", ())
        want = {} if self._trace is not None else dict(self.handlers)
        if not loops:
            return
        guard = [(s.gpa, s.size) for s in self.vm.memory if not s.readonly]
        for i, loop in enumerate(loops):
            loop.guard_ram(guard)
            for name in self._in_loops.keys() - want.keys():
                try:
                    loop.on(name, None)
                except ValueError:
                    pass
            for name, h in want.items():
                try:
                    loop.on(name, functools.partial(h, self, i))
                except ValueError:             # not an exit reason the loop knows: step() serves it
                    pass
        self._in_loops = want

    def _serve(self, index: int, ex) -> Optional[Event]:
        """Serve exit ``ex`` of vCPU ``index`` in the one order every path uses: a guest report
        (PRINT goes to the console), guest RAM the host failed to back (never a device's), the
        handler of :meth:`on`, the platform. Returns None to resume the guest, else the
        :class:`Event` that ends the step. A :class:`~pykvm.errors.GuestMemoryError` met on the
        way is the guest's fault (:class:`~pykvm.errors.GuestError`, naming the exit)."""
        rep = self.platform.report_from_exit(index, ex)
        if rep is not None:
            rep.vcpu = index
            if rep.kind in ("exception", "trap"):
                rep.locate(self.symbols)       # "in guest_main (my_guest.c:12)"
            if self.trace:
                self.trace(f"vcpu{index}: guest report {rep.describe()}")
            if rep.kind == "print":
                self._console_out(rep.text.encode())
                return None
            self._keep_report(rep)
            return Event("report", index, report=rep)
        if ex.name == "MMIO" and self._unbacked_ram(ex) is not None:
            return Event("exit", index, exit=ex)   # no device lives in RAM: the host failed
        handler = self.handlers.get(ex.name)
        try:
            if handler is not None:
                r = handler(self, index, ex)
                return None if r is None else Event("exit", index, exit=ex, value=r)
            if self.platform.handle_exit(index, ex):
                return None
        except GuestMemoryError as e:          # a guest-chosen address outside RAM
            raise _guest_fault(ex, e) from e
        return Event("exit", index, exit=ex)

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
        handles (0 = no cap), PRINT reports included. A step that ends by its deadline or
        budget leaves the vCPU where it stopped: the next step runs on from there.

        A step is a run of one vCPU for the holds (:meth:`pause`, :meth:`hold`,
        :meth:`holding` of another thread): it waits while one is in force (its deadline still
        counts: "timeout" when it passes, the guest not having run; a hold of the calling
        thread's own therefore waits until that deadline), and a hold that comes during the
        step kicks it out of KVM_RUN, holds it, then lets it step on. :meth:`kick_all` and
        :meth:`stop` end it with "kick".

        Raises :class:`~pykvm.errors.Busy` while :meth:`run` is in progress, while another
        thread (or an exit handler of this step) steps the same vCPU, and inside a
        :meth:`holding` block of the calling thread; :class:`~pykvm.errors.Closed` after
        :meth:`close`, :class:`~pykvm.errors.GuestError`
        for a report pykvm cannot read or a guest-chosen address outside guest RAM met while
        serving an exit (a :class:`~pykvm.errors.GuestMemoryError` from a handler or device
        becomes one, naming the exit), :class:`~pykvm.errors.KvmError` if KVM_RUN fails
        (:class:`~pykvm.errors.GuestRamUnbacked` when the host could not back guest RAM), and
        whatever else an exit handler raises."""
        self._check_open()
        if not isinstance(index, int) or not 0 <= index < len(self.loops):
            raise IndexError(f"no vCPU {index!r} (this machine has {len(self.loops)})")
        timeout = _seconds("Machine.step: timeout", timeout)
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise InvalidArgument(f"Machine.step: budget must be an int >= 0 (0: no cap), "
                                  f"not {shown(budget)}")
        deadline = time.monotonic() + timeout if timeout else None
        loop = self.loops[index]
        start_exits = loop.exits_total
        entry = (threading.get_ident(), object())
        try:
            while True:
                left = _budget_left(loop, budget, start_exits)
                if left is None:
                    return Event("budget", index)
                if not self._start_step(index, deadline, entry):
                    return Event("timeout", index)
                done = self._finished.get(index)
                if done is not None:               # not resumed past its DONE report
                    return Event("report", index, report=done)
                sent = self._pauses_kicked         # holds whose kicks this step may take
                ev = self._step(index, deadline, left)
                if ev.kind == "kick" and not self._stop and self._pause_kick(index, sent):
                    self._end_step(index, entry)   # a hold's kick: wait for it, then on
                    continue
                self._note_done(ev)
                return ev
        finally:
            self._end_step(index, entry)

    def _note_done(self, ev: Event) -> None:
        """Remember a vCPU whose guest reported done (:attr:`finished_vcpus`)."""
        if ev.kind == "report" and ev.report is not None and ev.report.kind == "done":
            self._finished[ev.vcpu] = ev.report

    @property
    def finished_vcpus(self) -> frozenset:
        """The indices (ints) of the vCPUs whose guest reported done (GUEST_DONE) in a run or
        a step. Such a vCPU is not resumed past its report: a later :meth:`run` counts it as
        done at once, and :meth:`step` returns its DONE report again without entering
        KVM_RUN. The guest has finished once every vCPU is in it. :meth:`reset` returns the
        set to the one at :meth:`checkpoint`; a snapshot carries it (docs/snapshots.md)."""
        return frozenset(self._finished)

    def _end_step(self, index: int, entry: Tuple[int, object]) -> None:
        """Drop the claim ``entry`` of :meth:`_start_step` (by identity: nothing when it is
        not the claim in force, e.g. a step interrupted before it claimed)."""
        with self._pause_cv:
            if self._steppers.get(index) is entry:
                del self._steppers[index]
                self._active.discard(index)
                self._pause_cv.notify_all()

    def _start_step(self, index: int, deadline: Optional[float],
                    entry: Tuple[int, object]) -> bool:
        """Claim vCPU ``index`` for a :meth:`step` between runs (``entry``: the caller's
        thread ident and a token): wait while a hold (:meth:`pause`, :meth:`hold`) or another
        thread's :meth:`holding` block is in force, then count the vCPU as able to enter
        KVM_RUN (a hold sent from now on kicks the step, which waits for it to end and steps
        on). False when ``deadline`` passes while waiting. Raises
        :class:`~pykvm.errors.Busy` while :meth:`run` is in progress, when the vCPU is being
        stepped in another thread, or when the caller is inside a :meth:`holding` block of its
        own; :class:`~pykvm.errors.Closed` when the machine is closed."""
        me = entry[0]
        with self._pause_cv:
            while True:
                self._check_open()
                if self._run_owner is not None:
                    raise Busy("Machine.step: the machine is running (Machine.run is in "
                               "progress)")
                if any(t == me for t, _ in self._exclusive):
                    raise Busy("Machine.step: called inside a hold of the machine "
                               "(Machine.holding) by the same thread")
                if not self._exclusive and not self._holders:
                    break
                wait = 0.05
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    wait = min(wait, left)
                self._pause_cv.wait(wait)
            if index in self._active:
                raise Busy(f"Machine.step: vCPU {index} is being stepped already (another "
                           "thread, or an exit handler of this step)")
            self._steppers[index] = entry
            self._active.add(index)
        return True

    def _step(self, index: int, deadline: Optional[float], budget: int) -> Event:
        """The body of :meth:`step` (``deadline``: ``time.monotonic()`` seconds or None), for a
        step or a run that has claimed the vCPU."""
        loop = self.loops[index]
        start_exits = loop.exits_total
        while True:
            left = _budget_left(loop, budget, start_exits)
            if left is None:
                return Event("budget", index)
            try:
                stop = loop.run(deadline=deadline, budget=left)
            except GuestMemoryError as e:      # from a handler of on(): the guest's fault
                raise _guest_fault(loop.failed_exit, e) from e
            if stop.kind == "debug_exit":
                return Event("debug_exit", index, value=stop.value)
            if stop.kind != "exit":
                return Event("timeout" if stop.kind == "deadline" else stop.kind, index)
            ex = stop.exit
            if stop.result is not None:        # a handler of on() ended the step
                return Event("exit", index, exit=ex, value=stop.result)
            if self.trace:
                self.trace(f"vcpu{index}: {ex!r}")
            ev = self._serve(index, ex)
            if ev is not None:
                return ev

    def expect(self, kind: str, index: int = 0, *, timeout: Optional[float] = 10.0) -> Event:
        """Step and insist on a report of ``kind`` ("sync", "done"); a guest assertion or
        exception raises :class:`~pykvm.report.GuestAssertion`, anything else AssertionError."""
        __tracebackhide__ = True         # pytest: the failure is reported at the caller's line
        ev = self.step(index, timeout=timeout)
        if ev.kind == "report" and ev.report.kind in ("assert", "exception", "trap"):
            raise GuestAssertion(ev.report)
        if ev.name != kind:
            raise AssertionError(f"expected a guest {kind} report from vCPU {index}, got "
                                 f"{self.describe(ev)}")
        return ev

    def sync(self, index: int = 0, stage: Optional[int] = None, *, timeout: float = 10.0):
        """Expect GUEST_SYNC (optionally of ``stage``) and return its values after the stage."""
        __tracebackhide__ = True
        ev = self.expect("sync", index, timeout=timeout)
        if stage is not None and ev.report.stage != stage:
            raise AssertionError(f"guest synced stage {ev.report.stage}, expected {stage}")
        return ev.report.values_list

    def done(self, index: int = 0, *, timeout: float = 10.0) -> None:
        """Expect GUEST_DONE from vCPU ``index`` within ``timeout`` seconds (see :meth:`expect`)."""
        __tracebackhide__ = True
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
        for lp in getattr(self, "loops", ()):
            try:
                lp.kick()
            except Closed:
                pass

    def _run_one(self, index: int, deadline: Optional[float], results: list) -> None:
        """One vCPU's part of :meth:`run`: every outcome, exceptions included, lands in
        ``results[index]``; anything but DONE stops the other vCPUs. The calling thread (a
        vCPU thread, or run()'s own for a one-vCPU machine) is marked as running vCPU
        ``index`` meanwhile (``_run_tls``: see :meth:`holding`)."""
        self._run_tls.index = index
        try:
            done = self._finished.get(index)
            if done is not None:               # reported done in an earlier run or step
                ev = results[index] = Event("report", index, report=done)
                return
            while True:
                if self._stop:
                    results[index] = Event("kick", index)
                    return
                if self._holders:                  # pause()/hold(): held here until released
                    ev = self._hold(index, deadline)
                    if ev is None:
                        continue
                    results[index] = ev
                    break
                left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
                sent = self._pauses_kicked         # pauses whose kicks this step may take
                ev = self._step(index, None if left is None else time.monotonic() + left, 0)
                if ev.kind == "report" and ev.report.kind == "sync":
                    continue                       # nobody waits for syncs in a plain run
                if ev.kind == "kick" and not self._stop and self.platform.hold(index):
                    continue                       # the platform paused this vCPU (x86 S3)
                if ev.kind == "kick" and not self._stop and self._pause_kick(index, sent):
                    continue                       # pause()'s kick: the loop's top holds it
                results[index] = ev
                self._note_done(ev)
                break
        except Exception as e:  # noqa: BLE001 — guest, KVM or handler error: the result
            ev = results[index] = Event("error", index, error=e)
        finally:
            self._run_tls.index = None
            with self._pause_cv:
                self._active.discard(index)
                self._pause_cv.notify_all()
        if not (ev.kind == "report" and ev.report.kind == "done"):
            self._kick_all()                       # one vCPU ending the machine stops the rest

    # -- pause, resume, stop (pykvm.control serves them on a socket) ---------------------------
    def _pause_kick(self, index: int, sent: int) -> bool:
        """vCPU ``index``'s run returned "kick": True when pause() may have sent it (a pause
        came since this vCPU last took a kick), False when the kick ends the run.

        Kicks do not queue: one taken kick answers every kick sent before it, but a pause
        still kicking may send its kick after the C loop took this one, and that late kick
        must read as the pause's, not as the run's end. So a taken kick answers only the
        pauses that had sent all their kicks before the step began (``sent``: the step's
        snapshot of ``_pauses_kicked``)."""
        with self._pause_cv:
            seen = self._kicks_seen.get(index, 0)
            self._kicks_seen[index] = sent
            return seen != self._pauses

    def _hold(self, index: int, deadline: Optional[float]) -> Optional[Event]:
        """Hold vCPU ``index`` (out of KVM_RUN, in its own thread) while :meth:`pause` is in
        force; None once :meth:`resume` lets it run on, else the :class:`Event` that ends its
        part of the run: "timeout" when ``deadline`` (``time.monotonic()`` seconds) passes
        while held, "kick" when the machine is stopped or closed.

        A Linux guest held for longer than its watchdog threshold must not report a soft
        lockup or an RCU stall when it runs on, so each arch does what QEMU does for a stopped
        VM: before it counts as held, the vCPU tells its guest it is being held
        (:meth:`pykvm.vcpu.Vcpu.notify_paused`: KVM_KVMCLOCK_CTRL on x86); the last vCPU to be
        held saves the guest's time (:meth:`pykvm.vcpu.Vcpu.save_guest_time`: the RISC-V timer's
        ``time``) and the first to leave puts it back before any vCPU re-enters KVM_RUN, so
        that the guest's time stands still while it is held."""
        vcpu = self.vcpus[index]
        vcpu.notify_paused()
        with self._pause_cv:
            self._held.add(index)
            if self._held_time is None and self._active <= self._held:
                self._held_time = vcpu.save_guest_time()
            self._pause_cv.notify_all()
            try:
                while self._holders and not self._stop and not self._closed:
                    wait = 0.05                    # signals and _kick_all() notify nobody
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return Event("timeout", index)
                        wait = min(wait, left)
                    self._pause_cv.wait(wait)
            finally:
                try:
                    # under the lock: no vCPU runs before it. While a holding() block reads
                    # or loads the vCPUs (a run ending under it), the block's end does it.
                    if self._held_time is not None and not self._exclusive:
                        self._put_back_held_time()
                finally:
                    self._held.discard(index)
                    self._pause_cv.notify_all()
        if self._stop or self._closed:
            return Event("kick", index)
        return None

    @property
    def running(self) -> bool:
        """True while :meth:`run` is in progress (in any thread), paused or not."""
        return self._run_owner is not None

    @property
    def paused(self) -> bool:
        """True while :meth:`pause` is in force and every vCPU of the run in progress (if
        any) is held out of KVM_RUN: the guest does not advance."""
        return self.held_for(PAUSE)

    @property
    def holders(self) -> frozenset:
        """Who holds the vCPUs out of KVM_RUN now (:meth:`hold`): ``"pause"`` (:meth:`pause`),
        ``"gdb"`` (a debugger's stop) and the private tokens of short internal holds
        (:meth:`holding`). Empty when nothing holds the guest."""
        with self._pause_cv:
            return frozenset(self._holders)

    def held_for(self, owner: Hashable) -> bool:
        """True while ``owner`` holds the machine (:meth:`hold`) and every vCPU of the run in
        progress (if any) is held out of KVM_RUN."""
        with self._pause_cv:
            return self._all_held_for(owner)

    def _all_held_for(self, owner: Hashable) -> bool:
        """:meth:`held_for` with ``_pause_cv`` already held."""
        return owner in self._holders and self._active <= self._held

    def pause(self, timeout: Optional[float] = 5.0) -> bool:
        """Stop every vCPU and hold it out of KVM_RUN until :meth:`resume` (kvmtool's
        ``pause``); a vCPU then runs on from where it stopped. Safe from any thread (not from a
        signal handler, nor from an exit handler of this machine's own vCPUs: it waits).

        Each vCPU is kicked (``immediate_exit`` then a signal, race-free with the C loop) and
        holds itself in its own thread when its run returns. A pause before :meth:`run` (or
        between runs) holds the vCPUs as the next run starts. A run's deadline still counts
        while it is paused: a run paused past its deadline ends with "timeout".
        :meth:`stop` and :meth:`close` end a paused run. Idempotent. This is the hold of
        owner ``"pause"`` (:meth:`hold`): a debugger's stop or a snapshot in progress holds the
        guest on its own, and :meth:`resume` does not release those.

        ``timeout``: seconds to wait until every running vCPU is held (None: no wait).
        Returns :attr:`paused` (False when some vCPU was not held in time, e.g. inside a
        slow exit handler: it is held when it next returns to the loop). Raises
        :class:`~pykvm.errors.Closed` after :meth:`close`."""
        return self.hold(PAUSE, timeout)

    def hold(self, owner: Hashable, timeout: Optional[float] = 5.0) -> bool:
        """Hold every vCPU out of KVM_RUN on behalf of ``owner`` (any hashable) until
        :meth:`release` of that owner, as :meth:`pause` does (it is ``hold("pause")``).
        Holds of different owners are independent: the guest runs again only once every
        owner has released it, so that a user's resume cannot let a guest go while a snapshot
        reads it or a debugger has it stopped. Idempotent per owner.

        ``timeout``: seconds to wait until every running vCPU is held (None: no wait).
        Returns :meth:`held_for` ``owner``. Raises :class:`~pykvm.errors.Closed` after
        :meth:`close`, :class:`~pykvm.errors.InvalidArgument` for a ``timeout`` that is not
        None or a finite number of seconds >= 0."""
        self._check_open()
        timeout = _seconds("Machine.hold: timeout", timeout)
        loops = getattr(self, "loops", ())
        with self._pause_cv:
            self._holders.add(owner)
            self._pauses += 1
            self._pauses_kicking += 1
            # only a vCPU that may be in KVM_RUN needs a kick: any other one checks _holders
            # before it enters (a run's loop top, _start_step), and takes no kick meant for it
            kick = [lp for i, lp in enumerate(loops) if i in self._active]
            for i in range(len(loops)):
                if i not in self._active:
                    self._kicks_seen[i] = self._pauses
        try:
            for lp in kick:
                try:
                    lp.kick()
                except Closed:
                    pass
        finally:
            with self._pause_cv:
                self._pauses_kicking -= 1
                if not self._pauses_kicking:
                    self._pauses_kicked = self._pauses
        if timeout is None:
            return self.held_for(owner)
        end = time.monotonic() + timeout
        with self._pause_cv:
            while owner in self._holders and not self._all_held_for(owner):
                left = end - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._pause_cv.wait(min(left, 0.05))
            return self._all_held_for(owner)

    def release(self, owner: Hashable) -> None:
        """End ``owner``'s hold (:meth:`hold`); the vCPUs run on once no other owner holds
        them. Nothing when ``owner`` holds nothing. Safe from any thread, also after
        :meth:`close`."""
        with self._pause_cv:
            self._holders.discard(owner)
            self._pause_cv.notify_all()

    @contextlib.contextmanager
    def holding(self, what: str, timeout: float = 10.0) -> Iterator[None]:
        """The machine's vCPUs kept out of KVM_RUN for the ``with`` block, for one thread to
        read or load their state (a snapshot, :meth:`checkpoint`, :meth:`reset`, the control
        socket's ``dump``). Every vCPU of a run in progress, or of a :meth:`step` another
        thread makes, is held by a hold of the block's own (:meth:`hold`) that no
        :meth:`resume` or :meth:`stop` releases (a step is kicked out of KVM_RUN and waits for
        the block's end to step on); a vCPU the calling thread itself steps (the block opened
        from an exit handler or a console callback of that step, or of that vCPU's thread of a
        run) is out of KVM_RUN already, and counts as held from the call on, also while the
        block waits for another thread's (whose hold would otherwise wait for it). Whether the machine runs or not, no
        :meth:`run` or :meth:`step` starts and no other thread's block begins until the block
        ends (they wait, blocks of other threads in the order they came; blocks of one thread
        nest), and a run that ends during the block
        leaves the vCPUs alone. A run or step the block's own thread starts raises
        :class:`~pykvm.errors.Busy`.

        ``timeout``: seconds to wait for another thread's block to end and for the vCPUs to
        be held. Raises :class:`~pykvm.errors.Busy` ("``what``: ...") when they are not in
        time; nothing stays held then, also when the wait is interrupted (KeyboardInterrupt)."""
        timeout = _seconds("Machine.holding: timeout", timeout, none_ok=False)
        me = threading.get_ident()
        entry = (me, object())
        end = time.monotonic() + timeout
        mine: set = set()                      # vCPUs this thread steps (out of KVM_RUN here)
        try:
            with self._pause_cv:
                # the vCPUs this thread itself steps or runs are out of KVM_RUN while it is
                # here: they count as held from now, also while the block waits for another
                # thread's, whose hold would otherwise wait for them (two vCPU threads opening
                # blocks at once from their callbacks would each wait out the timeout)
                here = {i for i, (t, _) in self._steppers.items() if t == me}
                own = getattr(self._run_tls, "index", None)
                if own is not None and self._run_owner is not None and own in self._active:
                    here.add(own)              # a run's vCPU thread: its own vCPU is here
                mine = here - self._held
                if mine:
                    self._held |= mine
                    self._pause_cv.notify_all()
                if not any(t == me for t, _ in self._exclusive):     # not a nested block
                    self._block_waiters.append(entry)
                    try:
                        while any(t != me for t, _ in self._exclusive) or any(
                                t != me for t, _ in
                                self._block_waiters[:self._block_waiters.index(entry)]):
                            self._wait_in_block(what, end, timeout,
                                                "another thread held the machine")
                    finally:
                        self._block_waiters.remove(entry)
                        self._pause_cv.notify_all()
                self._exclusive.append(entry)
                busy = self._run_owner is not None or bool(self._active - here)
            if busy:
                if not self.hold(entry[1], max(end - time.monotonic(), 0.0)):
                    self._check_open()
                    raise Busy(f"{what}: the running machine did not pause within "
                               f"{timeout:g} s")
                with self._pause_cv:        # a run whose vCPUs all left: let it finish
                    while self._run_owner is not None and not self._active:
                        self._wait_in_block(what, end, timeout, "the ending run did not finish")
            yield
        finally:
            self.release(entry[1])
            with self._pause_cv:
                self._held -= mine
                if entry in self._exclusive:
                    self._exclusive.remove(entry)
                if not self._exclusive and not self._held and self._held_time is not None:
                    self._put_back_held_time()
                self._pause_cv.notify_all()

    def _wait_in_block(self, what: str, end: float, timeout: float, why: str) -> None:
        """One wait of :meth:`holding` on ``_pause_cv`` (held by the caller): Closed once
        the machine is closed, Busy ("``what``: ``why`` within ``timeout`` s") at ``end``."""
        self._check_open()
        left = end - time.monotonic()
        if left <= 0:
            raise Busy(f"{what}: {why} within {timeout:g} s")
        self._pause_cv.wait(min(left, 0.05))

    def _put_back_held_time(self) -> None:
        """Give the guest back the time saved while every vCPU was held (``_held_time``, under
        ``_pause_cv``), before any vCPU enters KVM_RUN again (:meth:`_hold`)."""
        saved, self._held_time = self._held_time, None
        if saved is not None and self.vcpus:
            self.vcpus[0].restore_guest_time(saved)

    def resume(self) -> None:
        """Let the vCPUs :meth:`pause` holds run on (kvmtool's ``resume``); nothing when the
        machine is not paused. Other holds (:meth:`hold`: a debugger's stop, a snapshot in
        progress) keep the guest held until they end. Raises
        :class:`~pykvm.errors.Closed` after :meth:`close`."""
        self._check_open()
        self.release(PAUSE)

    def stop(self, reason: str = "stopped on request") -> None:
        """End the run in progress (or the next one, at once) as kvmtool's ``stop`` does: its
        :class:`RunResult` has ``exit`` "stopped", status 0 and ``detail`` ``reason`` (str).
        A paused machine's :meth:`pause` is released and its held vCPUs leave the run; other
        holds (:meth:`hold`: a debugger's stop, a snapshot being written) stay until their
        owners release them. Safe from any thread. Raises :class:`~pykvm.errors.Closed`
        after :meth:`close`."""
        self._check_open()
        with self._pause_cv:                   # one step with a run's start and its end
            self._stop_reason = str(reason)
            self._kick_all()
        self.release(PAUSE)

    def _vcpu_thread(self, index: int, deadline: Optional[float], results: list) -> None:
        # Process-directed signals (Ctrl-C, SIGTERM) belong to the main thread, which reacts
        # to them; a vCPU thread blocks them so they cannot stall in KVM_RUN there.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        self._run_one(index, deadline, results)

    def run(self, timeout: Optional[float] = None) -> RunResult:
        """Run every vCPU (one thread each) until the guest is done, exits, fails or times
        out, and return a :class:`RunResult` (console output, exit counts, verdict and
        status). A vCPU whose guest reported done earlier (:attr:`finished_vcpus`) is not run
        again: it counts as done at once.

        ``timeout``: seconds (None or 0 = no deadline). The first vCPU to fail (a guest
        failure, an unhandled exit, a KVM error, an exception from an exit handler) stops all
        the others and decides the result. A run that ends by its deadline (or by a kick)
        leaves every vCPU where it stopped: a later ``run()`` runs the guest on from there.
        If the calling thread is interrupted (e.g. KeyboardInterrupt), every vCPU is stopped
        before the exception propagates.

        Outcomes are classified by whose fault they are (:meth:`_verdict`): the guest's
        (a report, a guest-chosen address outside RAM met while serving its request:
        ``guest_error``, status 4), unhandled exits (6), the host's (a KVM ioctl failing,
        the host out of memory, file descriptors or threads, guest RAM the host could not
        back: ``vmm_error``, status 8) and exceptions of exit handlers (``handler_error``, 8).

        A run starts only once no other thread is inside :meth:`holding` (it waits for the
        block to end). Raises :class:`~pykvm.errors.Closed` if the machine is (or gets)
        closed, :class:`~pykvm.errors.Busy` if another thread is running it or stepping one
        of its vCPUs (:meth:`step`) or when called inside a :meth:`holding` block of the
        calling thread, and
        :class:`~pykvm.errors.MachineEnded` (one line saying why) when an earlier run ended
        the machine for good: the guest powered off, or asked for a reset pykvm does not
        perform. A ``timeout`` that is not None or a finite number of seconds >= 0 raises
        :class:`~pykvm.errors.InvalidArgument` before anything runs."""
        self._check_open()
        timeout = _seconds("Machine.run: timeout", timeout)
        if self._ended is not None:
            raise MachineEnded(self._ended)
        token = object()
        try:
            self._start_run(token)
            return self._run_locked(timeout)
        finally:
            with self._pause_cv:
                if self._run_owner is token:   # also when interrupted as the run started
                    self._active.clear()
                    self._run_owner = None
                self._pause_cv.notify_all()

    def _start_run(self, token: object) -> None:
        """Claim the machine for a run (``_run_owner`` = ``token``): wait while another thread
        is inside :meth:`holding`, then count every vCPU as in the run, in one
        step under ``_pause_cv`` so that a hold sees the run either not started or with all
        its vCPUs; a :meth:`stop` that came before (``_stop_reason``) ends it at once. Raises
        :class:`~pykvm.errors.Busy` when another thread runs the machine or steps one of its
        vCPUs, or when this thread is itself inside a :meth:`holding` block (it would wait for
        itself), and :class:`~pykvm.errors.Closed` when the machine is closed meanwhile."""
        me = threading.get_ident()
        with self._pause_cv:
            while True:
                self._check_open()
                if self._run_owner is not None:
                    raise Busy("Machine.run: this machine is already running in another thread")
                if any(t == me for t, _ in self._exclusive):
                    raise Busy("Machine.run: called inside a hold of the machine "
                               "(Machine.holding) by the same thread")
                if self._active:
                    raise Busy(f"Machine.run: vCPU {min(self._active)} is being stepped in "
                               "another thread (Machine.step)")
                if not self._exclusive:
                    break
                self._pause_cv.wait(0.05)
            self._run_owner = token
            self._active = set(range(len(self.vcpus)))
            # a stop() before the run ends it at once; one after this sets _stop itself (it
            # records its reason under _pause_cv, so it cannot fall between this read and write)
            self._stop = self._stop_reason is not None

    def _run_locked(self, timeout: Optional[float]) -> RunResult:
        t0 = time.monotonic()
        deadline = t0 + timeout if timeout else None
        results: List[Optional[Event]] = [None] * len(self.vcpus)
        try:
            if len(self.vcpus) == 1:
                self._run_one(0, deadline, results)
            else:
                self._run_threads(deadline, results)
        finally:
            with self._pause_cv:               # a stop() lands before both or after both
                self._settle()
                stop_reason, self._stop_reason = self._stop_reason, None
        if self._closed:
            raise Closed("Machine was closed while it ran")
        seconds = time.monotonic() - t0
        counts: Dict[str, int] = {}
        for lp in self.loops:
            for k, v in lp.counts.items():
                counts[k] = counts.get(k, 0) + v
        ev = self._decisive(results)
        exit_name, code, detail, dbg = self._verdict(ev)
        if stop_reason is not None and ev.kind == "kick":   # stop() ended it, nothing else
            exit_name, code, detail, dbg = "stopped", status.OK, stop_reason, None
        ended = self.platform.ended(ev.exit if ev.kind == "exit" else None)
        if ended:
            self._ended = ended
        console, dropped = self.console, self.console_dropped
        return RunResult(exit_name, code, console, counts, seconds, detail, dbg,
                         list(self.reports), dropped, self.reports_dropped,
                         ev.vcpu, ev.error)

    def _run_threads(self, deadline: Optional[float], results: list) -> None:
        """One thread per vCPU; a thread the host cannot start (thread limit, address space)
        ends the run as that vCPU's :class:`~pykvm.errors.HostResourceError` (the vCPUs already
        started are stopped)."""
        threads = [threading.Thread(target=self._vcpu_thread, args=(i, deadline, results),
                                    name=f"vcpu{i}", daemon=True)
                   for i in range(len(self.vcpus))]
        try:
            for i, t in enumerate(threads):
                try:
                    t.start()
                except RuntimeError as e:      # "can't start new thread"
                    hr = HostResourceError(f"out of threads: cannot start the thread of this "
                                           f"vCPU ({e}; thread limit ulimit -u, or too little "
                                           "address space under ulimit -v)", "threads")
                    hr.__cause__ = e
                    results[i] = Event("error", i, error=hr)
                    with self._pause_cv:           # never started: not in the run
                        self._active -= set(range(i, len(threads)))
                        self._pause_cv.notify_all()
                    self._kick_all()
                    break
            for t in threads:
                while t.is_alive():
                    t.join(0.1)
        except BaseException:
            self._kick_all()
            for t in threads:
                if t.ident is not None:
                    t.join()
            raise

    def _settle(self) -> None:
        """After a run, with every vCPU out of KVM_RUN: withdraw the kicks this run's ending
        left pending (the vCPU that stopped first kicks the others, and one that had already
        returned keeps the kick), so that the next run runs the guest instead of returning
        "kick" at once."""
        if not self._stop or self._closed:
            return
        self._withdraw_kicks()

    def _withdraw_kicks(self) -> None:
        """Clear ``_stop`` and every kick no run has taken (:meth:`_settle`)."""
        self._stop = False
        for i, lp in enumerate(self.loops):
            try:
                lp.clear_kick()
            except Closed:
                pass
            self._kicks_seen[i] = self._pauses_kicked   # no sent pause kick is pending now

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
            unbacked = self._unbacked_ram(ev.exit)
            if unbacked is not None:
                return ("vmm_error", status.VMM_ERROR, f"vCPU {ev.vcpu}: host could not back "
                        f"guest RAM at GPA {unbacked:#x} (memory limit?)", None)
            code, detail = self.platform.exit_verdict(ev.exit)
            if ev.exit.name == "INTERNAL_ERROR":
                detail = self._describe_internal_error(ev.vcpu, ev.exit) or detail
            return ev.exit.name, code, detail, None
        if ev.kind == "error":
            e = ev.error
            if isinstance(e, GuestMemoryError):       # met while serving the guest: its fault
                e = _guest_fault(None, e)
            hr = None if isinstance(e, (GuestError, KvmError)) else host_resource_error(e)
            if hr is not None:
                e = hr
            msg = _one_line(e)
            if isinstance(e, GuestError):
                return "guest_error", status.GUEST_FAILURE, f"vCPU {ev.vcpu}: {msg}", None
            if isinstance(e, (KvmError, PykvmError)):
                return "vmm_error", status.VMM_ERROR, f"vCPU {ev.vcpu}: {msg}", None
            return ("handler_error", status.VMM_ERROR,
                    f"vCPU {ev.vcpu}: exit handler raised {type(e).__name__}: {msg}", None)
        if ev.kind == "budget":
            return "budget", status.TIMEOUT, "exit budget used up", None
        return ev.kind, status.VMM_ERROR, "run stopped before the guest finished", None

    def _unbacked_ram(self, ex) -> Optional[int]:
        """The GPA of an MMIO (or MEMORY_FAULT) exit that lies inside a writable RAM slot, else
        None. KVM exits to userspace for guest RAM only when the host could not provide the
        page (a memory cgroup at its limit with the OOM killer off): a host failure, not an
        access of the guest to nothing (only read-only slots exit for guest writes)."""
        try:
            if ex.name == "MMIO":
                gpa = ex.phys_addr
            elif ex.name == "MEMORY_FAULT":
                gpa = ex.run.memory_fault.gpa
            else:
                return None
            slot = self.vm.memory.slot_at(gpa)
        except PykvmError:
            return None
        if slot is None or slot.readonly:
            return None
        return gpa

    def _describe_internal_error(self, index: int, ex) -> str:
        """One line on a KVM_EXIT_INTERNAL_ERROR in the guest's terms (the platform's
        :meth:`describe_internal_error`: program counter, symbol or file:line, CPU mode, the
        instruction decoded); "" when the vCPU's state cannot be read."""
        try:
            return self.platform.describe_internal_error(self.vcpus[index], ex, self.symbols)
        except Exception:                      # noqa: BLE001 — the plain detail stays
            return ""

    @property
    def symbols(self):
        """The guest image's symbols (:class:`pykvm.symbols.Symbols`; empty for an image
        without an ELF symbol table or given as bytes), read on first use."""
        if self._symbols is None:
            self._symbols = Symbols.from_image(self.image_name)
        return self._symbols

    # -- guest globals and page tables (the kernel selftests' kvm_util) ------------------------
    @property
    def globals(self) -> GuestGlobals:
        """The guest image's variables by name, in guest RAM
        (:class:`pykvm.boot.symbols.GuestGlobals`): ``m.globals["counter"]`` reads an integer
        variable, ``m.globals["counter"] = 5`` writes one, ``m.globals.read_bytes("buf")`` any.
        An unknown name raises KeyError naming it."""
        self._check_open()
        plan = getattr(self.image, "plan", None)
        return GuestGlobals(self.symbols, self.memory, getattr(plan, "segments", None))

    def read_global(self, name: str) -> int:
        """Guest variable ``name`` (1, 2, 4 or 8 bytes) as an unsigned int (see :attr:`globals`;
        KeyError for an unknown name, ValueError for another size)."""
        return self.globals[name]

    def write_global(self, name: str, value) -> None:
        """Store ``value`` (an int that fits, or bytes of the variable's exact size) in guest
        variable ``name`` (see :attr:`globals`; KeyError for an unknown name)."""
        self.globals.write(name, value)

    def _paging(self):
        """(CR3, page allocator) of a long-mode x86 guest; PykvmError for any other."""
        placed = getattr(self.platform, "placed", None)
        sregs = self.vcpus[0].get_sregs() if placed is not None else None
        if sregs is None or not (sregs.cr0 & (1 << 31)) or not (sregs.efer & (1 << 10)) or \
                sregs.cr4 & (1 << 12):
            raise PykvmError("guest page-table helpers need an x86 guest pykvm booted in long "
                             "mode with 4-level paging")
        if getattr(self, "_pages", None) is None:
            ram = [(sl.gpa, sl.gpa + sl.size) for sl in self.vm.memory if not sl.readonly]
            taken = [(0, 1 << 20)]             # the VMM's window, the PC's legacy ranges
            taken += [(sg.addr, sg.end) for sg in placed.loaded.plan.segments]
            taken += [(a, b) for a, b, *_ in placed.modules]
            taken += placed.layout.ranges("long", self.vcpu_count, max(b for _, b in ram))
            if placed.loaded.multiboot_info:
                taken.append((placed.loaded.multiboot_info, placed.loaded.multiboot_info + 4096))
            self._pages = PageAllocator(ram, taken)
            self._vaddr_next = paging.VADDR_ALLOC_BASE
        return sregs.cr3, self._pages

    def alloc_pages(self, pages: int = 1) -> int:
        """Guest-physical address of ``pages`` contiguous zeroed 4 KiB pages of RAM that
        neither the image nor pykvm uses (taken from the top of RAM down; never handed out
        twice). x86 long-mode guests; raises :class:`~pykvm.arch.x86.paging.PagingError` when
        RAM runs out."""
        if not isinstance(pages, int) or isinstance(pages, bool) or pages < 1:
            raise ValueError(f"alloc_pages: allocate at least one page, not {pages!r}")
        gpa = self._paging()[1].alloc(pages)
        self.memory.zero(gpa, pages * 4096)        # no host memory committed for the zeros
        return gpa

    def virt_map(self, vaddr: int, gpa: int, size: int, *, writable: bool = True) -> None:
        """Map guest-virtual ``[vaddr, vaddr + size)`` to guest-physical ``gpa`` (4 KiB pages,
        all multiples of 4 KiB) in the guest's page tables (CR3 of vCPU 0; new tables from
        :meth:`alloc_pages`), as kvm_util's ``virt_map``. Raises
        :class:`~pykvm.arch.x86.paging.PagingError` for a page already mapped or a bad range."""
        cr3, pages = self._paging()
        if isinstance(vaddr, int) and isinstance(size, int) and 0 < size <= \
                paging.MAX_MAP_PAGES * 4096 and not vaddr % 4096 and not size % 4096:
            need = paging.tables_needed(self.memory, cr3, vaddr, size // 4096)
            if need * 4096 > pages.free_bytes:      # refused before a page is taken
                raise paging.PagingError(f"virt_map needs {need} new page tables; "
                                  f"{pages.free_bytes // 4096} free pages left")
        paging.virt_map(self.memory, cr3, vaddr, gpa, size, pages.alloc, writable=writable)

    def vaddr_alloc(self, size: int, *, vaddr_min: Optional[int] = None) -> int:
        """Allocate ``size`` bytes (rounded up to 4 KiB pages) of zeroed guest RAM, map them
        at the lowest unmapped guest-virtual address >= ``vaddr_min`` (default 512 GiB, above
        pykvm's identity map) and return that address, as kvm_util's ``vm_vaddr_alloc``; the
        guest-physical address is :meth:`virt_to_phys` of it."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"vaddr_alloc: a size of at least 1 byte, not {size!r}")
        cr3, pages = self._paging()
        n = -(-size // 4096)
        if n > paging.MAX_MAP_PAGES:
            raise paging.PagingError(f"vaddr_alloc maps at most {paging.MAX_MAP_PAGES} pages "
                              f"({paging.MAX_MAP_PAGES * 4096:#x} bytes), not {n}")
        if n * 4096 > pages.free_bytes:
            raise paging.PagingError(f"vaddr_alloc: {n} pages asked, {pages.free_bytes // 4096} free")
        va = paging.find_unmapped(self.memory, cr3, max(self._vaddr_next, vaddr_min or 0), n)
        need = n + paging.tables_needed(self.memory, cr3, va, n)
        if need * 4096 > pages.free_bytes:         # refused before a page is taken
            raise paging.PagingError(f"vaddr_alloc: {need} pages (data and page tables) "
                                     f"asked, {pages.free_bytes // 4096} free")
        self.virt_map(va, self.alloc_pages(n), n * 4096)
        if vaddr_min is None:
            self._vaddr_next = va + n * 4096
        return va

    def virt_to_phys(self, vaddr: int) -> Optional[int]:
        """The guest-physical address guest-virtual ``vaddr`` maps to now (a walk of the
        guest's 4-level page tables, CR3 of vCPU 0), or None where it is unmapped."""
        cr3, _ = self._paging()
        return paging.translate(self.memory, cr3, vaddr)

    def device_counters(self) -> dict:
        """{name: counters} of the virtio devices this machine made (``disks=``, ``rng=``,
        ``console="virtio"``, ``nets=``, ``vsock=``), named by kind and index (``virtio-blk0``,
        ``virtio-blk1``, ``virtio-rng0``, ``virtio-net0``, ``virtio-vsock0``...); each value is
        the device's ``counters()`` (a dict of ints). Valid while the machine runs and after
        :meth:`close` (then final)."""
        out: dict = {}
        for d in self._virtio:
            kind = "virtio-" + type(d).__name__.removeprefix("Virtio").lower()
            n = sum(1 for k in out if k.rstrip("0123456789") == kind)
            out[f"{kind}{n}"] = d.counters()
        return out

    def device_errors(self) -> dict:
        """{name: one line} for each virtio device (named as in :meth:`device_counters`) whose
        host side stopped working, e.g. a network backend (passt) that exited, or a device
        thread that stopped (``HostThreadDevice.thread_error``); empty while all work. Valid
        while the machine runs and after :meth:`close`."""
        out: dict = {}
        names = list(self.device_counters())
        for name, d in zip(names, self._virtio):
            why = getattr(d, "backend_error", None) or getattr(d, "thread_error", None)
            if why:
                out[name] = why
        return out

    # -- snapshots (pykvm.snapshot, docs/snapshots.md) ------------------------------------------
    def snapshot(self, path: str) -> int:
        """Write a snapshot of this machine to ``path`` (:func:`pykvm.snapshot.take`): every
        vCPU's and the VM's KVM state, the device models' state and the non-zero pages of RAM,
        with the configuration to rebuild the machine. A running machine is paused for it and
        resumed after; one between runs or steps is captured as it stands. Returns the file's
        size in bytes. Raises :class:`~pykvm.errors.SnapshotError` (one line) for a machine
        with a device that cannot be snapshotted, naming it, and for a path the file cannot
        be written to or an OSError while writing it (naming the path and the error);
        :class:`~pykvm.errors.Closed` after :meth:`close`."""
        return _snapshot.take(self, path)

    @classmethod
    def restore(cls, path: str, **overrides) -> "Machine":
        """A new machine built from the snapshot at ``path`` (:func:`pykvm.snapshot.restore`),
        in this process or any other: :meth:`run` it and the guest continues where the
        snapshot left it. ``overrides``: ``loop``, ``on_console``, ``console_limit``,
        ``report_limit``, ``kvm``, ``vm_setup``. Raises :class:`~pykvm.errors.SnapshotError`
        (one line) for a missing, corrupted, truncated or foreign snapshot; nothing is left
        half restored."""
        return _snapshot.restore(cls, path, **overrides)

    # -- reset to an in-memory baseline (pykvm.rewind, docs/reset.md) ----------------------------
    def checkpoint(self) -> int:
        """Make the machine as it stands now the baseline :meth:`reset` returns it to
        (:class:`pykvm.rewind.MachineBaseline`): dirty logging is turned on for the RAM slots
        and a sparse private copy of RAM is kept (its non-zero pages), with every vCPU's and the
        VM's KVM state and the device models' state. A pending I/O or MMIO exit is completed
        first. A running machine (:meth:`run` in another thread) is paused for it and resumed.
        Returns the pages of RAM the baseline stores (int). A second call replaces the
        baseline. Raises :class:`~pykvm.errors.Closed` after :meth:`close`,
        :class:`~pykvm.errors.Busy` when a running machine does not pause within 10 s,
        :class:`~pykvm.errors.PykvmError` for a machine a reset cannot serve (virtio devices)
        and :class:`~pykvm.errors.KvmError` when KVM refuses a step."""
        self._check_open()
        with self.holding("reset"):
            old, self._baseline = self._baseline, None
            if old is not None:
                old.close()
            self.settle_held_time()
            with self.original_ram():          # the baseline holds the guest's own bytes
                self._baseline = MachineBaseline(self)
            self._finished_at_checkpoint = dict(self._finished)
            return self._baseline.ram.pages_stored

    def reset(self) -> int:
        """Return the machine to its :meth:`checkpoint` in-process, in microseconds: only the
        pages the guest (or the host, through :attr:`memory`) wrote since are copied back (KVM's
        dirty log), then the vCPU, VM and device state is loaded again; the guest's next run
        continues from the checkpoint. The console output, :attr:`reports` (and their dropped
        counts) are emptied, :attr:`finished_vcpus` is again what it was at the checkpoint,
        and a machine whose guest ended it (powered off) can run again, so
        that each reset machine looks freshly made to a test. Without a checkpoint, this takes
        one (and returns 0). A running machine is paused, reset and resumed. Returns the pages
        copied back (int). Raises what :meth:`checkpoint` raises."""
        self._check_open()
        if self._baseline is None:
            self.checkpoint()
            return 0
        with self.holding("reset"):
            pages = self._baseline.restore()
            self.settle_held_time(loaded=True)
            self._reapply_patches()
            if not self.running:               # a stop() that found no run: not for the next
                self._stop_reason = None
                self._withdraw_kicks()
            self._console.clear()
            with self._lock:
                self.reports.clear()
                self.reports_dropped = 0
            self._ended = None
            self._finished = dict(self._finished_at_checkpoint)
        return pages

    # -- host patches to guest RAM (a debugger's breakpoints; docs/gdb.md) ------------------------
    def patch_ram(self, gpa: int, data: bytes) -> None:
        """Write ``data`` (bytes) at guest-physical ``gpa`` as a host patch (a debugger's
        breakpoint instruction), recording the bytes it replaces in :attr:`ram_patches`
        (``{gpa: (original, patched)}``). A patched range reads as its original bytes in what
        :meth:`snapshot` writes and in the baseline :meth:`checkpoint` takes, and :meth:`reset`
        plants it again after copying RAM back. Raises
        :class:`~pykvm.errors.GuestMemoryError` when the range is not guest RAM and
        ``ValueError`` when it overlaps a patch already recorded (nothing written then)."""
        data = bytes(data)
        with self._patch_lock:
            for at, (orig, _p) in self.ram_patches.items():
                if at < gpa + len(data) and gpa < at + len(orig):
                    raise ValueError(f"GPA {gpa:#x}+{len(data)} overlaps the RAM patch at "
                                     f"{at:#x}")
            original = self.memory.read(gpa, len(data))
            self.memory.write(gpa, data)
            self.ram_patches[gpa] = (original, data)

    def unpatch_ram(self, gpa: int) -> None:
        """Put back the original bytes of the patch at ``gpa`` (:meth:`patch_ram`) and forget
        it; a GPA with no patch is ignored."""
        with self._patch_lock:
            entry = self.ram_patches.pop(gpa, None)
            if entry is not None:
                self.memory.write(gpa, entry[0])

    @contextlib.contextmanager
    def original_ram(self) -> Iterator[None]:
        """The guest's own bytes in place of every :attr:`ram_patches` entry for the block
        (the vCPUs must be out of KVM_RUN), the patches planted again after it: what snapshots
        and baselines hold."""
        with self._patch_lock:
            for gpa, (orig, _p) in self.ram_patches.items():
                self.memory.write(gpa, orig)
            try:
                yield
            finally:
                for gpa, (_o, patched) in self.ram_patches.items():
                    self.memory.write(gpa, patched)

    def _reapply_patches(self) -> None:
        """After RAM was copied back: plant each patch again over what RAM holds now, which
        becomes its original."""
        with self._patch_lock:
            for gpa, (_o, patched) in list(self.ram_patches.items()):
                self.ram_patches[gpa] = (self.memory.read(gpa, len(patched)), patched)
                self.memory.write(gpa, patched)

    def settle_held_time(self, loaded: bool = False) -> None:
        """Make the guest time a pause holds (:meth:`pause`; RISC-V) agree with the vCPU state
        around a state read or load done while every vCPU is held, so that the held time never
        reaches the guest: before a read (``loaded`` False: :meth:`snapshot`,
        :meth:`checkpoint`) the held time is put back and saved again, so that the state read
        has the time the guest was held at, not that plus the length of the hold; after a load
        (``loaded`` True: :meth:`reset`) the loaded time becomes the one the hold puts back.
        Nothing where no guest time is held (x86, or a machine not paused)."""
        with self._pause_cv:
            if self._held_time is None or not self.vcpus:
                return
            vcpu = self.vcpus[0]
            if not loaded:
                vcpu.restore_guest_time(self._held_time)
            self._held_time = vcpu.save_guest_time()

    def close(self) -> None:
        """Stop every vCPU (waiting until each has left KVM_RUN), then close the VM, its memory
        and (if the machine opened it) /dev/kvm. Idempotent; safe from any thread, including
        while :meth:`run` is in progress elsewhere (that run then raises Closed)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._kick_all()
        if getattr(self, "platform", None) is not None:
            self.platform.close()          # platform timers and threads
        for v in getattr(self, "vcpus", []):
            v.close()
        if getattr(self, "platform", None) is not None:
            self.platform.close_devices()  # no vCPU can be inside a device any more
        for d in getattr(self, "_virtio", ()):
            d.close()                      # those a failed start never gave a platform
        if getattr(self, "_baseline", None) is not None:
            self._baseline.close()
        if getattr(self, "vm", None) is not None:
            self.vm.close()
        if self._own_kvm and getattr(self, "kvm", None) is not None:
            self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
