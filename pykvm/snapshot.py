"""Machine snapshots: :func:`take` writes a running or stopped :class:`~pykvm.machine.Machine`
to a snapshot file (:mod:`pykvm.snapfile`, format in docs/snapshots.md), :func:`restore` builds
a machine from one, in this process or another, so that the guest continues exactly where it
was.

What a snapshot holds (sections):

* ``meta``: JSON: format facts (host architecture, KVM API version, CPU vendor, the
  monotonic clock at the snapshot), the machine's configuration (platform,
  RAM size, vCPUs, image name, command line, flat-image options, platform
  options), the RAM ranges, the platform's own state (pc: whether the PIT
  was made, the PM block's place, power events)
* ``image``: the guest image's bytes (the machine is rebuilt from them)
* ``initrd.N``: each initrd / multiboot module's bytes
* ``vm``: the VM's :class:`~pykvm.arch.snapstate.ArchState` (JSON, blobs base64)
* ``vcpu.N``: vCPU N's :class:`~pykvm.arch.snapstate.ArchState`
* ``devices``: JSON: each device model's ``snapshot_state()`` and the 16550's registers
* ``ram``: the non-zero pages of guest RAM (zlib-compressed runs)

A restore validates everything first — the file (:func:`pykvm.snapfile.read`), the metadata's
types, the host (architecture, KVM API version, CPU vendor, the CPUID features the guest was
given), every state's shape and every RAM run's place — then builds a fresh machine and loads
RAM, vCPU, VM and device state into it; any failure closes that machine, so nothing half
restored is left. Errors are :class:`~pykvm.errors.SnapshotError` with one line.

A snapshot is data, never a capability (docs/snapshots.md, "What restore trusts"): the
platform options pass only through each machine's whitelist (``_PLATFORM_OPTIONS``; no
disks, shares, networks or Machine arguments), no path the file names is opened (the image is
the bytes it carries; ``image_name`` is a label), every section's decompressed size is bounded
by what the machine the metadata describes can need (the image and initrds by its RAM and the
loader's limit, the RAM by its size, each JSON section by what a real state of its kind needs)
and checked while it is inflated, a section name appears once, every field loaded is type- and
range-checked, and a refusal quotes a value from the file in at most 60 characters, escaped.

A machine with a device whose state lives outside pykvm (virtio devices: a disk image, passt,
virtiofsd, vsock sockets; VT-d and edu, whose in-flight work is not captured; the RISC-V AIA
irqchip) is refused by :func:`take`, naming the device.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import tempfile
import time

from . import snapfile
from ._host import HOST_ARCH
from .abi import ffi
from .arch import current_snapshot as _arch_snapshot
from .arch.snapstate import ArchState
from .boot import MAX_IMAGE_SIZE
from .errors import Busy, InvalidArgument, PykvmError, SnapshotError, shown
from .report import Report
from .kvm import Kvm

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Tuple

# the leaves whose feature bits a restoring host must offer: (leaf, subleaf, register)
_UART_FIELDS = ("uart_dll", "uart_dlm", "uart_thre", "uart_irq_level", "uart_rbr", "uart_lsr",
                "uart_fcr", "uart_rx_head", "uart_rx_count")
# the receive FIFO holds 16 bytes (csrc/pykvm_native.h): its head indexes it, its count is 0-16
_UART_RANGE = {"uart_rx_head": 15, "uart_rx_count": 16, "uart_thre": 1, "uart_irq_level": 1}
PC_FIELDS = ("power_event", "msi_dropped", "edu_bar_conflicts", "sleeps", "pm_base",
             "virtio_bar_conflicts")
MAX_VCPUS = 4096
# the most bytes an image or initrd section may decompress to, whatever the RAM: the loader's
# limit (the RAM size bounds them further: image_limit)
MAX_IMAGE = MAX_IMAGE_SIZE
# the most bytes each JSON section may decompress to. A real x86 vCPU state (registers,
# XSAVE area, MSRs, CPUID, LAPIC, nested state) is tens of KiB of base64; the VM's
# (irqchips, PIT, clock) a few KiB; the devices' (PCI config spaces, the testdev window)
# under a MiB; the metadata's CPUID table at most 4096 entries
MAX_VCPU_JSON = 256 << 10
VCPU_JSON_AVERAGE = 64 << 10
MAX_VM_JSON = 256 << 10
MAX_DEVICES_JSON = 2 << 20
MAX_META_JSON = 1 << 20


# -- encoding helpers ----------------------------------------------------------------------------

def _state_json(s: ArchState) -> dict:
    return {"blobs": {k: base64.b64encode(v).decode() for k, v in s.items()},
            "absent": dict(s.absent)}


def _state_from_json(v: Any, what: str) -> ArchState:
    if not isinstance(v, dict) or not isinstance(v.get("blobs"), dict) or \
            not isinstance(v.get("absent", {}), dict):
        raise SnapshotError(f"{what} state is malformed")
    try:
        blobs = {str(k): base64.b64decode(b, validate=True) for k, b in v["blobs"].items()}
    except (TypeError, ValueError):
        raise SnapshotError(f"{what} state has a malformed blob") from None
    return ArchState(blobs, {str(k): str(x) for k, x in v.get("absent", {}).items()})


def host_vendor(kvm: Any) -> str:
    """The host's identity a snapshot records and a restore must match: the CPU vendor string
    on x86 (CPUID leaf 0 as KVM_GET_SUPPORTED_CPUID gives it), the architecture's name
    elsewhere (:func:`pykvm.arch.x86.snapshot.host_vendor`,
    :func:`pykvm.arch.riscv.snapshot.host_vendor`)."""
    return _arch_snapshot.host_vendor(kvm)


# -- taking a snapshot ----------------------------------------------------------------------------

def refusals(machine: Any) -> List[str]:
    """One line for each device of ``machine`` whose state a snapshot cannot hold (see the
    module docstring); empty when the machine can be snapshotted."""
    out: List[str] = []
    p = machine.platform
    n = len(getattr(p, "virtio_mmio_devices", ())) + len(getattr(p, "virtio_pci_devices", ()))
    for d in getattr(machine, "_virtio", ()):
        out.append(f"{type(d).__name__} (virtio device state is not captured)")
    if n > len(out):
        out.append(f"{n - len(out)} virtio transport(s) (virtio device state is not captured)")
    if getattr(p, "vtd", None) is not None:
        out.append("intel-iommu (VT-d queued work is not captured)")
    if getattr(p, "edu", None) is not None:
        out.append("edu (its DMA and timer work is not captured)")
    if getattr(p, "aia", None) is not None:
        out.append("the RISC-V AIA irqchip (APLIC/IMSIC state is not captured)")
    if getattr(p, "_sleeping", False):
        out.append("the pc machine in S3 sleep")
    return out


def finished(machine: Any) -> str:
    """Why ``machine``'s guest has ended for good ("" if it has not): a run ended it (the
    guest powered off or reset the pc machine: :class:`~pykvm.errors.MachineEnded`), or the
    guest reported it finished: every vCPU reported done (:attr:`Machine.finished_vcpus`;
    one vCPU done while another runs on is not the end). A snapshot of such a guest would
    only restore a machine with nothing left to run, so :func:`take` refuses it
    (docs/snapshots.md)."""
    ended = getattr(machine, "_ended", None)
    if ended:
        return str(ended)
    if len(machine.finished_vcpus) >= len(machine.vcpus):
        return "it reported done" if len(machine.vcpus) == 1 else "every vCPU reported done"
    return ""


def uart_state(group: Any) -> Dict[str, Any]:
    """The state of the 16550 the C run loop serves for the vCPUs of ``group`` (its registers,
    its receive FIFO and the host input not yet taken) as JSON-able values: hex strings for
    the byte arrays. Used by snapshots and by :mod:`pykvm.rewind`."""
    s = group.state
    out: Dict[str, Any] = {k: int(getattr(s, k)) for k in _UART_FIELDS}
    out["uart"] = bytes(ffi.buffer(s.uart, 8)).hex()
    out["uart_rx"] = bytes(ffi.buffer(s.uart_rx, 16)).hex()
    pending = b""
    if s.uart_in and s.uart_in_len:
        ring = ffi.buffer(ffi.cast("uint8_t *", s.uart_in), s.uart_in_cap)
        head, n, cap = int(s.uart_in_head), int(s.uart_in_len), int(s.uart_in_cap)
        pending = bytes(ring[head:min(head + n, cap)]) + bytes(ring[:max(0, head + n - cap)])
    out["input"] = pending.hex()
    return out


def load_uart(group: Any, st: Dict[str, Any]) -> None:
    """Put :func:`uart_state`'s ``st`` back into ``group``'s 16550 (pending input fed again)."""
    s = group.state
    for k in _UART_FIELDS:
        setattr(s, k, st[k])
    ffi.memmove(s.uart, bytes.fromhex(st["uart"]), 8)
    ffi.memmove(s.uart_rx, bytes.fromhex(st["uart_rx"]), 16)
    if st["input"]:
        group.feed(bytes.fromhex(st["input"]))


def _check_uart(st: Any) -> None:
    if not isinstance(st, dict):
        raise SnapshotError("the UART state is malformed")
    try:
        if set(st) - set(_UART_FIELDS) - {"uart", "uart_rx", "input"}:
            raise SnapshotError("the UART state has unknown fields")
        for k in _UART_FIELDS:
            v = st[k]
            hi = _UART_RANGE.get(k, 0xFF)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
                raise SnapshotError(f"the UART's {k} is {shown(v)}, not 0-{hi}")
        if st["uart_fcr"] & ~0xC9 or st["uart_lsr"] & ~0x1F:
            raise SnapshotError("the UART's FCR or LSR has bits the 16550 model never keeps")
        for k in ("uart", "uart_rx", "input"):
            if not isinstance(st[k], str):
                raise SnapshotError(f"the UART's {k} is not a hex string")
        if len(bytes.fromhex(st["uart"])) != 8 or len(bytes.fromhex(st["uart_rx"])) != 16:
            raise SnapshotError("the UART's register file is malformed")
        if len(bytes.fromhex(st["input"])) > 1 << 12:
            raise SnapshotError("the UART's pending input is too long")
    except (KeyError, TypeError, ValueError):
        raise SnapshotError("the UART state is malformed") from None


def device_models(platform: Any) -> Dict[str, Any]:
    """{name: model} of the snapshot-protocol device models ``platform`` has."""
    out: Dict[str, Any] = {}
    for name in ("i8042", "rtc", "pci", "fwcfg", "port92", "testdev", "pm"):
        d = getattr(platform, name, None)
        if d is not None and hasattr(d, "snapshot_state"):
            out[name] = d
    return out


def _complete_pending(machine: Any) -> None:
    """Finish each vCPU's pending I/O or MMIO exit (api.rst: the state is consistent only
    once KVM_RUN was entered again) without running the guest."""
    for v in machine.vcpus:
        try:
            v.complete_io()
        except PykvmError:
            pass                       # a vCPU that never ran, or another exit: nothing pending


def take(machine: Any, path: str) -> int:
    """Write a snapshot of ``machine`` to ``path`` (module docstring). A running machine is
    paused for the capture and resumed after; a stopped one (between runs or steps) is
    captured as it is. Returns the file's size in bytes. Raises
    :class:`~pykvm.errors.SnapshotError` for a machine with a device that cannot be
    snapshotted (naming it), whose guest has ended (:func:`finished`), or one that could not
    be paused, and for a ``path`` :func:`pykvm.snapfile.check_target` refuses (not a str or
    PathLike, empty, in a missing directory or one where the file cannot be made, naming a
    directory, FIFO or device), for an image larger than a restore accepts
    (:func:`image_limit`), and for any OSError while the file is written (naming the path
    and the error); :class:`~pykvm.errors.KvmError` when KVM refuses a read."""
    machine._check_open()
    snapfile.check_target(path)            # a bad path is refused before the machine pauses
    ended = finished(machine)
    if ended:
        raise SnapshotError(f"cannot snapshot this machine: its guest has ended ({ended}); "
                            "there is nothing to continue")
    refused = refusals(machine)
    if refused:
        raise SnapshotError("cannot snapshot this machine: " + "; ".join(refused))
    with contextlib.ExitStack() as held:
        try:                                   # a hold of its own: no resume() ends it
            held.enter_context(machine.holding("snapshot", 10.0))
        except Busy:
            raise SnapshotError("cannot snapshot: the machine did not pause within 10 s") from None
        return _write(machine, path)


def _write(machine: Any, path: str) -> int:
    p = machine.platform
    group = getattr(p, "_uart_group", None)
    if group is not None:
        machine.flush_console()
    _complete_pending(machine)
    machine.settle_held_time()             # a paused RISC-V guest's time: the one it was held at
    w = snapfile.Writer()
    cfg = dict(machine._snapshot_config)
    src = cfg.pop("image")
    image = src if isinstance(src, bytes) else _read_file(src, "guest image")
    initrds = [f if isinstance(f, bytes) else _read_file(f, "initrd") for f in cfg.pop("initrd")]
    cfg["image_name"] = machine.image_name
    limit, why = image_limit(cfg["mem_size"])
    for data, name in [(image, "image")] + [(d, f"initrd {i}") for i, d in enumerate(initrds)]:
        if len(data) > limit:              # restore() would refuse it: refused here instead
            raise SnapshotError(f"cannot snapshot this machine: its {name} is {len(data)} "
                                f"bytes, more than {why} ({limit} bytes) a snapshot's may be")
    if sum(map(len, initrds)) > cfg["mem_size"]:
        raise SnapshotError("cannot snapshot this machine: its initrds are larger than its RAM")
    try:
        json.dumps(cfg["platform_opts"])
    except (TypeError, ValueError):
        raise SnapshotError("cannot snapshot this machine: its platform options "
                            f"{sorted(cfg['platform_opts'])} are not plain values") from None
    ranges = sorted((s.gpa, s.end) for s in machine.vm.memory)
    vcpus = [v.save_state() for v in machine.vcpus]
    vm_state = machine.vm.save_state()
    devices = {name: d.snapshot_state() for name, d in device_models(p).items()}
    if group is not None:
        devices["uart16550"] = uart_state(group)
    plat: Dict[str, Any] = {"name": p.name}
    for k in PC_FIELDS:
        if hasattr(p, k):
            plat[k] = getattr(p, k)
    if hasattr(p, "pit_created"):
        plat["pit_created"] = bool(p.pit_created)
    given = p.vcpu_cpuid(0) if hasattr(p, "vcpu_cpuid") else []   # x86: what vCPU 0 was given
    meta = {
        "format": snapfile.FORMAT_VERSION, "arch": HOST_ARCH,
        "kvm_api_version": machine.kvm.api_version, "vendor": host_vendor(machine.kvm),
        "mono_ns": time.monotonic_ns(), "taken_unix_ns": time.time_ns(),
        "config": cfg, "vcpus": len(machine.vcpus), "ram": [list(r) for r in ranges],
        "platform": plat, "initrds": len(initrds),
        "image_sha256": hashlib.sha256(image).hexdigest(),
        "cpuid": [list(map(int, e)) for e in given],
        "finished_vcpus": sorted(machine.finished_vcpus),
    }
    w.add_json("meta", meta)
    w.add("image", image, compress=True)
    for i, data in enumerate(initrds):
        w.add(f"initrd.{i}", data, compress=True)
    w.add_json("vm", _state_json(vm_state))
    for i, s in enumerate(vcpus):
        w.add_json(f"vcpu.{i}", _state_json(s))
    w.add_json("devices", devices)
    slots = [(s.gpa, machine.vm.memory.view(s.gpa, s.size)) for s in sorted(
        machine.vm.memory, key=lambda s: s.gpa)]
    with machine.original_ram():       # a debugger's breakpoints: the guest's own bytes
        ram = snapfile.encode_ram(slots)
    w.add("ram", ram, compress=True)
    return w.write(path)


# -- restoring -----------------------------------------------------------------------------------

class Plan:
    """A snapshot file read and checked, ready to build a machine from: ``meta`` (dict),
    ``image`` (bytes), ``initrds`` (list of bytes), ``vm`` and ``vcpus`` (ArchStates),
    ``devices`` (dict), ``ram`` (the decompressed RAM payload) and ``runs`` ((gpa, offset,
    length) in it)."""

    def __init__(self, path: Any):
        secs = snapfile.read(path)
        what = str(os.fspath(path))[:200]
        meta = snapfile.json_section(secs, "meta", what=what, limit=MAX_META_JSON)
        self.meta = _check_meta(meta, what, secs.version)
        self.cpuid: List[Tuple[int, ...]] = [tuple(e) for e in meta["cpuid"]]
        known = {"meta", "image", "vm", "devices", "ram"} | \
            {f"initrd.{i}" for i in range(meta["initrds"])} | \
            {f"vcpu.{i}" for i in range(meta["vcpus"])}
        extra = sorted(set(secs) - known)
        if extra:                      # refused before any other section is decompressed
            raise SnapshotError(f"{what}: unknown sections {', '.join(extra[:4])}")
        # every section's decompressed size is bounded by what the machine the metadata
        # describes can need, and checked while it is inflated (Section.payload): the image
        # and the initrds by its RAM (the loader puts them there) and the loader's limit
        mem_size = meta["config"]["mem_size"]
        if "image" not in secs:
            raise SnapshotError(f"{what}: the 'image' section is missing")
        limit, why = image_limit(mem_size)
        self.image = _payload(secs["image"], limit, why, what)
        if hashlib.sha256(self.image).hexdigest() != meta["image_sha256"]:
            raise SnapshotError(f"{what}: the guest image does not match its recorded digest")
        self.initrds = []
        ram_left = mem_size                # every initrd goes into guest RAM whole
        for i in range(meta["initrds"]):
            s = secs.get(f"initrd.{i}")
            if s is None:
                raise SnapshotError(f"{what}: the 'initrd.{i}' section is missing")
            limit, why = image_limit(ram_left)
            if ram_left < mem_size:
                why += " less the initrds before it"
            self.initrds.append(_payload(s, limit, why, what))
            ram_left -= len(self.initrds[-1])
        # the JSON sections' decompressed sizes: each bounded by what a real state of its kind
        # needs, and their sum by what the recorded vCPU count needs on average
        left = [MAX_VM_JSON + MAX_DEVICES_JSON + meta["vcpus"] * VCPU_JSON_AVERAGE]

        def state_json(name: str, limit: int) -> Any:
            s = secs.get(name)
            if s is None:
                raise SnapshotError(f"{what}: the {name!r} section is missing")
            raw = _payload(s, min(limit, left[0]), "what a real state needs", what)
            left[0] -= len(raw)
            return snapfile.json_section({name: snapfile.Section(name, raw, False)}, name,
                                         what=what, limit=len(raw))

        self.vm = _state_from_json(state_json("vm", MAX_VM_JSON), "VM")
        self.vcpus = [_state_from_json(state_json(f"vcpu.{i}", MAX_VCPU_JSON), f"vCPU {i}")
                      for i in range(meta["vcpus"])]
        devices = state_json("devices", MAX_DEVICES_JSON)
        if not isinstance(devices, dict):
            raise SnapshotError(f"{what}: the device states are malformed")
        if "uart16550" in devices:
            _check_uart(devices["uart16550"])
        self.devices = devices
        ranges = [(lo, hi) for lo, hi in meta["ram"]]
        total = sum(hi - lo for lo, hi in ranges)
        host = _host_memory()
        if host and total > host:
            # the RAM payload is decompressed in memory: a hostile file's claim is bounded
            raise SnapshotError(f"{what}: the snapshot's {total} bytes of guest RAM are more "
                                f"than this host's {host}")
        if "ram" not in secs:
            raise SnapshotError(f"{what}: the 'ram' section is missing")
        # a run record per page at most: RAM plus 16 bytes a page bounds the payload
        self.ram = _payload(secs["ram"], total + (total // snapfile.PAGE + 1) * 16,
                            "the guest RAM size and a record header a page", what)
        self.runs = snapfile.decode_ram(self.ram, ranges)

    def check_host(self, kvm: Any) -> None:
        """Refuse (SnapshotError, one line) a snapshot foreign to this host: another
        architecture, KVM API version or CPU vendor, or CPUID features the host's KVM does not
        offer. Values from the file are quoted as :func:`pykvm.errors.shown` shows them."""
        m = self.meta
        if m["arch"] != HOST_ARCH:
            raise SnapshotError(f"foreign snapshot: taken on {shown(m['arch'])}, this "
                                f"host is {HOST_ARCH}")
        if m["kvm_api_version"] != kvm.api_version:
            raise SnapshotError(f"foreign snapshot: KVM API version {m['kvm_api_version']}, "
                                f"this host's is {kvm.api_version}")
        vendor = host_vendor(kvm)
        if m["vendor"] != vendor:
            raise SnapshotError(f"foreign snapshot: taken on a {shown(m['vendor'])} "
                                f"CPU, this host is {vendor}")
        why = _arch_snapshot.cpuid_mismatch(self.cpuid, kvm, vendor)
        if why:                            # it may hold a vendor string from the file
            raise SnapshotError(f"foreign snapshot: {snapfile.printable(why, 200)}")


def image_limit(ram: int) -> Tuple[int, str]:
    """(bytes, what sets them): the most an image or initrd of a machine with ``ram`` bytes of
    guest RAM (left) may be in a snapshot: that RAM, which the loader puts it in, or the
    loader's limit :data:`pykvm.boot.MAX_IMAGE_SIZE`, whichever is smaller. :func:`take`
    refuses a machine whose image is larger, so that every snapshot written restores."""
    if ram < MAX_IMAGE:
        return max(ram, 0), "the guest RAM size"
    return MAX_IMAGE, "the loader's limit"


def _payload(s: snapfile.Section, limit: int, why: str, what: str) -> bytes:
    try:
        return s.payload(limit, why)
    except SnapshotError as e:
        raise SnapshotError(f"{what}: {e}") from None


def _check_meta(m: Any, what: str, version: int = snapfile.FORMAT_VERSION) -> dict:
    """The metadata ``m`` of a file whose header gives format ``version``, checked (types,
    ranges, what that version must and may hold); raises SnapshotError naming the field."""
    def bad(field: str) -> SnapshotError:
        return SnapshotError(f"{what}: metadata field {field!r} is missing or malformed")

    if not isinstance(m, dict):
        raise SnapshotError(f"{what}: metadata is not a JSON object")
    # the metadata's own format must be the header's: a file whose header and metadata
    # disagree is crafted or corrupted, and which rules apply (finished_vcpus) would be a guess
    if type(m.get("format")) is not int or m["format"] != version:
        raise SnapshotError(f"{what}: metadata field 'format' is {shown(m.get('format'))}, "
                            f"the file's header says format version {version}")
    # version 2 added finished_vcpus and always writes it; a version 1 file cannot hold it
    if version >= 2 and "finished_vcpus" not in m:
        raise bad("finished_vcpus")
    if version == 1 and "finished_vcpus" in m:
        raise SnapshotError(f"{what}: metadata field 'finished_vcpus' in a format version 1 "
                            "file (version 2 added it)")
    for k, t in (("arch", str), ("vendor", str), ("kvm_api_version", int), ("mono_ns", int),
                 ("vcpus", int), ("initrds", int), ("image_sha256", str), ("config", dict),
                 ("ram", list), ("platform", dict)):
        if not isinstance(m.get(k), t) or isinstance(m.get(k), bool):
            raise bad(k)
    if not 1 <= m["vcpus"] <= MAX_VCPUS:
        raise bad("vcpus")
    if not 0 <= m["initrds"] <= 64:
        raise bad("initrds")
    done = m.setdefault("finished_vcpus", [])      # format 1 files: no vCPU had finished
    # the elements' types are checked before they are hashed or compared (a nested list or
    # a mix of types must be "malformed", not a TypeError)
    if not isinstance(done, list) or len(done) >= m["vcpus"] or \
            not all(type(i) is int and 0 <= i < m["vcpus"] for i in done) or \
            done != sorted(set(done)):
        raise bad("finished_vcpus")
    cpuid = m.get("cpuid")
    if not isinstance(cpuid, list) or len(cpuid) > 4096 or not all(
            isinstance(e, list) and len(e) == 7 and all(
                isinstance(x, int) and 0 <= x < 1 << 32 for x in e) for e in cpuid):
        raise bad("cpuid")
    for r in m["ram"]:
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)
                and 0 <= r[0] < r[1] <= 1 << 52):
            raise bad("ram")
    if not 0 <= m["mono_ns"] < 1 << 63 or not 0 <= m["kvm_api_version"] < 1 << 31:
        raise bad("mono_ns" if not 0 <= m["mono_ns"] < 1 << 63 else "kvm_api_version")
    if not _RE_SHA256.fullmatch(m["image_sha256"]):
        raise bad("image_sha256")
    if _arch_snapshot.CPUID_REQUIRED and m["arch"] == HOST_ARCH and not cpuid:
        raise bad("cpuid")                 # every x86 machine gives its vCPUs a CPUID table
    ram = sorted(m["ram"])
    if not ram or len(ram) > 16 or any(a[1] > b[0] for a, b in zip(ram, ram[1:])):
        raise bad("ram")
    cfg = m["config"]
    if set(cfg) != _CONFIG_KEYS:
        raise SnapshotError(f"{what}: the machine configuration has fields "
                            f"{shown(sorted(set(cfg) ^ _CONFIG_KEYS))} it may not")
    for k, t in (("mem_size", int), ("machine", str), ("cmdline", str), ("flat_mode", str),
                 ("image_name", str), ("platform_opts", dict)):
        if not isinstance(cfg.get(k), t) or isinstance(cfg.get(k), bool):
            raise bad(f"config.{k}")
    if cfg["flat_mode"] not in _FLAT_MODES:
        raise bad("config.flat_mode")
    fa = cfg["flat_addr"]
    if fa is not None and (not isinstance(fa, int) or isinstance(fa, bool) or
                           not 0 <= fa < 1 << 52):
        raise bad("config.flat_addr")
    if len(cfg["cmdline"]) > 1 << 16 or "\0" in cfg["cmdline"]:
        raise bad("config.cmdline")
    if len(cfg["image_name"]) > 4096 or any(ord(c) < 0x20 or ord(c) == 0x7F
                                            for c in cfg["image_name"]):
        raise bad("config.image_name")
    total = sum(hi - lo for lo, hi in ram)
    host = _host_memory()
    if host and total > host:
        # the RAM payload is decompressed in memory: a hostile file's claim is bounded
        raise SnapshotError(f"{what}: the snapshot's {total} bytes of guest RAM are more "
                            f"than this host's {host}")
    if not 0 < cfg["mem_size"] <= 1 << 46 or cfg["mem_size"] % snapfile.PAGE or \
            cfg["mem_size"] != total:
        raise bad("config.mem_size")
    plat = m["platform"]
    name = plat.get("name", cfg["machine"])
    if not isinstance(name, str) or name not in _PLATFORM_OPTIONS:
        raise SnapshotError(f"{what}: the snapshot's machine {shown(name)} is not one "
                            f"a snapshot can restore ({', '.join(sorted(_PLATFORM_OPTIONS))})")
    if cfg["machine"] not in ("auto", name):
        raise bad("config.machine")
    for k, v in plat.items():
        check = _PLATFORM_FIELDS.get(k)
        if check is None or not check(v):
            raise SnapshotError(f"{what}: the platform state's {shown(k)} is unknown "
                                f"or malformed")
    _check_platform_opts(name, cfg["platform_opts"], what)
    return m


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63


def _is_names(v: Any, allowed: Any) -> bool:
    return isinstance(v, list) and len(v) <= 16 and all(
        isinstance(x, str) and x in allowed for x in v)


# what restore() accepts of meta["platform"] (the fields _write records)
_PLATFORM_FIELDS = {
    "name": lambda v: isinstance(v, str),
    "pit_created": lambda v: isinstance(v, bool),
    "power_event": lambda v: v is None,            # a machine that powered off is not taken
    "msi_dropped": _is_count, "edu_bar_conflicts": _is_count, "sleeps": _is_count,
    "virtio_bar_conflicts": _is_count,
    "pm_base": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and
                                       0 <= v <= 0xFFC0),
}
_CONFIG_KEYS = {"mem_size", "machine", "cmdline", "flat_addr", "flat_mode", "image_name",
                "platform_opts"}
_FLAT_MODES = {"x86_64": ("real", "protected", "long"),
               "riscv64": ("real", "riscv")}.get(HOST_ARCH, ())   # "real": the default
_RE_SHA256 = re.compile("[0-9a-f]{64}")
# the platform options restore() passes on, per machine: only those a machine that
# take() accepts can have (no virtio devices, no edu / VT-d), each with its check. Anything
# else a snapshot names (disks, shares, nets, vsock, Machine's own arguments) is refused:
# a snapshot is data, never a way to open host files or sockets.
_PLATFORM_OPTIONS: Dict[str, Dict[str, Any]] = {
    "bare": {"irqchip": lambda v: isinstance(v, bool), "pit": lambda v: isinstance(v, bool),
             "cpuid": lambda v: v is None or isinstance(v, list)},
    "pc": {"irqchip": lambda v: v is True, "pit": lambda v: v is True,
           "lost_tick_policy": lambda v: v in ("delay", "discard"),
           "devices": lambda v: _is_names(v, ()),
           "cpuid": lambda v: v is None or isinstance(v, list)},
    "virt": {"cpu_type": lambda v: isinstance(v, str) and len(v) <= 64,
             "disable": lambda v: isinstance(v, list) and len(v) <= 64 and all(
                 isinstance(x, str) and len(x) <= 64 for x in v),
             "sbi_extensions": lambda v: isinstance(v, list) and len(v) <= 64 and all(
                 isinstance(x, str) and len(x) <= 64 for x in v),
             "suspend_seconds": lambda v: isinstance(v, (int, float)) and
             not isinstance(v, bool) and 0 <= v <= 3600,
             "uart": lambda v: isinstance(v, bool), "aia": lambda v: v is None or v is False},
}


def _check_platform_opts(machine: str, opts: Dict[str, Any], what: str) -> None:
    allowed = _PLATFORM_OPTIONS[machine]
    for k, v in opts.items():
        check = allowed.get(k)
        if check is None:
            raise SnapshotError(f"{what}: the {machine} machine's options in the snapshot name "
                                f"{shown(k)}, which a snapshot may not set (allowed: "
                                f"{', '.join(sorted(allowed))})")
        if not check(v):
            raise SnapshotError(f"{what}: the {machine} machine's option {k!r} is "
                                f"{shown(v)}, which it may not be")


def restore(cls: Any, path: Any, **overrides: Any) -> Any:
    """A new machine of class ``cls`` (:class:`~pykvm.machine.Machine`) built from the snapshot
    at ``path`` and loaded with its state: run it and the guest continues where it was.
    ``overrides``: Machine keyword arguments for what a snapshot does not record (``loop``,
    ``on_console``, ``console_limit``, ``report_limit``, ``kvm``, ``vm_setup``). Raises
    :class:`~pykvm.errors.SnapshotError` (one line) for a missing, unreadable, non-regular,
    corrupted, crafted or foreign snapshot, or state that does not fit the machine built
    (errors KVM or the loader raise while building and loading are wrapped in it); nothing is
    left running then. Raises TypeError when ``path`` is not a str or os.PathLike (an int is
    never taken as a file descriptor), ValueError for an override not listed. A refusal's
    line shows every character that is not printable ASCII as its escape
    (:func:`pykvm.snapfile.printable`), whatever check raised it."""
    try:
        return _restore(cls, path, **overrides)
    except SnapshotError as e:
        line = str(e)
        clean = snapfile.printable(line.splitlines()[0] if line else "", 400)
        if clean == line:
            raise
        raise SnapshotError(clean) from None


def _restore(cls: Any, path: Any, **overrides: Any) -> Any:
    allowed = {"loop", "on_console", "console_limit", "report_limit", "kvm", "vm_setup"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise InvalidArgument(f"restore() cannot override {', '.join(bad)} (allowed: "
                              f"{', '.join(sorted(allowed))})")
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise TypeError(f"restore() takes a snapshot path (str or os.PathLike), not "
                        f"{type(path).__name__}")
    # the overrides used before the machine is built are checked here, so that a wrong one
    # is a typed error naming it, not an AttributeError from the host check
    if overrides.get("kvm") is not None and not isinstance(overrides["kvm"], Kvm):
        raise InvalidArgument(f"restore(): kvm must be a pykvm.kvm.Kvm or None, not "
                              f"{type(overrides['kvm']).__name__}")
    if overrides.get("vm_setup") is not None and not callable(overrides["vm_setup"]):
        raise InvalidArgument(f"restore(): vm_setup must be callable or None, not "
                              f"{type(overrides['vm_setup']).__name__}")
    plan = Plan(path)
    meta = plan.meta
    cfg = meta["config"]
    kvm = overrides.get("kvm")
    own_kvm = None
    if kvm is None:
        kvm = own_kvm = Kvm()
    try:
        plan.check_host(kvm)
    except BaseException:
        if own_kvm is not None:
            own_kvm.close()
        raise
    opts = dict(cfg["platform_opts"])
    opts.pop("cpuid", None)
    if plan.cpuid:
        opts["cpuid"] = [tuple(e) for e in plan.cpuid]
    m = None
    try:
        with tempfile.TemporaryDirectory(prefix="pykvm-restore-") as tmp:
            # the image and initrds are the bytes the snapshot carries, written to files of
            # names chosen here: image_name is only shown (machine.image_name), never opened
            image = os.path.join(tmp, "image")
            with open(image, "wb") as f:
                f.write(plan.image)
            initrd = []
            for i, data in enumerate(plan.initrds):
                p = os.path.join(tmp, f"initrd{i}")
                with open(p, "wb") as f:
                    f.write(data)
                initrd.append(p)
            kw = {k: v for k, v in overrides.items()}
            kw["kvm"] = kvm
            m = cls(image, mem_size=cfg["mem_size"], vcpus=meta["vcpus"],
                    cmdline=cfg["cmdline"], flat_addr=cfg["flat_addr"],
                    flat_mode=cfg["flat_mode"], initrd=initrd,
                    machine=meta["platform"].get("name", cfg["machine"]), **opts, **kw)
            m.symbols.variables()          # read the symbols while the image file is there
        if own_kvm is not None:
            m._own_kvm = True
            own_kvm = None
        m.image_name = cfg["image_name"]
        m._snapshot_config["image"] = plan.image      # a later snapshot carries these bytes
        m._snapshot_config["initrd"] = tuple(plan.initrds)
        _load(m, plan)
    except BaseException as e:
        if m is not None:
            m.close()
        if own_kvm is not None:
            own_kvm.close()
        if isinstance(e, SnapshotError) or not isinstance(e, (PykvmError, ValueError,
                                                                TypeError, OSError,
                                                                OverflowError, KeyError)):
            raise
        raise SnapshotError(f"the snapshot does not build a machine: {type(e).__name__}: "
                            f"{shown(str(e).splitlines()[0] if str(e) else '', 160)}"
                            ) from None
    return m


def _read_file(path: Any, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SnapshotError(f"cannot snapshot: the {what} {path} cannot be read again "
                            f"({e.strerror or e})") from None


def _host_memory() -> int:
    """The host's physical memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _load(m: Any, plan: Plan) -> None:
    meta = plan.meta
    p = m.platform
    ranges = sorted([s.gpa, s.end] for s in m.vm.memory)
    if ranges != sorted(meta["ram"]):
        raise SnapshotError(f"the machine built has RAM {ranges}, the snapshot "
                            f"{shown(meta['ram'])}")
    if len(m.vcpus) != len(plan.vcpus):
        raise SnapshotError(f"the machine built has {len(m.vcpus)} vCPUs, the snapshot "
                            f"{len(plan.vcpus)}")
    plat = meta["platform"]
    if plat.get("pit_created") and hasattr(p, "_ensure_pit"):
        p._ensure_pit()
    # check every piece before anything is loaded: each state names only the pieces this
    # machine's own vCPUs and VM have (what save_state() of the fresh ones gives), holds no
    # more MSRs than they do, and fits their structs (check_state)
    fresh_vcpu = m.vcpus[0].save_state()
    fresh_vm = m.vm.save_state()
    for i, (v, s) in enumerate(zip(m.vcpus, plan.vcpus)):
        _check_names(s, fresh_vcpu, f"vCPU {i}")
        v.check_state(s)
    _check_names(plan.vm, fresh_vm, "VM")
    m.vm.check_state(plan.vm)
    devs = device_models(p)
    if set(plan.devices) - {"uart16550"} != set(devs):
        raise SnapshotError(f"the snapshot has devices {shown(sorted(plan.devices))}, "
                            f"the machine built {sorted(devs)}")
    for name, d in devs.items():
        d._check_state(_strip_nested(name, plan.devices[name]))
    # RAM: zero it all, then write the stored pages
    mem = m.vm.memory
    for s in m.vm.memory:
        mem.zero(s.gpa, s.size)
    ram = plan.ram
    for gpa, off, length in plan.runs:
        mem.write(gpa, memoryview(ram)[off:off + length])
    for v, s in zip(m.vcpus, plan.vcpus):
        v.load_state(s)
    m.vm.load_state(plan.vm)
    delta = time.monotonic_ns() - meta["mono_ns"]
    for name, d in devs.items():
        d.restore_state(plan.devices[name], mono_delta=delta)
    if "uart16550" in plan.devices and getattr(p, "_uart_group", None) is not None:
        load_uart(p._uart_group, plan.devices["uart16550"])
    for k in PC_FIELDS:
        if k in plat and hasattr(p, k):
            setattr(p, k, plat[k])
    m._finished = {i: Report("done", vcpu=i) for i in meta["finished_vcpus"]}
    for hook in ("_map_pm", "_rtc_changed", "_pm_changed"):
        fn = getattr(p, hook, None)
        if fn is not None:
            fn()


def _check_names(state: ArchState, fresh: ArchState, what: str) -> None:
    known = set(fresh) | set(fresh.absent)
    unknown = sorted(n for n in list(state) + list(state.absent) if n not in known)
    if unknown:
        raise SnapshotError(f"{what} state has pieces this machine does not have: "
                            f"{shown(', '.join(unknown))}")
    mine, theirs = state.get("msrs"), fresh.get("msrs")
    if mine is not None and theirs is not None and len(mine) > len(theirs):
        raise SnapshotError(f"{what} state holds {len(mine)} bytes of MSRs, more than the "
                            f"{len(theirs)} this vCPU's MSR list gives")


def _strip_nested(name: str, state: Any) -> Any:
    """The part of a device's state its own fields check (the composite models check the
    rest in restore_state)."""
    if isinstance(state, dict) and name in ("pci", "testdev"):
        return {k: v for k, v in state.items() if k not in ("functions", "iomem")}
    return state
