"""The RISC-V platform without KVM: image and initrd placement, the UART in the loop
configuration, and the status of an SBI system reset."""
from types import SimpleNamespace

import pytest

from pykvm import boot

from pykvm import status
from pykvm.platform import riscv_virt as P

from test_riscv_linux_image import Mem, RAM_BASE, riscv_image


def machine(ram=4 << 20, **options):
    """The virt machine over ``ram`` bytes of fake guest memory (no KVM here)."""
    return virt(Mem(ram), ram, **options)


def virt(mem, ram, **options):
    """The virt machine over fake guest memory ``mem`` of ``ram`` bytes (no KVM here)."""
    from pykvm.platform.base import MachineControl
    vm = SimpleNamespace(memory=mem, add_memory=lambda gpa, size: SimpleNamespace(gpa=gpa,
                                                                                  size=size))
    control = MachineControl(console=lambda b: None, stopping=lambda: False,
                             kick=lambda i: None, in_run=lambda i: False)
    return P.VirtPlatform(vm, None, control, vcpus=1, mem_size=ram, **options)


def test_initrd_goes_below_the_dtb_page_aligned(tmp_path):
    m = machine()
    initrd = tmp_path / "env"
    initrd.write_bytes(b"FOO=foo\nBAR=bar\n" * 300)          # 4800 bytes
    p = m
    li = p.load(riscv_image(image_size=0x3000), initrd=(str(initrd),))
    top = RAM_BASE + (4 << 20) - P.DTB_SPACE
    start, end = p.initrd
    assert start % 4096 == 0 and end - start == 4800 and end <= top and top - end < 4096
    assert m.vm.memory.read(start, 4800) == initrd.read_bytes()
    assert li.entry == RAM_BASE + 0x200000
    assert (start, 4800) in li.written


def test_initrd_that_does_not_fit_is_bad_input(tmp_path):
    m = machine(4 << 20)
    big = tmp_path / "big"
    big.write_bytes(bytes(2 << 20))                           # meets the image at 2 MiB + 12 KiB
    with pytest.raises(boot.LoadError, match="does not fit between the image"):
        m.load(riscv_image(image_size=0x3000), initrd=(str(big),))
    with pytest.raises(boot.LoadError, match="one initrd"):
        m.load(riscv_image(), initrd=(str(big), str(big)))
    with pytest.raises(boot.LoadError, match="initrd: cannot read"):
        m.load(riscv_image(), initrd=(str(tmp_path / "missing"),))
    with pytest.raises(boot.LoadError, match="takes no arguments"):
        m.load(riscv_image(), initrd=(f"{big} root=/dev/vda",))


def test_image_may_not_reach_into_the_dtb():
    m = machine(4 << 20)
    with pytest.raises(boot.LoadError, match="outside guest RAM"):
        m.load(riscv_image(image_size=(2 << 20) - 0x1000))


def test_loop_config_serves_the_uart_unless_disabled():
    m = machine()
    m.vm.memory = []                                           # no RAM regions: nothing to read
    assert m.loop_config().uart_mmio_base == 0x10000000
    off = machine(uart=False)
    off.vm.memory = []
    assert off.loop_config().uart_mmio_base == 0
    assert m.loop_config().sbi_console


def event(type_name, *data):
    return SimpleNamespace(name="SYSTEM_EVENT", type_name=type_name, data=tuple(data))


@pytest.mark.parametrize("ev, code", [
    (event("SHUTDOWN", 0), status.OK),
    (event("SHUTDOWN"), status.OK),                            # no data: no reason
    (event("SHUTDOWN", 1), status.GUEST_FAILURE),              # system failure
    (event("SHUTDOWN", 0xF0000001), status.GUEST_FAILURE),     # vendor reason
    (event("RESET", 1), status.GUEST_FAILURE),
    (event("RESET", 0), status.UNHANDLED_EXIT),                # pykvm does not reboot
    (event("SHUTDOWN", (7 << 32) | 0), status.OK),             # reason is 32 bits
    (event("CRASH", 0), status.UNHANDLED_EXIT),
])
def test_srst_statuses(ev, code):
    got, detail = machine().exit_verdict(ev)
    assert got == code and detail
