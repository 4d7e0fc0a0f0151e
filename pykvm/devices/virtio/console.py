"""virtio-console, one port, no MULTIPORT (OASIS virtio 1.2, section 5.3).

Queues: receiveq (0, host -> guest) and transmitq (1, guest -> host). Bytes the driver places
in the transmitq go to the ``on_output`` callback, in order, in pieces of at most 64 KiB (a
guest cannot make the host hold more than that of its output at once), and at most
:data:`OUTPUT_BUDGET` (16 MiB) per notification of the transmitq: descriptors may all name the
same guest pages, so a few KiB of guest RAM could otherwise ask for 2^32 bytes per chain times
the queue size; chains past the budget are still returned (used length 0) and their bytes are
counted in :attr:`VirtioConsole.output_dropped`. Host input given to
:meth:`VirtioConsole.feed` waits in a bounded buffer (64 KiB; what does not fit is dropped and
counted in :attr:`VirtioConsole.input_dropped`) until the driver makes receive buffers
available: it is delivered on :meth:`~VirtioConsole.feed`, on the driver's notification of
queue 0 and at activation. Pending input is kept across a device reset (it is the user's
typing, not a request of the guest).

Features: VIRTIO_CONSOLE_F_SIZE (0: ``cols``/``rows`` in the configuration space, changed with
:meth:`~VirtioConsole.resize`, which raises a configuration-change interrupt) and
VIRTIO_CONSOLE_F_EMERG_WRITE (2: a driver write to ``emerg_wr`` outputs its low byte at once,
also before DRIVER_OK).

Configuration space (section 5.3.4): cols u16 @0, rows u16 @2, max_nr_ports u32 @4 (1),
emerg_wr u32 @8 (reads 0).
"""
from __future__ import annotations

import struct
import threading

from . import ID_CONSOLE, INT_CONFIG, INT_VRING, DeviceHandles, VirtioDevice
from .queue import QueueError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, List, Optional, Sequence

F_SIZE, F_MULTIPORT, F_EMERG_WRITE = 0, 1, 2
RECEIVEQ, TRANSMITQ = 0, 1
INPUT_LIMIT = 64 * 1024            # bytes of host input held for the guest
OUTPUT_PIECE = 64 * 1024           # most bytes handed to on_output at once
OUTPUT_BUDGET = 16 << 20           # most bytes output per transmitq notification
CONFIG_SIZE = 12


class VirtioConsole(VirtioDevice):
    """A virtio console. ``on_output(data: bytes)`` receives what the guest writes (called
    from the vCPU thread that notified, under the transport's lock; an exception it raises
    propagates to the caller of :meth:`notify`); ``cols``/``rows``: the terminal size the
    driver reads (1..65535 each, ValueError otherwise). :meth:`feed` may be called from any
    thread. Counters: ``input_dropped`` (bytes of host input lost to a full buffer),
    ``output_bytes`` (bytes the guest sent), ``output_dropped`` (bytes past
    :data:`OUTPUT_BUDGET` in one notification, not output)."""

    device_id = ID_CONSOLE
    num_queues = 2

    def __init__(self, on_output: Callable[[bytes], None], *, cols: int = 80, rows: int = 25):
        if not callable(on_output):
            raise TypeError(f"on_output must be callable, not {type(on_output).__name__}")
        self._check_size(cols, rows)
        self.on_output = on_output
        self.cols, self.rows = cols, rows
        self.input_dropped = 0
        self.output_bytes = 0
        self.output_dropped = 0
        self._rx_lock = threading.Lock()      # the receive queue, the input buffer, the state
        self._input = bytearray()
        self._queues: List[Optional[Any]] = [None, None]
        self._handles: Optional[DeviceHandles] = None
        self._features = 0
        self._broken = False

    @staticmethod
    def _check_size(cols: object, rows: object) -> None:
        for name, v in (("cols", cols), ("rows", rows)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 0xFFFF:
                raise ValueError(f"console {name} must be an int in 1..65535, not {v!r}")

    # ---- features and configuration --------------------------------------------------

    def device_features(self) -> int:
        """VIRTIO_CONSOLE_F_SIZE and VIRTIO_CONSOLE_F_EMERG_WRITE."""
        return (1 << F_SIZE) | (1 << F_EMERG_WRITE)

    def config_read(self, offset: int, size: int) -> int:
        """Bytes of the configuration space (module docstring); past its end 0."""
        cfg = struct.pack("<HHII", self.cols, self.rows, 1, 0)
        if offset < 0 or size <= 0:
            return 0
        return int.from_bytes(cfg[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A write of ``emerg_wr`` (offset 8, any width from there) outputs its low byte;
        other writes are ignored (the fields are read-only)."""
        if offset == 8 and size >= 1:
            self.output_bytes += 1
            self.on_output(bytes((value & 0xFF,)))

    def resize(self, cols: int, rows: int) -> None:
        """Change the terminal size the driver reads; raises a configuration-change
        interrupt when the device is active. ValueError for sizes outside 1..65535."""
        self._check_size(cols, rows)
        self.cols, self.rows = cols, rows
        with self._rx_lock:
            h = self._handles
        if h is not None:
            h.interrupt(INT_CONFIG, -1)

    # ---- lifecycle -------------------------------------------------------------------

    def activate(self, features: int, queues: Sequence[Optional[Any]],
                 handles: DeviceHandles) -> None:
        with self._rx_lock:
            self._features = features
            self._queues = [queues[i] if i < len(queues) else None for i in (0, 1)]
            self._handles = handles
            self._broken = False
        self._deliver()

    def reset(self) -> None:
        with self._rx_lock:
            self._queues = [None, None]
            self._handles = None
            self._features = 0
            self._broken = False

    def close(self) -> None:
        """Drop the queues and the pending input. Idempotent."""
        self.reset()
        with self._rx_lock:
            self._input.clear()

    # ---- data ------------------------------------------------------------------------

    @property
    def input_pending(self) -> int:
        """Bytes of host input waiting for receive buffers."""
        return len(self._input)

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest and deliver what the driver has buffers for.
        Returns the bytes accepted (the rest is dropped and counted in
        :attr:`input_dropped`). Callable from any thread."""
        data = bytes(data)
        with self._rx_lock:
            room = INPUT_LIMIT - len(self._input)
            take = min(room, len(data))
            self._input += data[:take]
            self.input_dropped += len(data) - take
        self._deliver()
        return take

    def notify(self, index: int) -> None:
        """Queue 0: the driver added receive buffers, deliver pending input. Queue 1: send
        what the driver transmitted to ``on_output``. Never raises for anything the guest
        did."""
        if index == RECEIVEQ:
            self._deliver()
        elif index == TRANSMITQ:
            self._transmit()

    def _fail(self, h: DeviceHandles) -> None:
        self._broken = True
        h.needs_reset()

    def _deliver(self) -> None:
        """Fill the driver's receive buffers with pending input. The interrupt and
        DEVICE_NEEDS_RESET are raised after the lock is let go (both take the transport's
        lock, which a vCPU may hold while it waits for ours)."""
        with self._rx_lock:
            q, h = self._queues[RECEIVEQ], self._handles
            if q is None or h is None or self._broken or not self._input:
                return
            pushed = failed = irq = False
            try:
                while self._input:
                    chain = q.pop()
                    if chain is None:
                        break
                    n = chain.write(bytes(self._input[:chain.writable_len]))
                    del self._input[:n]
                    q.push(chain, n)
                    pushed = True
                irq = pushed and q.needs_interrupt()
            except QueueError:
                self._broken = failed = True
        if failed:
            h.needs_reset()
        elif irq:
            h.interrupt(INT_VRING, RECEIVEQ)

    def _transmit(self) -> None:
        q, h = self._queues[TRANSMITQ], self._handles
        if q is None or h is None or self._broken:
            return
        pushed = False
        out: List[bytes] = []
        held = 0
        budget = OUTPUT_BUDGET
        try:
            while True:
                chain = q.pop()
                if chain is None:
                    break
                off = 0
                while off < chain.readable_len:
                    if budget <= 0:                # the rest of this notification: dropped
                        self.output_dropped += chain.readable_len - off
                        break
                    piece = chain.read(off, min(OUTPUT_PIECE, budget))
                    off += len(piece)
                    budget -= len(piece)
                    self.output_bytes += len(piece)
                    out.append(piece)
                    held += len(piece)
                    if held >= OUTPUT_PIECE:
                        self.on_output(b"".join(out))
                        out.clear()
                        held = 0
                q.push(chain, 0)
                pushed = True
            if out:
                self.on_output(b"".join(out))
            irq = pushed and q.needs_interrupt()
        except QueueError:
            self._fail(h)
            return
        if irq:
            h.interrupt(INT_VRING, TRANSMITQ)
