"""System Control Port A (port 0x92, the "fast A20 and reset" port of PS/2 and later PCs, as
QEMU's ``hw/i386/port92.c`` models it for the ``pc`` machine):

* bit 0 (write): 1 requests a CPU reset (``on_reset``); it reads back 0;
* bit 1: A20 gate. pykvm runs under KVM, where A20 cannot be masked: the bit always reads 1
  and the guest's addresses are never wrapped;
* other bits read 0 and ignore writes.

As pykvm's PC has always answered it: an access of any width (1, 2 or 4 bytes) starting at
0x92 reaches the register whole; a read gives the register (0x02) zero-extended, a write takes
the value's low byte. Each access costs constant work.
"""
from __future__ import annotations

import threading
from .snapstate import DeviceState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional

PORT = 0x92
RESET = 0x01
A20 = 0x02


class Port92(DeviceState):
    """The register. ``on_reset()``: called (without the lock held) for every write with bit 0
    set."""

    SNAPSHOT_FIELDS = ('value',)
    SNAPSHOT_RANGES = {"value": (0, 0xFF)}

    PIO_RANGES = ((PORT, 1, 0, 4),)

    def __init__(self, *, on_reset: Optional[Callable[[], None]] = None):
        self.on_reset = on_reset
        self.value = A20
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> int:
        """The register (``size`` 1-4 bytes read at ``offset`` 0): A20 (bit 1) always set."""
        if offset != 0:
            return (1 << (8 * size)) - 1
        with self._lock:
            return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write the register (``size`` 1-4 bytes at ``offset`` 0): A20 stays on, bit 0 calls
        ``on_reset``. Other offsets: dropped."""
        if offset != 0:
            return
        with self._lock:
            self.value = (value & A20) | A20
        if value & RESET and self.on_reset:
            self.on_reset()
