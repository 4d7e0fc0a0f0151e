"""KVM RISC-V ONE_REG register ids: encode, decode, name.

A RISC-V ONE_REG id is a 64-bit number laid out like this (facts from the
Linux uAPI, ``arch/riscv/include/uapi/asm/kvm.h`` and ``include/uapi/linux/kvm.h``)::

    bits 63..56  architecture   0x80 = RISC-V
    bits 55..52  size           log2 of the register size in bytes
    bits 51..32  zero
    bits 31..24  type           CONFIG=1 CORE=2 CSR=3 TIMER=4 FP_F=5 FP_D=6
                                ISA_EXT=7 SBI_EXT=8 VECTOR=9 SBI_STATE=10
    bits 23..16  subtype        (CSR, ISA_EXT, SBI_EXT, SBI_STATE only)
    bits 15..0   index          within the type/subtype

Human names are ``<type>.<field>``: ``core.regs.pc``, ``core.mode``,
``config.isa``, ``csr.sstatus``, ``csr.aia.siselect``,
``csr.smstateen.sstateen0``, ``timer.frequency``, ``fp_f.f3``, ``fp_d.fcsr``,
``isa_ext.zabha``, ``isa_ext.multi_en[0]``, ``sbi_ext.susp``,
``sbi_ext.multi_dis[0]``, ``vector.vlenb``, ``vector.v7``,
``sbi_state.sta.shmem_lo``, ``sbi_state.fwft.pointer_masking.value``.

Ids this module does not know are never dropped: :func:`decode` gives them a
generic name that :func:`parse` turns back into the same id
(``isa_ext.93``, ``config.12``, ``csr.sub7.3``, ``riscv.0x8030000011000000``).

Only rv64 is modelled: ``unsigned long`` registers are 8 bytes.
"""

from __future__ import annotations

import re

from ..._record import Record
from .extensions import ISA_EXT_IDS, ISA_EXTENSIONS, SBI_EXT_IDS, SBI_EXTENSIONS

__all__ = [
    "KVM_REG_RISCV", "KVM_REG_SIZE_SHIFT", "KVM_REG_SIZE_MASK",
    "KVM_REG_SIZE_U8", "KVM_REG_SIZE_U16", "KVM_REG_SIZE_U32", "KVM_REG_SIZE_U64",
    "KVM_REG_SIZE_U128", "KVM_REG_SIZE_U256", "KVM_REG_SIZE_U512",
    "KVM_REG_SIZE_U1024", "KVM_REG_SIZE_U2048",
    "TYPE_CONFIG", "TYPE_CORE", "TYPE_CSR", "TYPE_TIMER", "TYPE_FP_F", "TYPE_FP_D",
    "TYPE_ISA_EXT", "TYPE_SBI_EXT", "TYPE_VECTOR", "TYPE_SBI_STATE", "TYPE_NAMES",
    "CSR_GENERAL", "CSR_AIA", "CSR_SMSTATEEN", "CSR_ZICFISS",
    "EXT_SINGLE", "EXT_MULTI_EN", "EXT_MULTI_DIS", "SBI_STATE_STA", "SBI_STATE_FWFT",
    "CONFIG_REGS", "CORE_REGS", "CSR_GENERAL_REGS", "CSR_AIA_REGS", "CSR_SMSTATEEN_REGS",
    "CSR_ZICFISS_REGS", "TIMER_REGS", "VECTOR_CSR_REGS", "VECTOR_REG_BASE",
    "SBI_STA_REGS", "SBI_FWFT_FEATURES", "SBI_FWFT_FIELDS", "FP_FCSR_INDEX",
    "RiscvReg", "make_id", "size_code", "size_of_id", "decode", "reg_id", "parse",
    "isa_ext_id", "sbi_ext_id",
]

# --- encoding constants ----------------------------------------------------

KVM_REG_RISCV = 0x8000000000000000
KVM_REG_ARCH_MASK = 0xFF00000000000000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0000000000000
KVM_REG_SIZE_U8 = 0x0000000000000000
KVM_REG_SIZE_U16 = 0x0010000000000000
KVM_REG_SIZE_U32 = 0x0020000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_SIZE_U128 = 0x0040000000000000
KVM_REG_SIZE_U256 = 0x0050000000000000
KVM_REG_SIZE_U512 = 0x0060000000000000
KVM_REG_SIZE_U1024 = 0x0070000000000000
KVM_REG_SIZE_U2048 = 0x0080000000000000

TYPE_SHIFT = 24
TYPE_MASK = 0x00000000FF000000
SUBTYPE_SHIFT = 16
SUBTYPE_MASK = 0x0000000000FF0000
INDEX_MASK = 0x000000000000FFFF
_RESERVED_MASK = 0x000FFFFF00000000  # bits 51..32 must be zero

TYPE_CONFIG = 0x01
TYPE_CORE = 0x02
TYPE_CSR = 0x03
TYPE_TIMER = 0x04
TYPE_FP_F = 0x05
TYPE_FP_D = 0x06
TYPE_ISA_EXT = 0x07
TYPE_SBI_EXT = 0x08
TYPE_VECTOR = 0x09
TYPE_SBI_STATE = 0x0A

TYPE_NAMES = {
    TYPE_CONFIG: "config", TYPE_CORE: "core", TYPE_CSR: "csr", TYPE_TIMER: "timer",
    TYPE_FP_F: "fp_f", TYPE_FP_D: "fp_d", TYPE_ISA_EXT: "isa_ext",
    TYPE_SBI_EXT: "sbi_ext", TYPE_VECTOR: "vector", TYPE_SBI_STATE: "sbi_state",
}
_TYPE_BY_NAME = {v: k for k, v in TYPE_NAMES.items()}

# subtypes
CSR_GENERAL = 0
CSR_AIA = 1
CSR_SMSTATEEN = 2
CSR_ZICFISS = 3          # linux-next (Zicfiss shadow-stack CSR); not in 7.0
EXT_SINGLE = 0           # for ISA_EXT and SBI_EXT alike
EXT_MULTI_EN = 1
EXT_MULTI_DIS = 2
SBI_STATE_STA = 0
SBI_STATE_FWFT = 1

_ULONG = 8  # rv64

# --- register tables (field order = index) ---------------------------------

CONFIG_REGS = ("isa", "zicbom_block_size", "mvendorid", "marchid", "mimpid",
               "zicboz_block_size", "satp_mode", "zicbop_block_size")

# struct user_regs_struct, then mode
CORE_REGS = (
    "regs.pc", "regs.ra", "regs.sp", "regs.gp", "regs.tp",
    "regs.t0", "regs.t1", "regs.t2", "regs.s0", "regs.s1",
    "regs.a0", "regs.a1", "regs.a2", "regs.a3", "regs.a4", "regs.a5", "regs.a6", "regs.a7",
    "regs.s2", "regs.s3", "regs.s4", "regs.s5", "regs.s6", "regs.s7", "regs.s8", "regs.s9",
    "regs.s10", "regs.s11", "regs.t3", "regs.t4", "regs.t5", "regs.t6",
    "mode",
)
KVM_RISCV_MODE_U = 0
KVM_RISCV_MODE_S = 1

CSR_GENERAL_REGS = ("sstatus", "sie", "stvec", "sscratch", "sepc", "scause", "stval",
                    "sip", "satp", "scounteren", "senvcfg")
CSR_AIA_REGS = ("siselect", "iprio1", "iprio2", "sieh", "siph", "iprio1h", "iprio2h")
CSR_SMSTATEEN_REGS = ("sstateen0",)
CSR_ZICFISS_REGS = ("ssp",)
_CSR_SUBTYPES = {
    CSR_GENERAL: ("", CSR_GENERAL_REGS),
    CSR_AIA: ("aia.", CSR_AIA_REGS),
    CSR_SMSTATEEN: ("smstateen.", CSR_SMSTATEEN_REGS),
    CSR_ZICFISS: ("zicfiss.", CSR_ZICFISS_REGS),
}

TIMER_REGS = ("frequency", "time", "compare", "state")
KVM_RISCV_TIMER_STATE_OFF = 0
KVM_RISCV_TIMER_STATE_ON = 1

FP_FCSR_INDEX = 32  # f[32] then fcsr, for both F (u32 f[]) and D (u64 f[])

# struct __riscv_v_ext_state: vstart, vl, vtype, vcsr, vlenb, datap -> 6 longs;
# vector register n has index n + 6.
VECTOR_CSR_REGS = ("vstart", "vl", "vtype", "vcsr", "vlenb")
VECTOR_REG_BASE = 6

SBI_STA_REGS = ("shmem_lo", "shmem_hi")
# struct kvm_riscv_sbi_fwft: one {enable, flags, value} triple per feature.
# The first two are in Linux 6.16+/7.x; the last three are from linux-next.
SBI_FWFT_FEATURES = ("misaligned_deleg", "pointer_masking", "pte_ad_hw_updating",
                     "landing_pad", "shadow_stack")
SBI_FWFT_FIELDS = ("enable", "flags", "value")


def size_code(nbytes: int) -> int:
    """The size field (already shifted) for a register of ``nbytes`` bytes."""
    if nbytes <= 0 or nbytes & (nbytes - 1):
        raise ValueError(f"register size must be a power of two, got {nbytes}")
    code = nbytes.bit_length() - 1
    if code > 15:
        raise ValueError(f"register size {nbytes} does not fit the ONE_REG size field")
    return code << KVM_REG_SIZE_SHIFT


def size_of_id(reg: int) -> int:
    """Register size in bytes encoded in a ONE_REG id."""
    return 1 << ((reg & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


def make_id(rtype: int, index: int, *, subtype: int = 0, size: int = _ULONG) -> int:
    """Build a RISC-V ONE_REG id from its parts (``size`` in bytes)."""
    if not 0 <= rtype <= 0xFF:
        raise ValueError(f"type out of range: {rtype}")
    if not 0 <= subtype <= 0xFF:
        raise ValueError(f"subtype out of range: {subtype}")
    if not 0 <= index <= INDEX_MASK:
        raise ValueError(f"index out of range: {index}")
    return (KVM_REG_RISCV | size_code(size) | (rtype << TYPE_SHIFT)
            | (subtype << SUBTYPE_SHIFT) | index)


class RiscvReg(Record, frozen=True, slots=True):
    """One decoded register id."""

    id: int
    name: str
    size: int          # bytes
    type: str          # "config", "core", ..., or "unknown"
    subtype: int = 0
    index: int = 0
    known: bool = True

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return f"{self.name} (0x{self.id:016x}, {self.size} bytes)"


# --- name -> (type, subtype, index, size) ------------------------------------

def _ext_index(table_ids: dict, kind: str, rest: str) -> tuple[int, int]:
    """``rest`` after ``isa_ext.``/``sbi_ext.`` -> (subtype, index)."""
    m = re.fullmatch(r"multi_(en|dis)\[(\d+)\]", rest)
    if m:
        return (EXT_MULTI_EN if m.group(1) == "en" else EXT_MULTI_DIS), int(m.group(2))
    if rest.isdigit():
        return EXT_SINGLE, int(rest)
    key = rest.lower()
    if key in table_ids:
        return EXT_SINGLE, table_ids[key]
    raise KeyError(f"unknown {kind} extension: {rest!r}")


def _lookup(name: str, vlenb: int | None) -> tuple[int, int, int, int]:
    tname, _, rest = name.partition(".")
    if tname not in _TYPE_BY_NAME or not rest:
        raise KeyError(name)
    rtype = _TYPE_BY_NAME[tname]
    if rtype == TYPE_CONFIG:
        idx = CONFIG_REGS.index(rest) if rest in CONFIG_REGS else _num(rest, name)
        return rtype, 0, idx, _ULONG
    if rtype == TYPE_CORE:
        if rest in CORE_REGS:
            return rtype, 0, CORE_REGS.index(rest), _ULONG
        if "regs." + rest in CORE_REGS:
            return rtype, 0, CORE_REGS.index("regs." + rest), _ULONG
        return rtype, 0, _num(rest, name), _ULONG
    if rtype == TYPE_CSR:
        for sub, (prefix, regs) in _CSR_SUBTYPES.items():
            if prefix and rest.startswith(prefix) and rest[len(prefix):] in regs:
                return rtype, sub, regs.index(rest[len(prefix):]), _ULONG
        if rest in CSR_GENERAL_REGS:
            return rtype, CSR_GENERAL, CSR_GENERAL_REGS.index(rest), _ULONG
        m = re.fullmatch(r"sub(\d+)\.(\d+)", rest)
        if m:
            return rtype, int(m.group(1)), int(m.group(2)), _ULONG
        return rtype, CSR_GENERAL, _num(rest, name), _ULONG
    if rtype == TYPE_TIMER:
        idx = TIMER_REGS.index(rest) if rest in TIMER_REGS else _num(rest, name)
        return rtype, 0, idx, 8
    if rtype in (TYPE_FP_F, TYPE_FP_D):
        if rest == "fcsr":
            return rtype, 0, FP_FCSR_INDEX, 4
        m = re.fullmatch(r"f(\d+)", rest)
        if m and int(m.group(1)) < 32:
            return rtype, 0, int(m.group(1)), 4 if rtype == TYPE_FP_F else 8
        idx = _num(rest, name)
        return rtype, 0, idx, 4 if (rtype == TYPE_FP_F or idx == FP_FCSR_INDEX) else 8
    if rtype == TYPE_ISA_EXT:
        sub, idx = _ext_index(ISA_EXT_IDS, "ISA", rest)
        return rtype, sub, idx, _ULONG
    if rtype == TYPE_SBI_EXT:
        sub, idx = _ext_index(SBI_EXT_IDS, "SBI", rest)
        return rtype, sub, idx, _ULONG
    if rtype == TYPE_VECTOR:
        if rest in VECTOR_CSR_REGS:
            return rtype, 0, VECTOR_CSR_REGS.index(rest), _ULONG
        m = re.fullmatch(r"v(\d+)", rest)
        if m and int(m.group(1)) < 32:
            if vlenb is None:
                raise ValueError(f"{name}: the size of a vector register is vlenb bytes; "
                                 "pass vlenb= (read it from vector.vlenb)")
            return rtype, 0, VECTOR_REG_BASE + int(m.group(1)), vlenb
        return rtype, 0, _num(rest, name), _ULONG
    if rtype == TYPE_SBI_STATE:
        if rest.startswith("sta.") and rest[4:] in SBI_STA_REGS:
            return rtype, SBI_STATE_STA, SBI_STA_REGS.index(rest[4:]), _ULONG
        m = re.fullmatch(r"fwft\.(\w+)\.(\w+)", rest)
        if m and m.group(1) in SBI_FWFT_FEATURES and m.group(2) in SBI_FWFT_FIELDS:
            idx = (SBI_FWFT_FEATURES.index(m.group(1)) * len(SBI_FWFT_FIELDS)
                   + SBI_FWFT_FIELDS.index(m.group(2)))
            return rtype, SBI_STATE_FWFT, idx, _ULONG
        m = re.fullmatch(r"sub(\d+)\.(\d+)", rest)
        if m:
            return rtype, int(m.group(1)), int(m.group(2)), _ULONG
    raise KeyError(name)


def _num(text: str, name: str) -> int:
    if text.isdigit():
        return int(text)
    raise KeyError(name)


_SHORT_PREFIXES = ("core.regs.", "core.", "csr.", "config.", "timer.", "vector.")


def reg_id(name: str, *, vlenb: int | None = None) -> int:
    """The ONE_REG id for a register name.

    Full names (``core.regs.a0``, ``isa_ext.zabha``) always work; a bare name
    that is unambiguous among core/csr/config/timer/vector registers
    (``pc``, ``a0``, ``sstatus``, ``satp_mode``, ``vlenb``) works too.
    Vector data registers (``vector.v5``) need ``vlenb`` for their size.
    """
    try:
        rtype, sub, idx, size = _lookup(name, vlenb)
    except KeyError:
        if "." in name and name.split(".", 1)[0] in _TYPE_BY_NAME:
            raise KeyError(f"unknown RISC-V register name: {name!r}") from None
        for prefix in _SHORT_PREFIXES:
            try:
                rtype, sub, idx, size = _lookup(prefix + name, vlenb)
                break
            except KeyError:
                continue
        else:
            raise KeyError(f"unknown RISC-V register name: {name!r}") from None
    return make_id(rtype, idx, subtype=sub, size=size)


def parse(name_or_hex: str | int) -> int:
    """A register id from a name, a hex/decimal string or an int."""
    if isinstance(name_or_hex, int):
        return name_or_hex
    text = name_or_hex.strip()
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    if text.isdigit():
        return int(text)
    m = re.fullmatch(r"riscv\.(0[xX][0-9a-fA-F]+)", text)
    if m:
        return int(m.group(1), 16)
    return reg_id(text)


def isa_ext_id(name_or_index: str | int) -> int:
    """ONE_REG id of the single ISA extension register for ``zabha`` / 70 / ..."""
    idx = name_or_index if isinstance(name_or_index, int) else ISA_EXT_IDS[name_or_index.lower()]
    return make_id(TYPE_ISA_EXT, idx, subtype=EXT_SINGLE)


def sbi_ext_id(name_or_index: str | int) -> int:
    """ONE_REG id of the single SBI extension register for ``susp`` / 11 / ..."""
    idx = name_or_index if isinstance(name_or_index, int) else SBI_EXT_IDS[name_or_index.lower()]
    return make_id(TYPE_SBI_EXT, idx, subtype=EXT_SINGLE)


# --- id -> name ----------------------------------------------------------------

def _generic(reg: int, tname: str, sub: int, idx: int, has_subtypes: bool) -> str:
    if has_subtypes and sub:
        return f"{tname}.sub{sub}.{idx}"
    return f"{tname}.{idx}"


def decode(reg: int) -> RiscvReg:
    """Name and describe any RISC-V ONE_REG id; unknown ids get a generic name."""
    reg &= 0xFFFFFFFFFFFFFFFF
    size = size_of_id(reg)
    rtype = (reg & TYPE_MASK) >> TYPE_SHIFT
    sub = (reg & SUBTYPE_MASK) >> SUBTYPE_SHIFT
    idx = reg & INDEX_MASK
    if (reg & KVM_REG_ARCH_MASK) != KVM_REG_RISCV or reg & _RESERVED_MASK \
            or rtype not in TYPE_NAMES:
        return RiscvReg(reg, f"riscv.0x{reg:016x}", size, "unknown", sub, idx, False)
    tname = TYPE_NAMES[rtype]
    name: str | None = None

    if rtype == TYPE_CONFIG and sub == 0 and idx < len(CONFIG_REGS):
        name = "config." + CONFIG_REGS[idx]
    elif rtype == TYPE_CORE and sub == 0 and idx < len(CORE_REGS):
        name = "core." + CORE_REGS[idx]
    elif rtype == TYPE_CSR and sub in _CSR_SUBTYPES:
        prefix, regs = _CSR_SUBTYPES[sub]
        if idx < len(regs):
            name = "csr." + prefix + regs[idx]
    elif rtype == TYPE_TIMER and sub == 0 and idx < len(TIMER_REGS):
        name = "timer." + TIMER_REGS[idx]
    elif rtype in (TYPE_FP_F, TYPE_FP_D) and sub == 0:
        if idx < 32:
            name = f"{tname}.f{idx}"
        elif idx == FP_FCSR_INDEX:
            name = f"{tname}.fcsr"
    elif rtype in (TYPE_ISA_EXT, TYPE_SBI_EXT):
        table = ISA_EXTENSIONS if rtype == TYPE_ISA_EXT else SBI_EXTENSIONS
        if sub == EXT_SINGLE and idx < len(table):
            name = f"{tname}.{table[idx]}"
        elif sub == EXT_MULTI_EN:
            name = f"{tname}.multi_en[{idx}]"
        elif sub == EXT_MULTI_DIS:
            name = f"{tname}.multi_dis[{idx}]"
    elif rtype == TYPE_VECTOR and sub == 0:
        if idx < len(VECTOR_CSR_REGS):
            name = "vector." + VECTOR_CSR_REGS[idx]
        elif VECTOR_REG_BASE <= idx < VECTOR_REG_BASE + 32:
            name = f"vector.v{idx - VECTOR_REG_BASE}"
    elif rtype == TYPE_SBI_STATE:
        if sub == SBI_STATE_STA and idx < len(SBI_STA_REGS):
            name = "sbi_state.sta." + SBI_STA_REGS[idx]
        elif sub == SBI_STATE_FWFT and idx < len(SBI_FWFT_FEATURES) * len(SBI_FWFT_FIELDS):
            feat, field = divmod(idx, len(SBI_FWFT_FIELDS))
            name = f"sbi_state.fwft.{SBI_FWFT_FEATURES[feat]}.{SBI_FWFT_FIELDS[field]}"

    known = name is not None
    if name is None:
        name = _generic(reg, tname, sub, idx,
                        rtype in (TYPE_CSR, TYPE_ISA_EXT, TYPE_SBI_EXT, TYPE_SBI_STATE)
                        or sub != 0)
    # a generic name must round-trip through parse(); if the size is unusual it
    # would not, so fall back to the raw form
    if not known:
        try:
            if reg_id(name) != reg:
                name = f"riscv.0x{reg:016x}"
        except (KeyError, ValueError):
            name = f"riscv.0x{reg:016x}"
    elif reg_id(name, vlenb=size) != reg:
        # known field but odd size bits: keep the id exact in the name
        name = f"riscv.0x{reg:016x}"
        known = False
    return RiscvReg(reg, name, size, tname, sub, idx, known)
