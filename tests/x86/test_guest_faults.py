"""Whose fault is it (issue 16, fault 1, the Machine part): an address the guest chose that is
not guest RAM, met while serving the guest's request, is the guest's fault (status 4, one line
naming the exit) on every exit-handler path of Machine — a handler called from inside the C
loop, one called from step() (the Python loop), and the platform's devices — while an
exception of the VMM's own code stays a VMM error (8)."""
import pytest

from pykvm import status
from pykvm.machine import Machine

from _elfguest import elf_guest
from _loops import LOOP_IDS, LOOPS, ReferenceLoop

# the guest asks port 0x500 to read guest memory at the address it writes (far outside RAM)
BAD_ADDRESS = """
    mov eax, 0xfffff000
    mov dx, 0x500
    out dx, eax
1:  jmp 1b
"""


def _read_where_the_guest_says(m, index, ex):
    m.memory.read(ex.value, 16)                 # GuestMemoryError: not RAM


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_guest_address_outside_ram_in_a_handler_is_a_guest_fault(tmp_path, loop_cls):
    path = elf_guest(tmp_path, BAD_ADDRESS)
    with Machine(path, loop=loop_cls) as m:
        m.on("IO", _read_where_the_guest_says)
        r = m.run(timeout=10)
        assert (r.exit, r.exit_code) == ("guest_error", status.GUEST_FAILURE), r.detail
        assert "guest fault" in r.detail and "0xfffff000" in r.detail
        assert "IO exit" in r.detail and "port=0x500" in r.detail
        assert "\n" not in r.detail


def test_guest_address_outside_ram_in_step_is_a_guest_error_event(tmp_path):
    from pykvm.errors import GuestError
    path = elf_guest(tmp_path, BAD_ADDRESS)
    with Machine(path, loop=ReferenceLoop) as m:
        m.on("IO", _read_where_the_guest_says)
        with pytest.raises(GuestError, match="guest fault: guest-physical address 0xfffff000"):
            m.step(timeout=10)


def test_a_bug_of_the_vmm_in_a_handler_stays_a_vmm_error(tmp_path):
    path = elf_guest(tmp_path, BAD_ADDRESS)

    def broken(m, index, ex):
        raise KeyError("vmm bug")
    with Machine(path) as m:
        m.on("IO", broken)
        r = m.run(timeout=10)
        assert (r.exit, r.exit_code) == ("handler_error", status.VMM_ERROR)


def test_a_report_outside_ram_is_the_guests_failure(tmp_path):
    path = elf_guest(tmp_path, """
    mov dx, 0x1000
    mov eax, 0xfffff000
    out dx, eax
1:  jmp 1b
""")
    for loop_cls in LOOPS:
        with Machine(path, loop=loop_cls) as m:
            r = m.run(timeout=10)
            assert (r.exit, r.exit_code) == ("guest_error", status.GUEST_FAILURE), r.detail
