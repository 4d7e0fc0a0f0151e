"""RISC-V vCPU configuration through ONE_REG: ISA/SBI extensions, CPU types,
the ISA string, named register lists and the boot state.

Everything here talks to the vCPU only through three methods, so any object
that has them works (a real ``pykvm.vcpu.Vcpu`` or a test double):

* ``vcpu.get_one_reg(reg_id) -> int`` (the size comes from the id)
* ``vcpu.set_one_reg(reg_id, value)``
* ``vcpu.reg_list() -> list[int]`` (KVM_GET_REG_LIST)

Errors from those calls carry ``.errno``; KVM uses ENOENT for "this register /
extension does not exist here", EINVAL for "not allowed" and EBUSY for "the
vCPU has already run". Extension setters turn those into
:class:`ExtensionAbsent`, :class:`ExtensionNotAllowed` and :class:`ExtensionBusy`.
"""

from __future__ import annotations

import errno as _errno

from ..._record import field, Record
from . import regs as _regs
from .extensions import (
    ISA_EXT_IDS, ISA_EXTENSIONS, MIN_EXTENSIONS, SBI_EXT_IDS, SBI_EXTENSIONS,
    canonical_isa_string,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Mapping

__all__ = [
    "ExtensionError", "ExtensionAbsent", "ExtensionNotAllowed", "ExtensionBusy",
    "isa_extensions", "set_isa_extension", "sbi_extensions", "set_sbi_extension",
    "CpuTypeResult", "parse_cpu_type", "resolve_cpu_type", "apply_cpu_type",
    "isa_string", "named_reg_list", "satp_mode", "mmu_type_for_satp_mode",
    "timebase_frequency", "hart_description", "set_boot_state",
]


# --- errors -------------------------------------------------------------------

try:  # the core's exception base, when the core is importable
    from ...errors import PykvmError as _Base
except ImportError:  # pragma: no cover - standalone use of this package
    _Base = Exception


class ExtensionError(_Base):
    """Setting an ISA or SBI extension failed.

    ``kind`` is ``"isa"`` or ``"sbi"``, ``name`` the extension, ``enabled`` the
    requested state, ``error`` the original exception (also ``__cause__``) and
    ``errno`` its errno.
    """

    def __init__(self, kind: str, name: str, enabled: bool, error: BaseException | None,
                 message: str | None = None):
        self.kind = kind
        self.name = name
        self.enabled = enabled
        self.error = error
        self.errno = getattr(error, "errno", None)
        what = "enable" if enabled else "disable"
        super().__init__(message or f"cannot {what} {kind.upper()} extension {name!r}: "
                         f"{self._reason()} ({error})")

    def _reason(self) -> str:
        return "failed"


class ExtensionAbsent(ExtensionError):
    """KVM does not offer this extension on this host (ENOENT)."""

    def _reason(self) -> str:
        return "KVM does not offer it on this host"


class ExtensionNotAllowed(ExtensionError):
    """KVM refuses this change (EINVAL), e.g. disabling an extension that has no
    architectural way to be turned off."""

    def _reason(self) -> str:
        return "KVM does not allow this change"


class ExtensionBusy(ExtensionError):
    """The vCPU has already run (EBUSY): extensions are fixed from then on."""

    def _reason(self) -> str:
        return "the vCPU has already run"


_ERRNO_CLASSES = {
    _errno.ENOENT: ExtensionAbsent,
    _errno.EINVAL: ExtensionNotAllowed,
    _errno.EBUSY: ExtensionBusy,
}


def _errno_of(exc: BaseException) -> int | None:
    e = getattr(exc, "errno", None)
    return e if isinstance(e, int) else None


# --- reading and writing extension registers ----------------------------------

def _read_ext_table(vcpu, rtype: int, table: tuple[str, ...], kind: str,
                    include_unknown: bool) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    known_ids = set()
    for idx, name in enumerate(table):
        rid = _regs.make_id(rtype, idx, subtype=_regs.EXT_SINGLE)
        known_ids.add(rid)
        try:
            out[name] = bool(vcpu.get_one_reg(rid))
        except Exception as exc:  # errno decides
            if _errno_of(exc) in (_errno.ENOENT, _errno.EINVAL):
                out[name] = None
            else:
                raise
    if include_unknown:
        try:
            ids = list(vcpu.reg_list())
        except Exception as exc:
            if _errno_of(exc) is None:
                raise
            ids = []
        for rid in ids:
            r = _regs.decode(rid)
            if (rid not in known_ids and r.type == kind and r.subtype == _regs.EXT_SINGLE
                    and r.name not in out):
                try:
                    out[r.name] = bool(vcpu.get_one_reg(rid))
                except Exception as exc:
                    if _errno_of(exc) in (_errno.ENOENT, _errno.EINVAL):
                        out[r.name] = None
                    else:
                        raise
    return out


def isa_extensions(vcpu, *, include_unknown: bool = True) -> dict[str, bool | None]:
    """Every ISA extension KVM numbers -> True (on), False (off, can be turned
    on) or None (absent: ENOENT). With ``include_unknown``, extensions the
    kernel lists in KVM_GET_REG_LIST but this table does not know are added as
    ``isa_ext.<n>``."""
    return _read_ext_table(vcpu, _regs.TYPE_ISA_EXT, ISA_EXTENSIONS, "isa_ext",
                           include_unknown)


def sbi_extensions(vcpu, *, include_unknown: bool = True) -> dict[str, bool | None]:
    """Like :func:`isa_extensions` for KVM's SBI extensions (``dbcn``, ``susp``...)."""
    return _read_ext_table(vcpu, _regs.TYPE_SBI_EXT, SBI_EXTENSIONS, "sbi_ext",
                           include_unknown)


def _ext_index(name: str | int, ids: Mapping[str, int], prefix: str) -> tuple[int, str]:
    if isinstance(name, int):
        return name, name_of(ids, name, prefix)
    key = name.lower()
    if key.startswith(prefix + "."):
        key = key[len(prefix) + 1:]
    if key in ids:
        return ids[key], key
    if key.isdigit():
        return int(key), name_of(ids, int(key), prefix)
    raise KeyError(f"unknown {prefix.split('_')[0].upper()} extension: {name!r}")


def name_of(ids: Mapping[str, int], idx: int, prefix: str) -> str:
    """The name of extension number ``idx`` in ``ids``, else ``"<prefix>.<idx>"``."""
    for n, i in ids.items():
        if i == idx:
            return n
    return f"{prefix}.{idx}"


def _set_ext(vcpu, rtype: int, kind: str, idx: int, name: str, enabled: bool) -> None:
    rid = _regs.make_id(rtype, idx, subtype=_regs.EXT_SINGLE)
    try:
        vcpu.set_one_reg(rid, 1 if enabled else 0)
    except Exception as exc:  # classified by errno below
        cls = _ERRNO_CLASSES.get(_errno_of(exc))
        if cls is None:
            raise
        raise cls(kind, name, enabled, exc) from exc


def set_isa_extension(vcpu, name: str | int, enabled: bool) -> None:
    """Turn one ISA extension on or off (before the vCPU first runs).

    Raises :class:`ExtensionAbsent` (ENOENT), :class:`ExtensionNotAllowed`
    (EINVAL) or :class:`ExtensionBusy` (EBUSY); KeyError for a name not in the
    table (use the number, or ``isa_ext.<n>``, for extensions newer than it).
    """
    idx, canon = _ext_index(name, ISA_EXT_IDS, "isa_ext")
    _set_ext(vcpu, _regs.TYPE_ISA_EXT, "isa", idx, canon, enabled)


def set_sbi_extension(vcpu, name: str | int, enabled: bool) -> None:
    """Turn one of KVM's SBI extensions on or off (before the vCPU first runs);
    same errors as :func:`set_isa_extension`."""
    idx, canon = _ext_index(name, SBI_EXT_IDS, "sbi_ext")
    _set_ext(vcpu, _regs.TYPE_SBI_EXT, "sbi", idx, canon, enabled)


# --- CPU types ------------------------------------------------------------------

class CpuTypeResult(Record):
    """What :func:`apply_cpu_type` did.

    ``target``: the state asked of every extension KVM offers;
    ``changed``: extensions whose state was changed;
    ``not_allowed``: extensions KVM refused to change (EINVAL), so they keep
    their previous state (e.g. Zicsr under ``min``);
    ``final``: the state read back afterwards (True/False/None as
    :func:`isa_extensions`).
    """

    spec: str
    target: dict[str, bool] = field(default_factory=dict)
    changed: dict[str, bool] = field(default_factory=dict)
    not_allowed: dict[str, bool] = field(default_factory=dict)
    final: dict[str, bool | None] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """True when every extension ended in the state asked for."""
        return not self.not_allowed


def parse_cpu_type(spec: str, disable: Iterable[str] = ()) -> tuple[str, set[str], set[str]]:
    """``"min,zabha,-zicond"`` -> ``("min", {"zabha"}, {"zicond"})``.

    The base is ``max`` or ``min`` (``host`` is an alias of ``max``); the other
    comma-separated items add an extension, or remove it with a leading ``-``.
    ``disable`` adds more removals (names with or without the ``-``).
    """
    items = [p.strip().lower() for p in spec.split(",") if p.strip()]
    if not items:
        raise ValueError("empty cpu type")
    base = items[0]
    if base == "host":
        base = "max"
    if base not in ("max", "min"):
        raise ValueError(f"unknown cpu type {items[0]!r}: expected 'max' or 'min' "
                         "followed by ',ext' / ',-ext' items")
    add: set[str] = set()
    remove: set[str] = set()
    for item in items[1:]:
        if item.startswith("-"):
            remove.add(item[1:])
        else:
            add.add(item.lstrip("+"))
    for item in disable:
        remove.add(item.strip().lower().lstrip("-"))
    both = add & remove
    if both:
        raise ValueError(f"extensions both added and removed: {sorted(both)}")
    return base, add, remove


def resolve_cpu_type(spec: str, available: Mapping[str, bool | None],
                     disable: Iterable[str] = ()) -> dict[str, bool]:
    """The target state of every extension from a cpu-type spec.

    ``available`` maps extension names to their current state as
    :func:`isa_extensions` reports it (None = KVM does not offer it).
    ``max`` turns on everything offered; ``min`` keeps exactly the
    ``imafdc`` extensions on and turns the rest off. Added / removed names
    adjust that. Naming an extension KVM does not offer (or does not know)
    raises :class:`ExtensionAbsent` (adding) or KeyError (unknown name).
    """
    base, add, remove = parse_cpu_type(spec, disable)
    offered = {n for n, v in available.items() if v is not None}
    for name in add | remove:
        if name not in available and name not in ISA_EXT_IDS:
            raise KeyError(f"unknown ISA extension in cpu type: {name!r}")
    for name in sorted(add):
        if name not in offered:
            raise ExtensionAbsent("isa", name, True, None,
                                  f"cpu type {spec!r} asks for {name!r}, which KVM "
                                  "does not offer on this host")
    if base == "max":
        target = {n: True for n in offered}
    else:
        target = {n: (n in MIN_EXTENSIONS) for n in offered}
    for name in add:
        target[name] = True
    for name in remove:
        if name in offered:
            target[name] = False
    # "isa_ext.<n>" entries (unknown to our table): leave them alone under min
    # only if asked explicitly; otherwise treat like any other extension.
    return target


def apply_cpu_type(vcpu, spec: str = "max", *, disable: Iterable[str] = ()) -> CpuTypeResult:
    """Configure the vCPU's ISA extensions from a cpu-type spec before it runs.

    ``"max"``: enable everything KVM offers; ``"min"``: exactly rv64imafdc —
    every other extension that KVM lets userspace disable is disabled (the rest
    are reported in ``result.not_allowed``); ``"min,zabha,zicond"``: min plus
    those; ``"max,-zabha"`` or ``disable=["zabha"]``: minus those.

    Raises :class:`ExtensionAbsent` for an added extension KVM does not offer,
    :class:`ExtensionBusy` if the vCPU already ran, and
    :class:`ExtensionNotAllowed` when an extension the spec *names* explicitly
    cannot be changed.
    """
    current = isa_extensions(vcpu)
    target = resolve_cpu_type(spec, current, disable)
    _base, add, remove = parse_cpu_type(spec, disable)
    explicit = add | remove
    result = CpuTypeResult(spec=spec, target=dict(target))
    # Disable first, then enable, so that nothing depending on a removed
    # extension is briefly on with it off.
    order = sorted(target, key=lambda n: (target[n], n))
    for name in order:
        want = target[name]
        if current.get(name) is want:
            continue
        try:
            set_isa_extension(vcpu, name, want)
        except ExtensionNotAllowed:
            if name in explicit:
                raise
            result.not_allowed[name] = want
        except ExtensionAbsent:
            if name in explicit:
                raise
            # vanished between read and write: nothing to do
        else:
            result.changed[name] = want
    result.final = isa_extensions(vcpu)
    return result


# --- ISA string, register list, boot state ---------------------------------------

def isa_string(vcpu) -> str:
    """The canonical ``riscv,isa`` string of the extensions enabled on the vCPU,
    read through ONE_REG (e.g. ``rv64imafdc_zicntr_zicsr_zifencei_zihpm``)."""
    exts = [n for n, on in isa_extensions(vcpu, include_unknown=False).items() if on]
    return canonical_isa_string(exts)


def named_reg_list(vcpu) -> list[_regs.RiscvReg]:
    """KVM_GET_REG_LIST decoded: every id, with unknown ones under generic names."""
    return [_regs.decode(rid) for rid in vcpu.reg_list()]


_MMU_TYPES = {8: "riscv,sv39", 9: "riscv,sv48", 10: "riscv,sv57"}


def mmu_type_for_satp_mode(mode: int) -> str | None:
    """satp.MODE -> devicetree ``mmu-type`` (8 sv39, 9 sv48, 10 sv57; 0 none)."""
    if mode == 0:
        return None
    try:
        return _MMU_TYPES[mode]
    except KeyError:
        raise ValueError(f"unknown satp mode {mode}") from None


def satp_mode(vcpu) -> int:
    """The largest satp mode KVM lets the guest use (``config.satp_mode``)."""
    return vcpu.get_one_reg(_regs.reg_id("config.satp_mode"))


def timebase_frequency(vcpu) -> int:
    """The guest timer frequency (``timer.frequency``), for the devicetree."""
    return vcpu.get_one_reg(_regs.reg_id("timer.frequency"))


def hart_description(vcpu, hartid: int, isa: str | None = None) -> dict:
    """A ``harts`` entry for :func:`pykvm.arch.riscv.fdt.build_dtb` (``isa``: a riscv,isa
    string already known; read through ONE_REG when None)."""
    try:
        mode = satp_mode(vcpu)
    except Exception as exc:
        if _errno_of(exc) not in (_errno.ENOENT, _errno.EINVAL):
            raise
        mode = 0
    out = {"hartid": hartid, "isa": isa if isa is not None else isa_string(vcpu),
           "mmu_type": mode}
    # cache-block sizes (Linux drops Zicbom/Zicboz/Zicbop without them: "no cbom-block-size")
    for ext in ("zicbom", "zicboz", "zicbop"):
        try:
            size = vcpu.get_one_reg(_regs.reg_id(f"config.{ext}_block_size"))
        except Exception as exc:  # absent on older kernels
            if _errno_of(exc) not in (_errno.ENOENT, _errno.EINVAL):
                raise
            size = 0
        if size:
            out[f"{ext[2:]}_block_size"] = size
    return out


def set_boot_state(vcpu, *, pc: int, hartid: int = 0, dtb: int = 0) -> None:
    """The state Linux-style S-mode images expect: S-mode, ``pc``,
    ``a0`` = hart id, ``a1`` = DTB address (satp = 0 after reset)."""
    vcpu.set_one_reg(_regs.reg_id("core.mode"), _regs.KVM_RISCV_MODE_S)
    vcpu.set_one_reg(_regs.reg_id("core.regs.a0"), hartid)
    vcpu.set_one_reg(_regs.reg_id("core.regs.a1"), dtb)
    vcpu.set_one_reg(_regs.reg_id("core.regs.pc"), pc)
