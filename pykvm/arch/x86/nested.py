"""x86 nested virtualization: what the host offers (honestly), and KVM_GET/SET_NESTED_STATE.

The verdict never claims more than the evidence: nested is *available* only when a VMX or SVM
KVM module is loaded with ``nested`` on, the VMX/SVM bit is in KVM_GET_SUPPORTED_CPUID, and
KVM_CAP_NESTED_STATE is non-zero.
"""
from __future__ import annotations

import errno
import os

from ..._record import as_dict, field, Record
from ... import abi
from ..._ioctl import ioctl
from ...abi import ffi, ioctls
from ...errors import KvmTooBig, PykvmError, kvm_error
from .regs import CpuidEntry, cpuid_lookup
from .svm import CPUID_SVM_ECX_BIT, CPUID_SVM_FEATURES, CPUID_SVM_LEAF, EFER_SVME

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional

SYS_MODULE = "/sys/module"
_HDR_SIZE = ffi.sizeof("struct kvm_nested_state")   # 128
FORMATS = {v: k for k, v in abi.arch.NESTED_STATE_FORMATS.items()}
FLAGS = abi.arch.NESTED_STATE_FLAGS

BACKEND_MODULES = {"kvm_intel": "vmx", "kvm_amd": "svm"}
SWITCHES = {
    "kvm_amd": ["nested", "npt", "nrips", "vgif", "vls", "avic"],
    "kvm_intel": ["nested", "ept", "unrestricted_guest", "enable_shadow_vmcs"],
}


class NestedUnavailable(PykvmError):
    """Nested state was asked of a host that does not offer nested virtualization."""


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _switch(value: Optional[str]):
    if value is None:
        return None
    if value in ("Y", "y", "1"):
        return True
    if value in ("N", "n", "0"):
        return False
    try:
        return int(value)
    except ValueError:
        return value


class NestedReport(Record):
    """Whether nested virtualization is available (``available``, ``backend``, ``reason``) and
    the evidence for the verdict: the lines in ``evidence``, the CPU ``vendor``, the KVM
    ``module`` and its ``switches`` (parameter name -> value), the VMX/SVM CPUID bits KVM
    offers, ``KVM_CAP_NESTED_STATE`` (bytes), ``KVM_CAP_HYPERV_ENLIGHTENED_VMCS`` and
    ``KVM_CAP_X86_GUEST_MODE``."""
    available: bool
    backend: str                      # "vmx", "svm" or another module name / "none"
    reason: str
    evidence: List[str] = field(default_factory=list)
    vendor: Optional[str] = None
    module: Optional[str] = None
    switches: Dict[str, object] = field(default_factory=dict)
    cpuid_vmx: bool = False
    cpuid_svm: bool = False
    nested_state_size: int = 0
    hyperv_enlightened_vmcs: int = 0
    x86_guest_mode: int = 0

    def as_dict(self) -> dict:
        """A JSON-ready dict of the report (what pykvm caps --json shows under nested)."""
        return as_dict(self)


def _cpu_vendor(entries) -> Optional[str]:
    e = cpuid_lookup(entries, 0)
    if e is None:
        return None
    raw = b"".join(x.to_bytes(4, "little") for x in (e.ebx, e.edx, e.ecx))
    return raw.decode("ascii", "replace")


def nested_report(kvm, sys_module: str = SYS_MODULE) -> NestedReport:
    """Gather the evidence and give the verdict for ``kvm`` (a :class:`pykvm.Kvm`)."""
    evidence = []
    loaded = [m for m in sorted(os.listdir(sys_module)) if m == "kvm" or m.startswith("kvm_")] \
        if os.path.isdir(sys_module) else []
    evidence.append(f"KVM modules in {sys_module}: {', '.join(loaded) or 'none'}")
    module = next((m for m in ("kvm_intel", "kvm_amd") if m in loaded), None)
    if module:
        backend = BACKEND_MODULES[module]
    else:
        other = [m for m in loaded if m != "kvm"]
        backend = other[0] if other else "none"
        module = other[0] if other else None
    switches = {}
    for name in SWITCHES.get(module or "", []):
        switches[name] = _switch(_read(os.path.join(sys_module, module, "parameters", name)))
    entries = kvm.supported_cpuid()
    vendor = _cpu_vendor(entries)
    evidence.append(f"CPUID vendor (supported CPUID leaf 0): {vendor}")
    l1 = cpuid_lookup(entries, 1)
    ext = cpuid_lookup(entries, 0x80000001)
    cpuid_vmx = bool(l1 and l1.ecx & (1 << 5))
    cpuid_svm = bool(ext and ext.ecx & (1 << 2))
    evidence.append(f"supported CPUID: VMX (1.ECX[5])={int(cpuid_vmx)}, "
                    f"SVM (0x80000001.ECX[2])={int(cpuid_svm)}")
    size = kvm.check_extension("NESTED_STATE")
    evmcs = kvm.check_extension("HYPERV_ENLIGHTENED_VMCS")
    guest_mode = kvm.check_extension("X86_GUEST_MODE")
    evidence.append(f"KVM_CAP_NESTED_STATE={size}")

    if backend not in ("vmx", "svm"):
        reason = (f"KVM is provided by {module or 'an unknown backend'}, not kvm_intel (VMX) or "
                  f"kvm_amd (SVM): this host's KVM cannot run nested hypervisors")
        available = False
    elif not switches.get("nested"):
        reason = f"{module} is loaded with nested={switches.get('nested')}"
        available = False
    elif not (cpuid_vmx if backend == "vmx" else cpuid_svm):
        reason = f"{backend.upper()} is not in KVM_GET_SUPPORTED_CPUID"
        available = False
    elif not size:
        reason = "KVM_CAP_NESTED_STATE is 0"
        available = False
    else:
        reason = f"{module} nested=1, {backend.upper()} in supported CPUID, nested state {size} bytes"
        available = True
    return NestedReport(available, backend, reason, evidence, vendor, module, switches,
                        cpuid_vmx, cpuid_svm, size, evmcs, guest_mode)


class NestedState(Record):
    """A decoded ``struct kvm_nested_state``. ``data`` is what follows the 128-byte header
    (empty for a header-only state, which is valid: VMXON-only, or SVM with just GIF)."""
    format: int
    flags: int
    size: int
    vmx_vmxon_pa: int = 0
    vmx_vmcs12_pa: int = 0
    vmx_smm_flags: int = 0
    vmx_flags: int = 0
    vmx_preemption_timer_deadline: int = 0
    svm_vmcb_pa: int = 0
    data: bytes = b""

    @property
    def format_name(self) -> str:
        """VMX, SVM or FORMAT_<n>: the kind of the state."""
        return FORMATS.get(self.format, f"FORMAT_{self.format}")

    @property
    def flag_names(self) -> List[str]:
        """Names of the KVM_STATE_NESTED_* flags set (unknown bits as one hex value)."""
        return [n for n, b in FLAGS.items() if self.flags & b] + \
            ([f"{self.flags & ~sum(FLAGS.values()):#x}"] if self.flags & ~sum(FLAGS.values()) else [])

    @property
    def guest_mode(self) -> bool:
        """True if the vCPU was running a nested (L2) guest when the state was taken."""
        return bool(self.flags & FLAGS["GUEST_MODE"])

    @property
    def header_only(self) -> bool:
        """True if the state carries no format-specific data (only the header)."""
        return not self.data

    @classmethod
    def from_bytes(cls, raw: bytes) -> "NestedState":
        """Decode a struct kvm_nested_state buffer; raises ValueError if shorter than the header."""
        if len(raw) < _HDR_SIZE:
            raise ValueError(f"nested state needs at least {_HDR_SIZE} bytes, got {len(raw)}")
        s = ffi.from_buffer("struct kvm_nested_state *", bytearray(raw[:_HDR_SIZE]))
        size = min(s.size, len(raw))
        st = cls(format=s.format, flags=s.flags, size=s.size, data=bytes(raw[_HDR_SIZE:size]))
        if s.format == abi.arch.NESTED_STATE_FORMATS["VMX"]:
            v = s.hdr.vmx
            st.vmx_vmxon_pa, st.vmx_vmcs12_pa = v.vmxon_pa, v.vmcs12_pa
            st.vmx_smm_flags, st.vmx_flags = v.smm.flags, v.flags
            st.vmx_preemption_timer_deadline = v.preemption_timer_deadline
        else:
            st.svm_vmcb_pa = s.hdr.svm.vmcb_pa
        return st

    def to_bytes(self) -> bytes:
        """The struct kvm_nested_state buffer for KVM_SET_NESTED_STATE (header + data)."""
        buf = bytearray(_HDR_SIZE + len(self.data))
        s = ffi.from_buffer("struct kvm_nested_state *", buf)
        s.format, s.flags, s.size = self.format, self.flags, self.size
        if self.format == abi.arch.NESTED_STATE_FORMATS["VMX"]:
            v = s.hdr.vmx
            v.vmxon_pa, v.vmcs12_pa = self.vmx_vmxon_pa, self.vmx_vmcs12_pa
            v.smm.flags, v.flags = self.vmx_smm_flags, self.vmx_flags
            v.preemption_timer_deadline = self.vmx_preemption_timer_deadline
        else:
            s.hdr.svm.vmcb_pa = self.svm_vmcb_pa
        buf[_HDR_SIZE:] = self.data
        return bytes(buf)


def get_nested_state(vcpu) -> NestedState:
    """KVM_GET_NESTED_STATE of ``vcpu`` as a :class:`NestedState`; raises NestedUnavailable when
    KVM_CAP_NESTED_STATE is 0 and a KvmError if the ioctl fails."""
    max_size = vcpu.vm.kvm.check_extension("NESTED_STATE")
    if not max_size:
        raise NestedUnavailable("KVM_GET_NESTED_STATE: KVM_CAP_NESTED_STATE is 0 on this host "
                                "(no nested virtualization)")
    size = max(max_size, _HDR_SIZE)
    for _ in range(3):
        buf = bytearray(size)
        s = ffi.from_buffer("struct kvm_nested_state *", buf)
        s.size = size
        try:
            ioctl(vcpu.fd, ioctls.KVM_GET_NESTED_STATE, s,
                  what=f"size={size}")
        except KvmTooBig:
            size = s.size
            continue
        return NestedState.from_bytes(bytes(buf))
    raise kvm_error("KVM_GET_NESTED_STATE", errno.E2BIG, f"size={size}")


def set_nested_state(vcpu, state) -> None:
    """KVM_SET_NESTED_STATE from a :class:`NestedState` or raw bytes (sent as given, so
    invalid states can be tried on purpose)."""
    raw = state.to_bytes() if isinstance(state, NestedState) else bytes(state)
    if len(raw) < _HDR_SIZE:
        raw = raw + bytes(_HDR_SIZE - len(raw))
    buf = bytearray(raw)
    s = ffi.from_buffer("struct kvm_nested_state *", buf)
    ioctl(vcpu.fd, ioctls.KVM_SET_NESTED_STATE, s,
          what=f"format={s.format} flags={s.flags:#x} size={s.size}")


# -- turning nested SVM on for a guest ----------------------------------------------------------

def enable_svm_cpuid(entries):
    """``entries`` (CpuidEntry-like tuples) with the SVM bit (0x80000001 ECX[2]) set, and a
    CPUID 0x8000000A (SVM revision / ASID count) leaf added if missing, for KVM_SET_CPUID2.

    KVM only lets a guest set EFER.SVME (and so VMRUN) when SVM is in that vCPU's CPUID.
    Machine's x86 platform passes KVM_GET_SUPPORTED_CPUID through, which has the bit when
    kvm_amd runs with nested=1; this helper makes it explicit (and lets a test give SVM to a
    hand-built CPUID list)."""
    out, have_ext, have_features = [], False, False
    for e in entries:
        e = CpuidEntry(*e)
        if e.function == CPUID_SVM_LEAF:
            e = CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx,
                           e.ecx | (1 << CPUID_SVM_ECX_BIT), e.edx)
            have_ext = True
        elif e.function == CPUID_SVM_FEATURES:
            have_features = True
        out.append(e)
    if not have_ext:
        out.append(CpuidEntry(CPUID_SVM_LEAF, 0, 0, 0, 0, 1 << CPUID_SVM_ECX_BIT, 0))
    if not have_features:
        out.append(CpuidEntry(CPUID_SVM_FEATURES, 0, 0, 1, 8, 0, 0))   # rev 1, 8 ASIDs
    return out


def has_svm_cpuid(entries) -> bool:
    """True if CPUID leaf 0x80000001 in entries advertises SVM (ECX bit 2)."""
    e = cpuid_lookup(entries, CPUID_SVM_LEAF)
    return bool(e and e.ecx & (1 << CPUID_SVM_ECX_BIT))


def set_efer_svme(vcpu, on: bool = True) -> None:
    """Set (or clear) EFER.SVME through KVM_SET_SREGS. KVM refuses SVME unless SVM is in the
    vCPU's CPUID (see :func:`enable_svm_cpuid`); SVM nested state with GUEST_MODE needs it."""
    s = vcpu.get_sregs()
    s.efer = (s.efer | EFER_SVME) if on else (s.efer & ~EFER_SVME)
    vcpu.set_sregs(s)
