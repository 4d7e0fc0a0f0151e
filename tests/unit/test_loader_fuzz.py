"""Property-based fuzzing of the image loader (issue 8: a hostile image never crashes pykvm).

Seeds are valid images of each kind the loader takes: an ELF64 (x86-64 and RISC-V), a multiboot
ELF32, a multiboot a.out-kludge binary and flat binaries. They are built here with struct, so
no toolchain is needed; the built guests in build/guests are added as further seeds when they
are there. Hypothesis mutates them (byte flips, header fields set to interesting or random
values, truncation, extension, multiboot checksums recomputed so the fields behind them get
through) and loads each result into real :class:`pykvm.memory.GuestMemory` RAM (anonymous
mmaps, no /dev/kvm) filled with a sentinel. Every load must either

* raise :class:`LoadError` with a one-line message, not caused by an internal error
  (struct.error, OverflowError, ...), and leave RAM untouched, or
* succeed with a plan that fits RAM, and RAM outside what the loader says it wrote (its
  segments and the multiboot information) untouched, the segments holding their file bytes
  and zeros after them.

Any other exception fails the test. The runs are derandomized (reproducible in CI) and short.
"""
import os
import signal
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm import boot
from pykvm.arch.x86 import layout
from pykvm.boot import LoadError
from pykvm.memory import GuestMemory, MemorySlot, new_mapping

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILT = os.path.join(REPO, "build", "guests")
MiB = 1 << 20
RAM_SIZE = 4 * MiB
RISCV_BASE = 0x80000000
SENTINEL = bytes([0xA5, 0x5A, 0xC3, 0x3C]) * (RAM_SIZE // 4)

# CI runs 300 examples per fuzzer, derandomized; a longer hunt: PYKVM_FUZZ_EXAMPLES=20000
# PYKVM_FUZZ_RANDOM=1 pytest tests/unit/test_loader_fuzz.py
EXAMPLES = int(os.environ.get("PYKVM_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("PYKVM_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                print_blob=False)

EM_386, EM_X86_64, EM_RISCV = 3, 62, 243
PT_LOAD, PT_NOTE = 1, 4
SHT_SYMTAB, SHT_STRTAB = 2, 3
MB_MAGIC = 0x1BADB002


# ---- seed images ----------------------------------------------------------------------------------

def build_elf(cls, machine, segments, entry, *, symbols=None, head=b""):
    """An ELF executable: ``segments`` are (type, vaddr, paddr, data, memsz); ``head`` (e.g. a
    multiboot header) follows the program headers, 4-aligned; segment data are page aligned;
    with ``symbols`` ({name: value}) a symbol table, its string table and section headers
    follow."""
    ehsize, phsize = (64, 56) if cls == 64 else (52, 32)
    out = bytearray(ehsize + phsize * len(segments))
    out += bytes((-len(out)) % 4) + head
    offsets = []
    for _, _, _, data, _ in segments:
        out += bytes((-len(out)) % 0x1000)
        offsets.append(len(out))
        out += data
    shoff, shnum = 0, 0
    if symbols is not None:
        entsize = 24 if cls == 64 else 16
        strtab, syms = bytearray(b"\0"), bytearray(entsize)
        for name, value in symbols.items():
            if cls == 64:
                syms += struct.pack("<IBBHQQ", len(strtab), 0x11, 0, 1, value, 8)
            else:
                syms += struct.pack("<IIIBBH", len(strtab), value, 8, 0x11, 0, 1)
            strtab += name.encode() + b"\0"
        out += bytes((-len(out)) % 8)
        sym_off = len(out)
        out += syms
        str_off = len(out)
        out += strtab + bytes((-(len(out) + len(strtab))) % 8)
        shoff, shnum = len(out), 3
        if cls == 64:
            sh = struct.Struct("<IIQQQQIIQQ")
            out += bytes(sh.size)
            out += sh.pack(0, SHT_STRTAB, 0, 0, str_off, len(strtab), 0, 0, 1, 0)
            out += sh.pack(0, SHT_SYMTAB, 0, 0, sym_off, len(syms), 1, 1, 8, entsize)
        else:
            sh = struct.Struct("<IIIIIIIIII")
            out += bytes(sh.size)
            out += sh.pack(0, SHT_STRTAB, 0, 0, str_off, len(strtab), 0, 0, 1, 0)
            out += sh.pack(0, SHT_SYMTAB, 0, 0, sym_off, len(syms), 1, 1, 4, entsize)
    ident = b"\x7fELF" + bytes([1 if cls == 32 else 2, 1, 1]) + bytes(9)
    if cls == 64:
        eh = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, ehsize, shoff, 0,
                                 ehsize, phsize, len(segments), 64, shnum, 0)
    else:
        eh = ident + struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, entry, ehsize, shoff, 0,
                                 ehsize, phsize, len(segments), 40, shnum, 0)
    out[:ehsize] = eh
    for i, ((ptype, vaddr, paddr, data, memsz), off) in enumerate(zip(segments, offsets)):
        at = ehsize + phsize * i
        if cls == 64:
            out[at:at + phsize] = struct.pack("<IIQQQQQQ", ptype, 7, off, vaddr, paddr,
                                              len(data), memsz, 0x1000)
        else:
            out[at:at + phsize] = struct.pack("<IIIIIIII", ptype, off, vaddr, paddr, len(data),
                                              memsz, 7, 0x1000)
    return bytes(out)


def mb_header(flags, aout=None):
    h = struct.pack("<III", MB_MAGIC, flags, (-(MB_MAGIC + flags)) & 0xFFFFFFFF)
    if aout is not None:
        h += struct.pack("<5I", *aout)
    return h


CODE = bytes(range(256)) * 2
SYMS = {"_start": 0x100000, "pykvm_params": 0x101000, "data": 0x101040}


def synthetic_seeds():
    elf64 = build_elf(64, EM_X86_64, [(PT_LOAD, 0x100000, 0x100000, CODE, len(CODE)),
                                      (PT_LOAD, 0x101000, 0x101000, b"\x11" * 0x80, 0x1800),
                                      (PT_NOTE, 0, 0, b"note", 4)],
                      0x100000, symbols=SYMS)
    elf32 = build_elf(32, EM_386, [(PT_LOAD, 0x100000, 0x100000, CODE, len(CODE)),
                                   (PT_LOAD, 0x101000, 0x101000, b"\x22" * 0x80, 0x2000)],
                      0x100000, symbols=SYMS, head=mb_header(0x3))
    elf32_aout = build_elf(32, EM_386, [(PT_LOAD, 0x100000, 0x100000, CODE, len(CODE))],
                           0x100000, head=mb_header(0x10003, (0x200054, 0x200000, 0, 0x203000,
                                                              0x200100)))
    riscv = build_elf(64, EM_RISCV, [(PT_LOAD, 0x80200000, 0x80200000, CODE, len(CODE)),
                                     (PT_LOAD, 0x80201000, 0x80201000, b"\x33" * 0x80, 0x4000)],
                      0x80200000, symbols={"pykvm_params": 0x80201000})
    # a.out kludge: header at 0x20 says it lives at 0x200020, so the file loads from 0x200000;
    # 0x800 bytes of file, bss up to 0x202000, entry 0x200040
    aout = bytearray(b"\x90" * 0x20) + mb_header(0x10003, (0x200020, 0x200000, 0x200800,
                                                            0x202000, 0x200040))
    aout += CODE * 4
    aout = bytes(aout[:0x900])
    return {
        "elf64": [elf64, elf32_aout],          # the ELF32 a.out variant goes through parse_elf
        "elf32": [elf32, elf32_aout],
        "aout": [aout],
        "flat": [CODE, b"\xf4" * 0x1000],
        "riscv": [riscv],
    }


def built_seeds():
    """The guests the project builds, when they have been built."""
    pick = {"elf64": ["x86/hello.elf", "x86/msr.elf"], "elf32": ["x86/hello32.elf"],
            "flat": ["x86/hello16.bin"], "riscv": ["riscv/hello.elf"]}
    out = {}
    for kind, names in pick.items():
        for name in names:
            path = os.path.join(BUILT, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out.setdefault(kind, []).append(f.read())
    return out


SEEDS = synthetic_seeds()
for _kind, _images in built_seeds().items():
    SEEDS[_kind] = SEEDS[_kind] + _images


# ---- where the interesting fields are ---------------------------------------------------------------

def fields_of(img):
    """(offset, width) of the header fields of ``img`` worth setting to odd values: the ELF
    header, program and section headers, the first symbols, and the multiboot header."""
    out = []
    if img[:4] == b"\x7fELF" and len(img) >= 52:
        cls = 64 if img[4] == 2 else 32
        if cls == 64:
            out += [(16, 2), (18, 2), (24, 8), (32, 8), (40, 8), (52, 2), (54, 2), (56, 2),
                    (58, 2), (60, 2), (62, 2)]
            phoff, shoff = struct.unpack_from("<QQ", img, 32)
            phnum, shnum = struct.unpack_from("<H", img, 56)[0], struct.unpack_from("<H", img, 60)[0]
            ph = [(0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (32, 8), (40, 8)]
            sh = [(4, 4), (24, 8), (32, 8), (40, 4), (56, 8)]
            phsz, shsz, symsz = 56, 64, 24
            sym = [(0, 4), (6, 2), (8, 8)]
        else:
            out += [(16, 2), (18, 2), (24, 4), (28, 4), (32, 4), (40, 2), (42, 2), (44, 2),
                    (46, 2), (48, 2), (50, 2)]
            phoff, shoff = struct.unpack_from("<II", img, 28)
            phnum, shnum = struct.unpack_from("<H", img, 44)[0], struct.unpack_from("<H", img, 48)[0]
            ph = [(0, 4), (4, 4), (8, 4), (12, 4), (16, 4), (20, 4)]
            sh = [(4, 4), (16, 4), (20, 4), (24, 4), (36, 4)]
            phsz, shsz, symsz = 32, 40, 16
            sym = [(0, 4), (4, 4), (14, 2)]
        for i in range(min(phnum, 8)):
            out += [(phoff + i * phsz + o, w) for o, w in ph]
        for i in range(min(shnum, 8)):
            base = shoff + i * shsz
            out += [(base + o, w) for o, w in sh]
            if base + shsz <= len(img) and struct.unpack_from("<I", img, base + 4)[0] == SHT_SYMTAB:
                symoff = struct.unpack_from("<Q" if cls == 64 else "<I", img,
                                            base + (24 if cls == 64 else 16))[0]
                for k in range(1, 4):
                    out += [(symoff + k * symsz + o, w) for o, w in sym]
    mb = mb_offset(img)
    if mb is not None:
        out += [(mb + 4 * k, 4) for k in range(12)]
    return [(o, w) for o, w in out if o + w <= len(img)] or [(0, 4)]


def mb_offset(img):
    magic = struct.pack("<I", MB_MAGIC)
    off = img.find(magic, 0, 8192)
    while off >= 0 and off % 4:
        off = img.find(magic, off + 1, 8192)
    return None if off < 0 else off


INTERESTING = [0, 1, 2, 7, 0x40, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x2000, 0x8000, 0x9000,
               0x9FFFF, 0xA0000, 0xFFFFF, 0x100000, 0x100010, 0x101000, 0x1FFFFF, 0x200000,
               0x200020, 0x3FF000, 0x3FFFFF, RAM_SIZE, RAM_SIZE + 1, 0x7FFF, 0xFF00, 0xFFFF,
               8176, 8180, 8188, 8192, 0x7FFFFFFF, 0x80000000, 0x80200000, RISCV_BASE + RAM_SIZE,
               0xFFFFFFFF, 0x100000000, 1 << 63, (1 << 64) - 1]


@st.composite
def mutated(draw, kind):
    seed = draw(st.sampled_from(SEEDS[kind]))
    img = bytearray(seed)
    fields = fields_of(seed)
    for _ in range(draw(st.integers(0, 5))):
        op = draw(st.sampled_from(["field", "field", "flip", "flip", "truncate", "extend"]))
        if op == "field":
            off, width = draw(st.sampled_from(fields))
            if off + width > len(img):
                continue
            value = draw(st.one_of(st.sampled_from(INTERESTING + [len(img), len(img) - 1]),
                                   st.integers(0, (1 << (8 * width)) - 1)))
            img[off:off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif op == "flip" and img:
            near_header = draw(st.booleans())
            pos = draw(st.integers(0, min(len(img), 256 if near_header else len(img)) - 1))
            img[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del img[draw(st.integers(0, len(img))):]
        elif op == "extend":
            img += draw(st.binary(max_size=64)) * draw(st.integers(1, 64))
    if draw(st.booleans()):
        mb = mb_offset(bytes(img))
        if mb is not None and mb + 12 <= len(img):          # let the fields behind it count
            flags = struct.unpack_from("<I", img, mb + 4)[0]
            struct.pack_into("<I", img, mb + 8, (-(MB_MAGIC + flags)) & 0xFFFFFFFF)
    return bytes(img)


# ---- RAM ------------------------------------------------------------------------------------------

class Ram:
    """Real GuestMemory (one slot over an anonymous mmap, no KVM) as the loader sees it:
    ``size`` bytes from ``base``; refilled with the sentinel before every example."""

    def __init__(self, base):
        self.base = base
        self.map, pin = new_mapping(RAM_SIZE)
        self.mem = GuestMemory()
        self.mem._add(MemorySlot(0, base, RAM_SIZE, 0, self.map, pin))
        self.size = RAM_SIZE

    def write(self, gpa, data):
        self.mem.write(gpa, data)

    def read(self, gpa, n):
        return self.mem.read(gpa, n)

    def reset(self):
        self.map[:] = SENTINEL

    def target(self):
        # x86 hands GuestMemory itself to the loader (its size: RAM contiguous from 0)
        return self.mem if self.base == 0 else self


RAMS = {}


def ram(base):
    if base not in RAMS:
        RAMS[base] = Ram(base)
    RAMS[base].reset()
    return RAMS[base]


@pytest.fixture(autouse=True)
def hang_guard():
    def expired(signum, frame):
        raise TimeoutError("loader fuzzing ran past 60 s (a hang or superlinear work)")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60 * max(1, EXAMPLES // 300))
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ---- the property ---------------------------------------------------------------------------------

def check_load(img, *, base=0, **kw):
    r = ram(base)
    arch = "riscv64" if base else "x86_64"
    extra = dict(ram_base=base, reserved=None) if base else {}
    try:
        li = boot.load_image(r.target(), img, arch=arch, cmdline="fuzz=1", **kw, **extra)
    except LoadError as e:
        check_error(e)
        assert r.map[:] == SENTINEL, "a refused image changed guest RAM"
        return None
    check_loaded(li, r, arch, kw)
    # the other entry points take the same bytes without any other exception
    for fn in (lambda: boot.elf_symbols(img), lambda: boot.find_multiboot_header(img)):
        try:
            fn()
        except LoadError as e:
            check_error(e)
    return li


def check_error(e):
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg, f"not a one-line message: {msg!r}"
    assert not isinstance(e.__cause__, boot.image._INTERNAL_ERRORS), \
        f"an internal error leaked through as {msg!r}"


def check_loaded(li, r, arch, kw):
    plan = li.plan
    end = r.base + RAM_SIZE
    reserved = (layout.RESERVED_START, layout.RESERVED_END)
    for s in plan.segments:
        assert r.base <= s.addr <= s.end <= end, f"{s.describe()} outside RAM"
        assert s.filesz <= s.memsz
        if arch == "x86_64" and plan.mode != "real":
            assert not (s.addr < reserved[1] and reserved[0] < s.end), \
                f"{s.describe()} in the VMM window"
    spans = sorted((s.addr, s.end) for s in plan.segments)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "overlapping segments loaded"
    assert any(s.addr <= li.entry < s.end for s in plan.segments), "entry outside the image"
    if li.params_addr is not None:
        assert any(s.addr <= li.params_addr and li.params_addr + boot.PARAMS_SIZE <= s.end
                   for s in plan.segments), "pykvm_params outside the image"
    # what the loader says it wrote, and nothing else, changed
    want = [(s.addr, s.memsz) for s in plan.segments]
    if li.multiboot_info is not None:
        mbi = boot.build_multiboot_info(RAM_SIZE, "fuzz=1", addr=li.multiboot_info)
        want.append((li.multiboot_info, len(mbi)))
        assert r.mem.read(li.multiboot_info, len(mbi)) == mbi
    assert li.written == want
    for s in plan.segments:
        assert r.mem.read(s.addr, s.filesz) == bytes(s.data)
        assert r.mem.read(s.addr + s.filesz, s.memsz - s.filesz) == bytes(s.memsz - s.filesz)
    pos = 0
    for a, n in sorted(li.written):
        lo, hi = a - r.base, a - r.base + n
        assert r.map[pos:lo] == SENTINEL[pos:lo], f"RAM changed below {a:#x}"
        pos = max(pos, hi)
    assert r.map[pos:] == SENTINEL[pos:], "RAM changed after the image"


# ---- the fuzzers ----------------------------------------------------------------------------------

@FUZZ
@given(mutated("elf64"))
def test_fuzz_elf64(img):
    check_load(img)


@FUZZ
@given(mutated("elf32"))
def test_fuzz_elf32_multiboot(img):
    check_load(img)


@FUZZ
@given(mutated("aout"))
def test_fuzz_multiboot_aout(img):
    check_load(img)


FLAT_ADDRS = [0, 0x7C00, 0x8000, 0x9FFFF, 0xFFFF0, 0x100000, RAM_SIZE - 0x100, RAM_SIZE,
              1 << 40]


@FUZZ
@given(mutated("flat"), st.sampled_from(FLAT_ADDRS), st.sampled_from(["real", "long", "protected"]),
       st.one_of(st.none(), st.sampled_from([0, 0x8000, 0x8001, 0x100000, 0x100FFF, -1])))
def test_fuzz_flat(img, addr, mode, entry):
    check_load(img, flat_addr=addr, flat_mode=mode, flat_entry=entry)


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(mutated("riscv"))
def test_fuzz_riscv(img):
    check_load(img, base=RISCV_BASE)


def test_seeds_load():
    """The unmutated seeds load (else the fuzzers would only ever test refusals)."""
    for img in SEEDS["elf64"] + SEEDS["elf32"] + SEEDS["aout"]:
        assert check_load(img) is not None
    li = check_load(SEEDS["elf64"][0])
    assert li.params_addr == SYMS["pykvm_params"] and li.plan.format == "elf64"
    assert check_load(SEEDS["elf32"][0]).multiboot_info == layout.MULTIBOOT_INFO_ADDR
    assert check_load(SEEDS["aout"][0]).plan.format == "multiboot-aout"
    for img in SEEDS["flat"]:
        assert check_load(img, flat_addr=0x8000) is not None
    for img in SEEDS["riscv"]:
        assert check_load(img, base=RISCV_BASE) is not None
