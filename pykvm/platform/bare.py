"""The bare x86 machine (``--machine bare``): RAM, the console ports of the C run loop and, when
asked for (``irqchip``, ``pit``) or when the image is a Linux kernel, the in-kernel irqchip and
PIT; no firmware tables, no other device. Every vCPU starts at the image's entry, each on its own
boot stack (:mod:`pykvm.arch.x86.layout`). pykvm's own guests boot here by default."""
from __future__ import annotations

from ..arch.x86 import layout
from .base import MachineControl
from .x86 import XAPIC_MAX_CPUS, X86Platform

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar, Optional, Tuple


class BarePlatform(X86Platform):
    """The bare x86 machine (module docstring). ``irqchip``/``pit``: create KVM's in-kernel
    irqchip (``KVM_CREATE_IRQCHIP``) and i8254 (``KVM_CREATE_PIT2``, which needs the irqchip)."""
    name: ClassVar[str] = "bare"

    def __init__(self, vm, kvm, control: MachineControl, *, vcpus: int, mem_size: int,
                 cpuid=None, irqchip: bool = False, pit: bool = False):
        self.pit = False
        self._want_irqchip = irqchip or pit
        super().__init__(vm, kvm, control, vcpus=vcpus, mem_size=mem_size, cpuid=cpuid)
        if pit:
            self._create_chips(pit)

    def _create_irqchip(self) -> None:
        """The in-kernel irqchip when ``irqchip`` or ``pit`` asked for it (before RAM: see
        :meth:`.x86.X86Platform._create_irqchip`)."""
        if self._want_irqchip:
            self._create_chips(False)

    @classmethod
    def max_vcpus(cls, image_format: str, *, flat_mode: str = "real", irqchip: bool = False,
                  pit: bool = False, **_options) -> Tuple[Optional[int], str]:
        """An ELF or a protected/long-mode flat image starts every vCPU on its own boot stack,
        of which the boot layout has :data:`pykvm.arch.x86.layout.MAX_VCPUS` (64); with the
        in-kernel irqchip the xAPIC ids stop at 255; a real-mode flat image without one has no
        limit of its own."""
        if image_format in ("elf", "multiboot") or flat_mode in ("long", "protected"):
            return layout.MAX_VCPUS, "the bare machine's boot layout has stacks for"
        if irqchip or pit or image_format == "linux-x86":
            return XAPIC_MAX_CPUS, "the in-kernel irqchip's 8-bit xAPIC ids (0xff is broadcast) name"
        return None, ""

    def _create_chips(self, pit: bool) -> None:
        """The in-kernel irqchip, and the PIT if ``pit``: each created once."""
        if not self.irqchip:
            self.vm.create_irqchip()
            self.irqchip = True
        if pit and not self.pit:
            self.vm.create_pit2()
            self.pit = True

    def _before_linux(self) -> None:
        """A Linux kernel needs at least the in-kernel irqchip and PIT."""
        self._create_chips(pit=True)
