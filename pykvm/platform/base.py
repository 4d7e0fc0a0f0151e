"""What every machine offers :class:`pykvm.machine.Machine` (the :class:`Platform` protocol) and
the narrow handles the machine gives it (:class:`MachineControl`): a platform never sees the
``Machine`` itself.

A platform is created with the VM (its fd and guest memory), the ``/dev/kvm`` handle, the
vCPU count and the RAM size, after :meth:`Platform.max_vcpus` has accepted the vCPU count and
before any vCPU exists; it creates the interrupt controllers, guest RAM and devices at once.
Then :meth:`~Platform.load` loads the image, :meth:`~Platform.setup_vcpu` prepares each vCPU,
:meth:`~Platform.loop_config` says what the C run loop serves, and while the guest runs the
machine asks the platform, in this order, whether an exit is a guest report
(:meth:`~Platform.report_from_exit`) and whether it serves it (:meth:`~Platform.handle_exit`).
"""
from __future__ import annotations

from .._record import Record
from ..boot import LoadedImage
from ..runloop import LoopConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, ClassVar, Optional, Protocol, Tuple
else:
    from .._record import Protocol   # a run-time stand-in: importing typing costs ~5 ms


class MachineControl(Record, frozen=True, slots=True):
    """The handles a platform gets from its machine (every one safe from any thread):

    ``console(data)`` — bytes the guest wrote to a console the platform serves (SBI DBCN);
    ``stopping()`` — True once the machine's run is being stopped or the machine closed;
    ``kick(index)`` — stop vCPU ``index``'s current (or next) ``KVM_RUN``;
    ``in_run(index)`` — whether vCPU ``index``'s thread is inside its run loop now."""
    console: Callable[[bytes], None]
    stopping: Callable[[], bool]
    kick: Callable[[int], None]
    in_run: Callable[[int], bool]


class Platform(Protocol):
    """A machine type: ``pc``, ``bare`` (x86) or ``virt`` (RISC-V). See the module docstring."""
    name: ClassVar[str]               # "pc", "bare", "virt"
    arch: ClassVar[str]               # "x86_64", "riscv64"
    ram_base: ClassVar[int]           # guest-physical address of the first RAM byte

    @classmethod
    def max_vcpus(cls, image_format: str, **options) -> Tuple[Optional[int], str]:
        """(most vCPUs, what sets that limit) for this machine with ``options`` booting an
        image of ``image_format`` (:func:`pykvm.boot.detect`); (None, "") when only KVM's
        limits apply. Asked before anything is created."""

    def load(self, image, *, cmdline: str = "", initrd=(), flat_addr: Optional[int] = None,
             flat_mode: str = "real") -> LoadedImage:
        """Load ``image`` (a path or bytes) into guest RAM; raises
        :class:`~pykvm.boot.LoadError`."""

    def loop_config(self) -> LoopConfig:
        """What the C run loop of each vCPU serves (ports, the UART, the SBI console)."""

    def setup_vcpu(self, vcpu, index: int) -> None:
        """Give vCPU ``index`` its CPUID or cpu type and its boot state."""

    def report_from_exit(self, index: int, ex) -> Optional[object]:
        """The :class:`~pykvm.report.Report` exit ``ex`` carries, or None."""

    def handle_exit(self, index: int, ex) -> bool:
        """Serve exit ``ex`` of vCPU ``index``: True to resume the guest, False when it is not
        the platform's (or a power event ends the run)."""

    def hold(self, index: int) -> bool:
        """vCPU ``index``'s run was kicked while the machine runs on: True after the platform
        parked it (x86 S3) and it may run on, False if the kick was not the platform's."""

    def describe_internal_error(self, vcpu, ex, symbols=None) -> str:
        """One line on a KVM_EXIT_INTERNAL_ERROR in the guest's terms."""

    def ended(self, ex) -> str:
        """Why the machine cannot run again after a run that ended with exit ``ex`` (None for
        another ending), "" if it can."""

    def exit_verdict(self, ex) -> Tuple[int, str]:
        """(exit status, detail) for a run that ended with exit ``ex``."""

    def close(self) -> None:
        """Stop the platform's timers and threads (idempotent)."""

    def close_devices(self) -> None:
        """Release the devices' host resources (image files, locks), once no vCPU runs any
        more (idempotent)."""
