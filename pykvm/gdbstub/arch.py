"""The interface between the GDB stub's common code and one architecture.

The common code (:mod:`pykvm.gdbstub.server`: packets, threads, all-stop, memory, breakpoint
bookkeeping) never looks at the architecture. It makes one :class:`GdbTarget` per debugging
session, through the one lookup :func:`pykvm.gdbstub.target_for` (keyed by the machine's
architecture, :data:`pykvm.arch.HOST_ARCH`), and goes through its methods for everything that
differs between architectures:

==================================  ==============================================================
what                                method
==================================  ==============================================================
target description (qXfer)          :meth:`GdbTarget.documents`
``g`` / ``G`` / ``p`` / ``P``       :meth:`~GdbTarget.read_registers`,
                                    :meth:`~GdbTarget.write_registers`,
                                    :meth:`~GdbTarget.read_register`,
                                    :meth:`~GdbTarget.write_register`
program counter (stop replies)      :meth:`GdbTarget.pc`
GVA -> GPA                          :meth:`GdbTarget.translate`
software breakpoint bytes (Z0)      :meth:`GdbTarget.breakpoint_bytes`
hardware breakpoints/watchpoints    :meth:`GdbTarget.insert_hw`, :meth:`GdbTarget.remove_hw`
KVM guest-debug control + stepping  :meth:`GdbTarget.prepare_resume`
recognising a debug stop            :attr:`GdbTarget.stop_exits`, :meth:`GdbTarget.classify_stop`
guest's own trap under guest debug  :meth:`GdbTarget.give_to_guest`
undoing step plumbing after a stop  :meth:`GdbTarget.stopped`
==================================  ==============================================================

Threading contract. Every method that takes a ``vcpu`` (:class:`pykvm.vcpu.Vcpu`) is called
while that vCPU is out of KVM_RUN — held by the stub's all-stop (the machine's
:meth:`~pykvm.machine.Machine.hold` of owner ``"gdb"``), or before the first run — except
:meth:`GdbTarget.classify_stop`, which runs on the vCPU's own thread from inside its exit
handler (so vCPU ioctls work there too). The common code serialises calls: a target needs no
lock of its own.

Addresses: ``gva`` is a guest-virtual address (what gdb sends: on x86 a linear address, the
segment base already added, as QEMU's stub has it), ``gpa`` a guest-physical address.
Register blobs are bytes in the target's byte order, in the order and sizes the target
description gives (GDB manual, "Target Descriptions" and "Packets": ``g``/``p``).

Errors: a method raises :class:`Unsupported` for something the architecture does not have
(the stub then answers the empty packet, which tells gdb "not supported") and
:class:`TargetError` for a request it cannot honour (the stub answers ``E`` and the error
number). Anything else a target raises is a bug; the stub still answers ``E`` and goes on.

Adding an architecture: write ``pykvm/gdbstub/<arch>.py`` with a subclass of
:class:`GdbTarget` and add one line to ``TARGETS`` in ``pykvm/gdbstub/__init__.py``.
"""
from __future__ import annotations

import abc

from .._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Sequence

# POSIX signal numbers as gdb's remote protocol spells them (GDB manual, "Stop Reply Packets":
# the numbers are gdb's own, which equal Linux's for these)
SIGINT = 2
SIGTRAP = 5

# Z/z packet types (GDB manual, "Packets": "z type,addr,kind")
Z_SW_BREAK = 0
Z_HW_BREAK = 1
Z_WRITE_WATCH = 2
Z_READ_WATCH = 3
Z_ACCESS_WATCH = 4


class Unsupported(Exception):
    """The architecture (or this host's KVM) has no such feature: the stub answers the empty
    packet (GDB manual, "Packets": an empty response means the packet is not supported)."""


class TargetError(Exception):
    """A request the target cannot honour: the stub answers ``E<errno>`` (two hex digits).
    ``errno``: an int 1..255 (the stub uses Linux errno values: 14 EFAULT for an unmapped
    address, 22 EINVAL for a bad value, 28 ENOSPC when every debug register is taken)."""

    def __init__(self, message: str, errno: int = 22):
        super().__init__(message)
        self.errno = errno


class Stop(Record, slots=True):
    """Why a vCPU stopped, as :meth:`GdbTarget.classify_stop` recognised it.

    ``signal``: gdb's signal number (:data:`SIGTRAP` for every debug stop). ``reason``: the
    stop reason gdb is told in the ``T`` packet (GDB manual, "Stop Reply Packets"):
    ``"swbreak"`` (a software breakpoint the stub planted), ``"hwbreak"`` (a hardware
    breakpoint), ``"watch"``, ``"rwatch"``, ``"awatch"`` (a watchpoint, ``addr`` the watched
    GVA), or ``""`` (a single step or another trap). ``addr``: the data address of a
    watchpoint hit, else None."""

    signal: int = SIGTRAP
    reason: str = ""
    addr: Optional[int] = None


class GuestAccess(abc.ABC):
    """Guest-virtual memory as one vCPU sees it, given to a target that must read or write
    instructions itself (RISC-V plants temporary ``ebreak``\\ s to single-step). Implemented by
    the common code over :meth:`GdbTarget.translate` and the machine's guest RAM."""

    @abc.abstractmethod
    def read(self, gva: int, n: int) -> bytes:
        """``n`` bytes at guest-virtual ``gva``. Raises :class:`TargetError` (errno 14) when a
        page is unmapped or not guest RAM."""

    @abc.abstractmethod
    def write(self, gva: int, data: bytes) -> None:
        """Write ``data`` at guest-virtual ``gva`` (into guest RAM, whatever the page
        table's permissions say, as a debugger writes). The common code keeps such writes as
        temporary RAM patches (:attr:`pykvm.machine.Machine.ram_patches`): the first write at a
        place plants ``data``, the next one there puts the guest's own bytes back (whatever
        ``data`` it gives), so a target writes an instruction, then "restores" it. Snapshots
        and checkpoints never hold the planted bytes. Raises :class:`TargetError` (errno 14)
        when a page is unmapped or not guest RAM (nothing written then)."""


class GdbTarget(abc.ABC):
    """One architecture's part of one debugging session (one instance per server; it may
    keep state, e.g. which debug registers are taken).

    ``machine``: the :class:`pykvm.machine.Machine` being debugged (its ``vcpus`` and
    ``memory``)."""

    #: gdb's name of the architecture for the target description's ``<architecture>``
    #: (e.g. ``"i386:x86-64"``, ``"riscv:rv64"``), informative
    arch_name: str = ""
    #: the exit names (as :meth:`pykvm.machine.Machine.on` takes them) through which this
    #: architecture's debug stops arrive; the stub installs its handler for each of them
    stop_exits: Sequence[str] = ("DEBUG",)

    def __init__(self, machine: Any):
        self.machine = machine

    # -- description and registers ------------------------------------------------------
    @abc.abstractmethod
    def documents(self, vcpu: Any) -> Dict[str, str]:
        """The target description: ``{annex: xml_text}`` with at least ``"target.xml"``
        (GDB manual, "Target Descriptions"), served by ``qXfer:features:read:<annex>``.
        Called once, at the first qXfer, with vCPU 0; the description may depend on its
        mode then (x86: 64-bit registers in long mode, 32-bit ones otherwise), and the
        register blobs below follow the description chosen."""

    @abc.abstractmethod
    def read_registers(self, vcpu: Any) -> bytes:
        """The ``g`` blob: every register of the description, in order, target byte order."""

    @abc.abstractmethod
    def write_registers(self, vcpu: Any, data: bytes) -> None:
        """Load a ``G`` blob (the same layout as :meth:`read_registers`). Raises
        :class:`TargetError` for a blob of the wrong length or a value KVM refuses."""

    @abc.abstractmethod
    def read_register(self, vcpu: Any, regno: int) -> bytes:
        """Register ``regno`` (its number in the description, from 0) for ``p``. Raises
        :class:`TargetError` for a number the description does not have."""

    @abc.abstractmethod
    def write_register(self, vcpu: Any, regno: int, data: bytes) -> None:
        """Set register ``regno`` from ``data`` (exactly its size) for ``P``. Raises
        :class:`TargetError` for a bad number, size or a value KVM refuses."""

    @abc.abstractmethod
    def pc(self, vcpu: Any) -> int:
        """The vCPU's program counter as a GVA (x86: CS base + RIP)."""

    # -- memory ---------------------------------------------------------------------------
    @abc.abstractmethod
    def translate(self, vcpu: Any, gva: int) -> Optional[int]:
        """The GPA that ``gva`` maps to under the vCPU's current paging (x86: KVM_TRANSLATE;
        RISC-V: a walk of the Sv39/48/57 tables in guest RAM), or None when it is unmapped.
        Only the page needs to be right: the stub translates page by page."""

    # -- breakpoints and stepping ---------------------------------------------------------
    @abc.abstractmethod
    def breakpoint_bytes(self, kind: int) -> bytes:
        """The instruction bytes to plant for a ``Z0`` of ``kind`` (GDB manual, "Architecture-
        Specific Protocol Details": x86 kind 1 -> ``int3`` 0xCC; RISC-V kind 2 -> ``c.ebreak``,
        4 -> ``ebreak``). Raises :class:`TargetError` for a kind the architecture has no
        breakpoint instruction of."""

    def insert_hw(self, ztype: int, gva: int, kind: int) -> None:
        """Take a hardware breakpoint (``ztype`` :data:`Z_HW_BREAK`) or watchpoint
        (:data:`Z_WRITE_WATCH`, :data:`Z_READ_WATCH`, :data:`Z_ACCESS_WATCH`; ``kind`` the
        watched length in bytes) at ``gva``, for every vCPU; it takes effect at the next
        :meth:`prepare_resume`. Raises :class:`Unsupported` where the architecture has none
        (the default), :class:`TargetError` when the slots are full (errno 28) or the
        length/alignment cannot be watched (errno 22). For a write watchpoint
        (:data:`Z_WRITE_WATCH`) :class:`Unsupported` makes the stub emulate it: it
        single-steps every vCPU (:meth:`prepare_resume` ``step=True``) and compares the
        watched bytes after each instruction, as gdb's software watchpoints do, only
        without a round trip per instruction."""
        raise Unsupported("no hardware breakpoints on this architecture")

    def remove_hw(self, ztype: int, gva: int, kind: int) -> None:
        """Give back what :meth:`insert_hw` took (same arguments). Raises
        :class:`Unsupported` like :meth:`insert_hw`, :class:`TargetError` if none matches."""
        raise Unsupported("no hardware breakpoints on this architecture")

    def hw_count(self) -> int:
        """How many hardware breakpoints/watchpoints are taken now (0 without any)."""
        return 0

    @abc.abstractmethod
    def prepare_resume(self, vcpu: Any, *, step: bool, sw_breakpoints: bool,
                       mem: GuestAccess) -> None:
        """Set the vCPU up for the next run: KVM_SET_GUEST_DEBUG with the control bits that
        ``sw_breakpoints`` (the stub has planted breakpoint instructions: make KVM stop on
        them instead of giving the trap to the guest), the hardware points and ``step`` (stop
        after one instruction; x86: KVM_GUESTDBG_SINGLESTEP, RISC-V: plant a temporary
        ``ebreak`` after the instruction through ``mem``) ask for; with none of them, guest
        debugging off (control 0), so that the guest's own breakpoint instructions behave as
        without a debugger. Called for every vCPU before each resume and at detach
        (``step=False, sw_breakpoints=False`` and no hardware points then)."""

    @abc.abstractmethod
    def classify_stop(self, vcpu: Any, ex: Any, planted: Sequence[int]) -> Optional[Stop]:
        """Whether exit ``ex`` (a :class:`pykvm.exits.Exit` of one of :attr:`stop_exits`) of
        ``vcpu`` is a debug stop, and which. ``planted``: the GVAs where the stub has
        breakpoint instructions now. Returns the :class:`~pykvm.gdbstub.arch.Stop`, or None when the exit is
        not the debugger's (then the machine handles it as without a debugger: e.g. the
        guest's own ``int3``). Runs on the vCPU's thread, inside its exit handler; the PC
        must be left at the breakpoint's address for a software breakpoint (gdb is told
        ``swbreak`` and does not adjust it)."""

    def give_to_guest(self, vcpu: Any, ex: Any) -> bool:
        """Called (on the vCPU's thread, like :meth:`classify_stop`) for an exit that
        :meth:`classify_stop` found not to be the debugger's: deliver it to the guest as the
        guest would have seen it without guest debugging (RISC-V: the breakpoint exception of
        the guest's own ``ebreak``, which KVM_GUESTDBG_ENABLE turned into a KVM exit), and
        return True, so that the vCPU simply runs on; False (the default) leaves the exit to
        the machine's handlers."""
        return False

    def stopped(self, vcpu: Any, mem: GuestAccess) -> None:
        """Called for every vCPU once all are held after a stop, before gdb sees anything:
        undo what :meth:`prepare_resume` planted for a step (RISC-V: remove the temporary
        ``ebreak``\\ s). The default does nothing."""
        return None
