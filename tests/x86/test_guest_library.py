"""The guest library at selftest level (issue 21, item 2), on real KVM: exception fixups
(``rdmsr_safe``, ``wrmsr_safe``, ``asm_safe``) beside a test's own handler, an unexpected
exception reported at the guest's function and file:line (DWARF line table), guest globals read
and written by name, and guest-virtual ranges mapped and allocated from the host
(``virt_map``/``vaddr_alloc``). The guest is guest_library.c beside this file."""
import os
import re
import struct

import pytest

from pykvm.arch.x86.paging import PagingError
from pykvm.report import GuestAssertion

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest_library.c")
GP, UD = 13, 6


def test_fixups_return_the_vector_and_handlers_compose(guest_vm):
    m = guest_vm("guest_library.c")
    m.set_params(0)
    rd, value, wr, ud, gp, ud_handled, ud_seen = m.sync(stage=1)
    assert (rd, value) == (GP, 0)          # no such MSR: #GP, the guest went on, value 0
    assert wr == GP
    assert ud == UD and gp == GP
    assert ud_handled == UD                # the fixup took the ud2 inside asm_safe ...
    assert ud_seen == 2                    # ... the test's #UD handler the two outside it
    m.done()


def _marker_line(marker: str) -> int:
    with open(SRC) as f:
        for n, text in enumerate(f, 1):
            if marker in text:
                return n
    raise AssertionError(f"no {marker!r} in {SRC}")


def test_unexpected_exception_names_the_guest_function_and_line(guest_vm):
    m = guest_vm("guest_library.c")
    m.set_params(3)
    with pytest.raises(GuestAssertion) as ei:
        m.done()
    line = _marker_line("MARKER: unexpected #GP")
    msg = str(ei.value)
    assert re.search(r"unexpected guest exception #GP \(vector 13\) error code 0x0 at RIP "
                     r"0x[0-9a-f]+ in unexpected_gp \(guest_library\.c:(\d+)", msg), msg
    assert f"guest_library.c:{line}" in msg, msg
    assert ei.value.report.where.startswith("unexpected_gp")


def test_globals_by_name(guest_vm):
    m = guest_vm("guest_library.c")
    m.set_params(1)
    assert m.sync(stage=2) == (41,)
    assert m.read_global("counter") == 41 and m.globals["counter"] == 41
    m.write_global("counter", 1000)
    m.globals.write("big", struct.pack("<4Q", 7, 8, 9, 0xFFFF_FFFF_FFFF_FFFF))
    assert m.sync(stage=3) == (1000, 7, 0xFFFF_FFFF_FFFF_FFFF)
    assert m.globals.read_bytes("big")[:8] == struct.pack("<Q", 7)
    with pytest.raises(KeyError, match="no_such_variable"):
        m.read_global("no_such_variable")
    with pytest.raises(ValueError, match="big"):
        m.read_global("big")                  # 32 bytes: not an integer
    with pytest.raises(ValueError, match="does not fit"):
        m.write_global("counter", 1 << 64)
    assert "counter" in m.globals and "ud_seen" in m.globals
    m.done()


def test_virt_map_and_vaddr_alloc_reach_the_guest(guest_vm):
    m = guest_vm("guest_library.c")
    m.set_params(2)
    m.sync(stage=4)
    gpa = m.alloc_pages(2)
    m.memory.write(gpa + 0x1008, struct.pack("<Q", 0x5EED_F00D_CAFE_0001))
    vaddr = 0x7F_1234_5000                    # unmapped: above the boot identity map
    assert m.virt_to_phys(vaddr) is None
    m.virt_map(vaddr, gpa, 0x2000)
    assert m.virt_to_phys(vaddr + 0x1008) == gpa + 0x1008
    with pytest.raises(PagingError, match="already mapped"):
        m.virt_map(vaddr + 0x1000, gpa, 0x1000)
    with pytest.raises(PagingError, match="already mapped"):
        m.virt_map(0x200000, gpa, 0x1000)      # inside the boot identity map's 2 MiB pages
    va2 = m.vaddr_alloc(100)
    assert va2 % 0x1000 == 0 and m.virt_to_phys(va2) is not None
    m.set_params(2, vaddr + 0x1008)
    assert m.sync(stage=5) == (0x5EED_F00D_CAFE_0001,)
    m.done()


def test_vaddr_alloc_memory_is_what_the_guest_reads(guest_vm):
    m = guest_vm("guest_library.c")
    m.set_params(2)
    m.sync(stage=4)
    va = m.vaddr_alloc(0x3000)
    gpa = m.virt_to_phys(va + 0x2010)
    m.memory.write(gpa, struct.pack("<Q", 0xABCDEF))
    m.set_params(2, va + 0x2010)
    assert m.sync(stage=5) == (0xABCDEF,)
    m.done()


def test_page_helpers_refuse_before_taking_anything(guest_vm):
    """Sizes out of range are refused at once (a 1 TiB vaddr_alloc used to scan for hours),
    and a mapping that cannot get its page tables is refused before any page is taken or any
    entry written: no RAM leaked, no half-made mapping."""
    m = guest_vm("guest_library.c", mem_size=64 << 20)
    m.set_params(2)
    m.sync(stage=4)
    for bad in (0, -5, True, 1.5):
        with pytest.raises(ValueError):
            m.vaddr_alloc(bad)
        with pytest.raises(ValueError):
            m.alloc_pages(bad)
    _, pages = m._paging()
    free = pages.free_bytes
    with pytest.raises(PagingError, match="at most"):
        m.vaddr_alloc(1 << 40)
    with pytest.raises(PagingError, match="free"):
        m.vaddr_alloc(free + 4096)
    assert pages.free_bytes == free
    while pages.free_bytes > 2 * 4096:                 # leave two pages: too few for 3 tables
        pages.alloc(max(1, (pages.free_bytes - 2 * 4096) // 4096))
    far = 3 << 39                                      # a PML4 slot with no tables yet
    with pytest.raises(PagingError, match="page tables"):
        m.virt_map(far, 0x200000, 0x2000)
    assert pages.free_bytes == 2 * 4096
    assert m.virt_to_phys(far) is None and m.virt_to_phys(far + 0x1000) is None
