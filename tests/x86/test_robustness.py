"""Guest nonsense and bad input get clear exceptions; the VMM never reads or writes outside its
own buffers, and leaves nothing behind (fds, threads)."""

import pytest

from pykvm import GuestError, GuestMemoryError
from pykvm.abi import EXIT_REASONS
from pykvm.exits import decode_exit
from pykvm.machine import Machine
from pykvm.report import decode


@pytest.fixture
def vcpu(kvm):
    with kvm.create_vm() as vm:
        vm.add_memory(0, 1 << 20)
        yield vm.create_vcpu()


def test_io_exit_with_data_outside_the_run_page(vcpu):
    run = vcpu.run_struct
    run.exit_reason = EXIT_REASONS["IO"]
    run.io.direction, run.io.size, run.io.port, run.io.count = 1, 4, 0x3F8, 1 << 20
    run.io.data_offset = 4096
    ex = decode_exit(vcpu)
    with pytest.raises(GuestError, match="outside the run page"):
        _ = ex.data
    with pytest.raises(GuestError):
        ex.respond(0)
    run.io.count, run.io.data_offset = 1, 1 << 40
    with pytest.raises(GuestError):
        _ = decode_exit(vcpu).data


def test_mmio_exit_with_bad_length(vcpu):
    run = vcpu.run_struct
    run.exit_reason = EXIT_REASONS["MMIO"]
    run.mmio.len = 200
    with pytest.raises(GuestError, match="length 200"):
        _ = decode_exit(vcpu).data


def test_reports_pointing_outside_ram(vcpu):
    mem = vcpu.vm.memory
    with pytest.raises(GuestError, match="outside guest RAM"):
        decode(mem, (1 << 20) - 8)                       # straddles the end of RAM
    with pytest.raises(GuestError, match="outside guest RAM"):
        decode(mem, 1 << 62)
    # an assertion whose strings point nowhere still decodes, saying so
    words = [2, 8, 1 << 50, 1 << 51, 7, 0, 0, 0, 1 << 52, 0]
    mem.write(0x1000, b"".join(w.to_bytes(8, "little") for w in words))
    r = decode(mem, 0x1000)
    assert r.kind == "assert" and r.text.startswith("<bad guest string") and r.line == 7
    mem.write(0x1000, (99).to_bytes(8, "little"))
    with pytest.raises(GuestError, match="unknown command 99"):
        decode(mem, 0x1000)


def test_unterminated_guest_string_is_bounded(vcpu):
    mem = vcpu.vm.memory
    mem.write(0, b"A" * (1 << 20))
    assert len(mem.read_cstring(0)) == 4096
    assert len(mem.read_cstring((1 << 20) - 10)) == 10      # stops at the end of RAM


def test_bad_guest_ranges(vcpu):
    mem = vcpu.vm.memory
    for gpa, n in ((-1, 1), (0, -1), ((1 << 20) - 1, 2), (1 << 64, 1)):
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, n)
    with pytest.raises(GuestMemoryError):
        mem.write((1 << 20) - 1, b"xy")
    assert mem.read((1 << 20) - 1, 1) == b"\0"              # nothing was written


def test_machine_with_four_vcpus_leaves_nothing_behind(guest_image, leftovers):
    image = guest_image("vcpu_id.c")
    snap = leftovers()
    for _ in range(3):
        with Machine(image, vcpus=4) as m:
            assert m.run(timeout=10).exit == "done"
    snap.check()


def test_bad_machine_arguments():
    with pytest.raises(ValueError):
        Machine("hello", vcpus=0)
    with pytest.raises(ValueError, match="multiple of"):
        Machine("hello", mem_size=12345)
    from pykvm.guests import GuestNotFound
    with pytest.raises(GuestNotFound):
        Machine("no_such_guest")
