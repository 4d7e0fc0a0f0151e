"""Running one virtio case of ``python -m pykvm.fuzz --virtio`` (:func:`run_case`): the device
model of the case's target behind its transport on a real :class:`~pykvm.devices.bus.Bus`, in
the guest RAM of a fresh VM (no vCPU), its operations replayed in order and every invariant
checked after each one. The cases come from :mod:`pykvm.fuzz.virtio_generator`.

Invariants (a broken one is a finding; the case stops there):

* no exception escapes a bus access, a PCI configuration access or a host call (console input,
  resize): ``exception``;
* the device is *running or broken visibly*: while DRIVER_OK is set and DEVICE_NEEDS_RESET is
  not, no live queue is broken (a ring rule the device caught must set DEVICE_NEEDS_RESET,
  section 2.1.2); the interrupt line (virtio-mmio) / INTx (virtio-pci without MSI-X) is high
  exactly while InterruptStatus / the ISR is non-zero: ``invariant``;
* work per access is bounded: no single operation uses more than :data:`OP_DEADLINE` seconds
  of this process's CPU time (a generous bound, not a speed figure; CPU time, not wall time, so
  that a host busy with other work does not read as a finding): ``cpu``;
* host memory is bounded: the Python allocations made during the case (``tracemalloc``) never
  exceed :data:`MEM_PEAK_BOUND` bytes above where they started, and what is still allocated
  after the device is closed stays under :data:`MEM_KEEP_BOUND`: ``leak``;
* a read-only disk's image file is unchanged (its SHA-256): ``invariant``;
* closing the device leaves no file descriptor behind: ``leak``.
"""
import hashlib
import os
import random
import tempfile
import time
import traceback
import tracemalloc
from typing import Dict, List, Optional

from ..devices.bus import MMIO_LIMIT, Bus, BusConflict
from ..devices.virtio import STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, VirtioDevice
from ..devices.virtio.blk import VirtioBlk
from ..devices.virtio.console import VirtioConsole
from ..devices.virtio.mmio import MAX_ACCESS, MMIO_SIZE, VirtioMmio
from ..devices.virtio.pci import VirtioPci
from ..devices.virtio.rng import VirtioRng
from ..devices.virtio.transport import TransportCore
from .virtio_generator import MMIO_BASE, PCI_BAR1, PCI_BAR4, RAM_HIGH, RAM_LOW

OP_DEADLINE = 5.0                 # CPU seconds one operation may take (a queue of 256 chains of
                                  # 256 descriptors is ~65536 descriptor reads: ~1 s here)
MEM_PEAK_BOUND = 32 << 20         # bytes of Python allocations a case may hold at once
MEM_KEEP_BOUND = 256 << 10        # bytes still allocated after the device is closed


class Finding(Exception):
    """An invariant broke: ``kind`` (a supervisor finding kind) and a one-line ``detail``."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Harness:
    """The target of one case: device, transport, bus and the signals they raised."""

    def __init__(self, case: dict, memory, tmpdir: str):
        transport, device = case["mode"].split("-", 1)
        self.transport_kind = transport
        self.output_bytes = 0
        self.msis = 0
        self.irq_level = 0
        self.image: Optional[str] = None
        self.image_hash: Optional[str] = None
        model: VirtioDevice
        if device == "rng":
            model = VirtioRng()
        elif device == "console":
            model = VirtioConsole(self._output)
        else:
            self.image = os.path.join(tmpdir, "disk.img")
            rnd = random.Random(f"pykvm-fuzz-virtio-image:{case['seed']}:{case['index']}")
            with open(self.image, "wb") as f:
                f.write(rnd.randbytes(512 * case["image_sectors"]))
            ro = device == "blk-ro"
            if ro:
                self.image_hash = _sha256(self.image)
            model = VirtioBlk(self.image, readonly=ro, serial="fuzz")
        self.model = model
        self.bus = Bus("mmio", MMIO_LIMIT)
        self.mmio: Optional[VirtioMmio] = None
        self.pci: Optional[VirtioPci] = None
        self.core: TransportCore
        if transport == "mmio":
            self.mmio = VirtioMmio(model, memory, set_irq=self._irq)
            self.core = self.mmio
            self.bus.insert(MMIO_BASE, MMIO_SIZE, self.mmio, max_access=MAX_ACCESS,
                            name="virtio-mmio")
        else:
            self.pci = VirtioPci(model, memory, bars=(PCI_BAR1, PCI_BAR4), intx_line=10,
                                 send_msi=self._msi, set_intx=self._irq)
            self.core = self.pci.core
            self.pci.pci.on_write = self._config_written      # type: ignore[assignment]
            self._map_bars()

    # -- what the platform would do --------------------------------------------------------
    def _output(self, data: bytes) -> None:
        self.output_bytes += len(data)

    def _irq(self, level: int) -> None:
        self.irq_level = level

    def _msi(self, address: int, data: int) -> None:
        self.msis += 1

    def _config_written(self) -> None:
        # pykvm.platform.pc's _virtio_pci_config_written: MSI-X state, then the BARs re-mapped
        assert self.pci is not None
        self.pci.config_changed()
        self._map_bars()

    def _map_bars(self) -> None:
        assert self.pci is not None
        self.bus.remove(self.pci)
        self.bus.remove(self.pci.msix)
        for base, size, dev in self.pci.windows():
            try:
                self.bus.insert(base, size, dev, max_access=8, name="virtio-pci")
            except BusConflict:              # BARs over each other: the pc machine skips it
                pass

    # -- operations ------------------------------------------------------------------------
    def op(self, op: list, memory) -> None:
        kind = op[0]
        if kind == "r":
            self.bus.read(op[1], op[2])
        elif kind == "w":
            self.bus.write(op[1], op[2], op[3])
        elif kind in ("cr", "cw"):
            if self.pci is None:
                return
            f = self.pci.pci
            if kind == "cr":
                f.read(op[1], op[2])
            else:
                f.write(op[1], op[2], op[3])
                if f.on_write is not None:
                    f.on_write()
        elif kind == "mem":
            data = bytes.fromhex(op[2])
            for lo, n in (RAM_LOW, RAM_HIGH):         # the bytes that are RAM
                a, b = max(op[1], lo), min(op[1] + len(data), lo + n)
                if a < b:
                    memory.write(a, data[a - op[1]:b - op[1]])
        elif kind == "feed":
            if isinstance(self.model, VirtioConsole):
                self.model.feed(random.Random(op[2]).randbytes(op[1]))
        elif kind == "resize":
            if isinstance(self.model, VirtioConsole):
                self.model.resize(op[1], op[2])
        else:
            raise ValueError(f"unknown virtio-case op {kind!r}")

    def check(self) -> None:
        """The invariants that hold after every operation (module docstring)."""
        core = self.core
        st = core.status
        if st & STATUS_DRIVER_OK and not st & STATUS_DEVICE_NEEDS_RESET:
            for q in core.active or ():
                if q is not None and q.broken:
                    raise Finding("invariant", f"status {st:#x}: running (DRIVER_OK without "
                                  f"DEVICE_NEEDS_RESET) with a broken queue: {q.broken}")
            if getattr(self.model, "_broken", False):
                raise Finding("invariant", f"status {st:#x}: running, but the device "
                              "model marked itself broken")
        if self.mmio is not None:
            want = 1 if self.mmio.interrupt_status else 0
            if self.irq_level != want:
                raise Finding("invariant", f"interrupt line {self.irq_level} with "
                              f"InterruptStatus {self.mmio.interrupt_status:#x}")
        elif self.pci is not None:
            want = 1 if self.pci.isr and not self.pci.msix_enabled else 0
            if self.irq_level != want:
                raise Finding("invariant", f"INTx {self.irq_level} with ISR {self.pci.isr:#x} "
                              f"and MSI-X {'on' if self.pci.msix_enabled else 'off'}")

    def close(self) -> None:
        self.core.close()


def run_case(kvm, case: dict) -> dict:
    """Run virtio ``case`` with guest RAM from a fresh VM of ``kvm`` (an open
    :class:`pykvm.Kvm`; no vCPU is created). Returns {"outcome", "stops", "ops" (operations
    run), "seconds", "slowest_op" (CPU seconds of the costliest operation), "mem_peak" (bytes), "used" (chains the device
    returned in the queues live at the end), "interrupts" (MSI-X messages or line raises)} and, for a broken invariant,
    "finding" = {"kind": "exception" | "invariant" | "cpu" | "leak", "detail"}. The outcome is
    "done", or "needs_reset" when the device ended the case with DEVICE_NEEDS_RESET set."""
    res: Dict[str, object] = {"outcome": None, "stops": []}
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    fds0 = _fds()
    t0 = time.perf_counter()
    slowest = 0.0
    done = 0
    ops: List[list] = case["vcpus"][0]["ops"]
    finding: Optional[Finding] = None
    h: Optional[_Harness] = None
    try:
        with tempfile.TemporaryDirectory(prefix="pykvm-fuzz-virtio-") as tmp, \
                kvm.create_vm() as vm:
            for gpa, size in (RAM_LOW, RAM_HIGH):
                vm.add_memory(gpa, size)
            mem = vm.memory
            for gpa, data in case["blobs"]:
                mem.write(gpa, data)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            h = _Harness(case, mem, tmp)
            try:
                for op in ops:
                    t = time.process_time()
                    try:
                        h.op(op, mem)
                    except Exception:                   # noqa: BLE001 — the finding
                        raise Finding("exception", f"{op[0]} {op[1:3]}: "
                                      + traceback.format_exc()) from None
                    dt = time.process_time() - t
                    slowest = max(slowest, dt)
                    done += 1
                    if dt > OP_DEADLINE:
                        raise Finding("cpu", f"operation {done - 1} ({op[0]} {op[1:3]}) took "
                                      f"{dt:.2f} s of CPU (bound {OP_DEADLINE} s)")
                    peak = tracemalloc.get_traced_memory()[1] - base
                    if peak > MEM_PEAK_BOUND:
                        raise Finding("leak", f"operation {done - 1} ({op[0]} {op[1:3]}): "
                                      f"{peak} bytes of Python allocations (bound "
                                      f"{MEM_PEAK_BOUND})")
                    h.check()
                res["used"] = sum(q.used_idx for q in h.core.active or () if q is not None)
                res["interrupts"] = h.msis + getattr(h.mmio, "interrupts", 0)
                res["outcome"] = ("needs_reset" if h.core.status & STATUS_DEVICE_NEEDS_RESET
                                  else "done")
            finally:
                h.close()
            if h.image_hash is not None and _sha256(h.image or "") != h.image_hash:
                raise Finding("invariant", "the read-only disk's image file changed")
            res["mem_peak"] = tracemalloc.get_traced_memory()[1] - base
        del h
        kept = tracemalloc.get_traced_memory()[0] - base
        if kept > MEM_KEEP_BOUND:
            raise Finding("leak", f"{kept} bytes of Python allocations outlived the device "
                          f"(bound {MEM_KEEP_BOUND})")
        fds1 = _fds()
        if fds1 != fds0:
            raise Finding("leak", f"{fds1 - fds0} file descriptor(s) left open after close")
    except Finding as f:
        finding = f
    finally:
        if started_tracing:
            tracemalloc.stop()
    res.update(ops=done, seconds=time.perf_counter() - t0, slowest_op=round(slowest, 6))
    if finding is not None:
        res["outcome"] = f"finding:{finding.kind}"
        res["finding"] = {"kind": finding.kind, "detail": finding.detail}
    return res
