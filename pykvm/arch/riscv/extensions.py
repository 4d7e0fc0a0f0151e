"""RISC-V ISA and SBI extension tables as KVM numbers them, and ISA strings.

The tuples below are in the order of the kernel's ``enum KVM_RISCV_ISA_EXT_ID`` /
``enum KVM_RISCV_SBI_EXT_ID`` (uAPI ``arch/riscv/include/uapi/asm/kvm.h``): a
name's position is its KVM id. They were checked against the 7.x-era uAPI
(the enum ends ``... ZICBOP, ZFBFMIN, ZVFBFMIN, ZVFBFWMA, ZCLSD, ZILSD, ZALASR``)
and the SBI enum (``... DBCN, STA, SUSP, FWFT, MPXY``). Entries marked
"linux-next" below are queued upstream but not in a release we could confirm;
an id past the end of the table still decodes, as ``isa_ext.<n>``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable

__all__ = [
    "ISA_EXTENSIONS", "ISA_EXT_IDS", "ISA_EXT_SINCE", "ISA_NEXT_EXTENSIONS",
    "KVM_ISA_NEVER_DISABLE",
    "SBI_EXTENSIONS", "SBI_EXT_IDS", "SBI_EIDS", "SBI_EID_RANGES",
    "SBI_EXT_BASE", "SBI_EXT_TIME", "SBI_EXT_IPI", "SBI_EXT_RFENCE", "SBI_EXT_HSM",
    "SBI_EXT_SRST", "SBI_EXT_PMU", "SBI_EXT_DBCN", "SBI_EXT_SUSP", "SBI_EXT_CPPC",
    "SBI_EXT_NACL", "SBI_EXT_STA", "SBI_EXT_SSE", "SBI_EXT_FWFT", "SBI_EXT_DBTR",
    "SBI_EXT_MPXY", "PYKVM_REPORT_EID",
    "SBI_SUCCESS", "SBI_ERR_FAILED", "SBI_ERR_NOT_SUPPORTED", "SBI_ERR_INVALID_PARAM",
    "SBI_ERR_DENIED", "SBI_ERR_INVALID_ADDRESS", "SBI_ERR_ALREADY_AVAILABLE",
    "SBI_ERR_ALREADY_STARTED", "SBI_ERR_ALREADY_STOPPED", "SBI_ERR_NO_SHMEM",
    "SBI_ERR_INVALID_STATE", "SBI_ERR_BAD_RANGE", "SBI_ERR_TIMEOUT", "SBI_ERR_IO",
    "SBI_ERR_DENIED_LOCKED", "SBI_ERROR_NAMES",
    "CANONICAL_SINGLE_ORDER", "MIN_EXTENSIONS", "BASE_ISA",
    "canonical_order", "canonical_isa_string", "parse_isa_string",
]

# --- ISA extensions, KVM numbering -----------------------------------------

ISA_EXTENSIONS: tuple[str, ...] = (
    "a", "c", "d", "f", "h", "i", "m",                               # 0-6
    "svpbmt", "sstc", "svinval", "zihintpause", "zicbom", "zicboz",  # 7-12
    "zbb", "ssaia", "v", "svnapot", "zba", "zbs", "zicntr", "zicsr",  # 13-20
    "zifencei", "zihpm", "smstateen", "zicond", "zbc", "zbkb",        # 21-26
    "zbkc", "zbkx", "zknd", "zkne", "zknh", "zkr", "zksed", "zksh",   # 27-34
    "zkt", "zvbb", "zvbc", "zvkb", "zvkg", "zvkned", "zvknha",        # 35-41
    "zvknhb", "zvksed", "zvksh", "zvkt", "zfh", "zfhmin",             # 42-47
    "zihintntl", "zvfh", "zvfhmin", "zfa", "ztso", "zacas",           # 48-53
    "sscofpmf", "zimop", "zca", "zcb", "zcd", "zcf", "zcmop",         # 54-60
    "zawrs", "smnpm", "ssnpm", "svade", "svadu", "svvptc", "zabha",   # 61-67
    "ziccrse", "zaamo", "zalrsc", "zicbop", "zfbfmin", "zvfbfmin",    # 68-73
    "zvfbfwma", "zclsd", "zilsd", "zalasr",                           # 74-77
    "zicfilp", "zicfiss",                                             # 78-79 linux-next
)
# Extensions at the end of ISA_EXTENSIONS that come from linux-next rather
# than a confirmed release (their numbers could still move).
ISA_NEXT_EXTENSIONS = frozenset({"zicfilp", "zicfiss"})

ISA_EXT_IDS: dict[str, int] = {name: i for i, name in enumerate(ISA_EXTENSIONS)}

# The Linux release whose KVM first offered an extension, where we know it.
ISA_EXT_SINCE: dict[str, str] = {
    "svvptc": "6.14", "zabha": "6.14", "ziccrse": "6.14",
}

# Extensions KVM (7.x, kvm_riscv_isa_disable_allowed) never lets userspace
# turn off once the host has them. Informational: the cpu-type code still asks
# KVM and treats EINVAL as "not allowed", so older/newer kernels are handled.
KVM_ISA_NEVER_DISABLE = frozenset({
    "a", "c", "i", "m", "sscofpmf", "ssnpm", "sstc", "svinval", "svnapot", "svvptc",
    "zaamo", "zabha", "zacas", "zalasr", "zalrsc", "zawrs", "zba", "zbb", "zbc",
    "zbkb", "zbkc", "zbkx", "zbs", "zca", "zcb", "zcd", "zcf", "zcmop", "zfa",
    "zfbfmin", "zfh", "zfhmin", "zicbop", "ziccrse", "zicntr", "zicond", "zicsr",
    "zifencei", "zihintntl", "zihintpause", "zihpm", "zimop", "zknd", "zkne", "zknh",
    "zkr", "zksed", "zksh", "zkt", "ztso", "zvbb", "zvbc", "zvfbfmin", "zvfbfwma",
    "zvfh", "zvfhmin", "zvkb", "zvkg", "zvkned", "zvknha", "zvknhb", "zvksed",
    "zvksh", "zvkt",
})

# --- SBI extensions, KVM numbering and SBI extension ids ----------------------

SBI_EXTENSIONS: tuple[str, ...] = (
    "v01", "time", "ipi", "rfence", "srst", "hsm", "pmu", "experimental", "vendor",
    "dbcn", "sta", "susp", "fwft", "mpxy",
)
SBI_EXT_IDS: dict[str, int] = {name: i for i, name in enumerate(SBI_EXTENSIONS)}

# SBI extension ids (EIDs) from the RISC-V SBI specification (v3.0)
SBI_EXT_BASE = 0x10
SBI_EXT_TIME = 0x54494D45      # "TIME"
SBI_EXT_IPI = 0x735049         # "sPI"
SBI_EXT_RFENCE = 0x52464E43    # "RFNC"
SBI_EXT_HSM = 0x48534D         # "HSM"
SBI_EXT_SRST = 0x53525354      # "SRST"
SBI_EXT_PMU = 0x504D55         # "PMU"
SBI_EXT_DBCN = 0x4442434E      # "DBCN"
SBI_EXT_SUSP = 0x53555350      # "SUSP"
SBI_EXT_CPPC = 0x43505043      # "CPPC"
SBI_EXT_NACL = 0x4E41434C      # "NACL"
SBI_EXT_STA = 0x535441         # "STA"
SBI_EXT_SSE = 0x535345         # "SSE"
SBI_EXT_FWFT = 0x46574654      # "FWFT"
SBI_EXT_DBTR = 0x44425452      # "DBTR"
SBI_EXT_MPXY = 0x4D505859      # "MPXY"

# The pykvm guest report call sits in the SBI experimental range.
PYKVM_REPORT_EID = 0x08504B56

SBI_EIDS: dict[str, int] = {
    "time": SBI_EXT_TIME, "ipi": SBI_EXT_IPI, "rfence": SBI_EXT_RFENCE,
    "srst": SBI_EXT_SRST, "hsm": SBI_EXT_HSM, "pmu": SBI_EXT_PMU,
    "dbcn": SBI_EXT_DBCN, "sta": SBI_EXT_STA, "susp": SBI_EXT_SUSP,
    "fwft": SBI_EXT_FWFT, "mpxy": SBI_EXT_MPXY,
}
# KVM extensions that cover a range of EIDs rather than one (inclusive bounds)
SBI_EID_RANGES: dict[str, tuple[int, int]] = {
    "v01": (0x00, 0x0F),              # legacy v0.1 calls
    "experimental": (0x08000000, 0x08FFFFFF),
    "vendor": (0x09000000, 0x09FFFFFF),
}

# SBI error codes (SBI spec, "Standard SBI Errors")
SBI_SUCCESS = 0
SBI_ERR_FAILED = -1
SBI_ERR_NOT_SUPPORTED = -2
SBI_ERR_INVALID_PARAM = -3
SBI_ERR_DENIED = -4
SBI_ERR_INVALID_ADDRESS = -5
SBI_ERR_ALREADY_AVAILABLE = -6
SBI_ERR_ALREADY_STARTED = -7
SBI_ERR_ALREADY_STOPPED = -8
SBI_ERR_NO_SHMEM = -9
SBI_ERR_INVALID_STATE = -10
SBI_ERR_BAD_RANGE = -11
SBI_ERR_TIMEOUT = -12
SBI_ERR_IO = -13
SBI_ERR_DENIED_LOCKED = -14

SBI_ERROR_NAMES = {
    0: "SUCCESS", -1: "FAILED", -2: "NOT_SUPPORTED", -3: "INVALID_PARAM", -4: "DENIED",
    -5: "INVALID_ADDRESS", -6: "ALREADY_AVAILABLE", -7: "ALREADY_STARTED",
    -8: "ALREADY_STOPPED", -9: "NO_SHMEM", -10: "INVALID_STATE", -11: "BAD_RANGE",
    -12: "TIMEOUT", -13: "IO", -14: "DENIED_LOCKED",
}

# --- ISA strings ----------------------------------------------------------

# Canonical order of single-letter extensions (RISC-V unprivileged ISA,
# "ISA Extension Naming Conventions"); also the order used to sort
# Z-extensions by their category letter.
CANONICAL_SINGLE_ORDER = "imafdqlcbkjtpvh"
BASE_ISA = "rv64i"
MIN_EXTENSIONS = frozenset("imafdc")


def _sort_key(ext: str) -> tuple:
    e = ext.lower()
    if len(e) == 1:
        pos = CANONICAL_SINGLE_ORDER.find(e)
        return (0, pos if pos >= 0 else len(CANONICAL_SINGLE_ORDER), e)
    if e[0] == "z":
        cat = CANONICAL_SINGLE_ORDER.find(e[1]) if len(e) > 1 else -1
        return (1, cat if cat >= 0 else len(CANONICAL_SINGLE_ORDER), e)
    if e[0] == "s":
        return (2, 0, e)
    if e[0] == "x":
        return (3, 0, e)
    return (4, 0, e)


def canonical_order(extensions: Iterable[str]) -> list[str]:
    """Extensions (lower case, de-duplicated) in canonical ISA-string order:
    single letters in ``imafdqlcbkjtpvh`` order, then Z-extensions by the
    category of their second letter (same order) and alphabetically within it,
    then S-extensions alphabetically, then X-extensions alphabetically."""
    return sorted({e.lower() for e in extensions if e}, key=_sort_key)


def canonical_isa_string(extensions: Iterable[str], xlen: int = 64) -> str:
    """The ``riscv,isa`` string, e.g. ``rv64imafdc_zicsr_zifencei``.

    ``i`` is always present (it is the base). Names that are not ISA
    extensions (e.g. the generic ``isa_ext.93``) are skipped.
    """
    exts = {e.lower() for e in extensions if e and "." not in e}
    exts.add("i")
    ordered = canonical_order(exts)
    singles = "".join(e for e in ordered if len(e) == 1)
    multi = [e for e in ordered if len(e) > 1]
    return f"rv{xlen}" + singles + "".join("_" + e for e in multi)


def parse_isa_string(isa: str) -> list[str]:
    """Split a ``riscv,isa`` string into its extensions (single letters first),
    e.g. ``rv64imafdc_zicsr`` -> ``['i','m','a','f','d','c','zicsr']``.
    ``g`` expands to ``imafd`` + ``zicsr`` + ``zifencei``."""
    s = isa.strip().lower()
    if not s.startswith(("rv32", "rv64", "rv128")):
        raise ValueError(f"not a RISC-V ISA string: {isa!r}")
    s = s[4:] if not s.startswith("rv128") else s[5:]
    head, *multi = s.split("_")
    out: list[str] = []
    for ch in head:
        if ch == "g":
            out.extend(["i", "m", "a", "f", "d"])
            multi.extend(["zicsr", "zifencei"])
        elif ch.isalpha():
            out.append(ch)
        # digits (version numbers such as 2p1) are ignored
    out.extend(m for m in multi if m)
    seen: set[str] = set()
    return [e for e in out if not (e in seen or seen.add(e))]
