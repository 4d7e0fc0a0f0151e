"""Issue 2 on the real /dev/kvm: caps, ONE_REG for MSRs, memory slots, errors, fds, run loops."""
import errno
import gc
import json
import os
import subprocess
import sys
import textwrap

import pytest

from pykvm import GuestMemoryError, Kvm, KvmError
from pykvm.abi import ioctls
from pykvm.arch.x86.regs import msr_reg_id
from pykvm.runloop import RunLoop

from _asm import real_mode_vm
from _loops import LOOP_IDS, LOOPS, pc_config

EFER, STAR, TSC = 0xC0000080, 0xC0000081, 0x10

C_CAPS = textwrap.dedent(r"""
    #include <fcntl.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <sys/ioctl.h>
    #include <linux/kvm.h>
    int main(int argc, char **argv) {
        int fd = open("/dev/kvm", O_RDWR);
        if (fd < 0) return 1;
        printf("api_version %d\n", ioctl(fd, KVM_GET_API_VERSION, 0));
        printf("vcpu_mmap_size %d\n", ioctl(fd, KVM_GET_VCPU_MMAP_SIZE, 0));
        for (int i = 1; i < argc; i++)
            printf("cap %s %d\n", argv[i], ioctl(fd, KVM_CHECK_EXTENSION, atoi(argv[i])));
        return 0;
    }
""")


def test_caps_json_matches_c(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pykvm", "caps", "--json"], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    assert {"api_version", "arch", "caps", "vcpu_mmap_size", "nested"} <= set(info)
    assert info["arch"] == "x86_64"
    from pykvm import abi
    src, exe = tmp_path / "caps.c", tmp_path / "caps"
    src.write_text(C_CAPS)
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    nums = [str(n) for n in abi.CAPS.values()]
    c = subprocess.run([str(exe)] + nums, capture_output=True, text=True, check=True).stdout
    got = {}
    for line in c.splitlines():
        parts = line.split()
        if parts[0] == "cap":
            got[abi.CAP_NAMES[int(parts[1])]] = int(parts[2])
        else:
            got[parts[0]] = int(parts[1])
    assert info["api_version"] == got["api_version"] == 12
    assert info["vcpu_mmap_size"] == got["vcpu_mmap_size"]
    assert info["caps"] == {k: v for k, v in got.items() if k in abi.CAPS}
    assert info["caps"]["ONE_REG"] > 0


@pytest.fixture
def vcpu(kvm):
    with kvm.create_vm() as vm:
        yield vm.create_vcpu()


def test_one_reg_msrs_equal_get_msrs(vcpu):
    for msr in (EFER, TSC, STAR):
        via_one_reg = vcpu.get_one_reg(msr_reg_id(msr))
        via_msrs = vcpu.get_msrs([msr])[msr]
        if msr == TSC:      # the TSC ticks between the two reads
            assert 0 <= via_msrs - via_one_reg < 1 << 40
        else:
            assert via_one_reg == via_msrs
    assert msr_reg_id(TSC) == 0x2030000200000010


def test_one_reg_star_write_seen_by_get_msrs(vcpu):
    value = 0x0023001000000000
    vcpu.set_one_reg(msr_reg_id(STAR), value)
    assert vcpu.get_msrs([STAR])[STAR] == value
    vcpu.set_msrs({STAR: 0x0013000800000000})
    assert vcpu.get_msr_one_reg(STAR) == 0x0013000800000000


def test_one_reg_absent_register_names_errno(vcpu):
    bogus = msr_reg_id(0xDEADBEEF)
    with pytest.raises(KvmError) as ei:
        vcpu.get_one_reg(bogus)
    e = ei.value
    assert e.errno in (errno.ENOENT, errno.EINVAL)
    assert e.ioctl == "KVM_GET_ONE_REG"
    assert str(e).startswith(f"KVM_GET_ONE_REG({bogus:#x}): {errno.errorcode[e.errno]} — ")
    with pytest.raises(KvmError) as ei:
        vcpu.set_one_reg(bogus, 1)
    assert ei.value.errno in (errno.ENOENT, errno.EINVAL)


def test_one_reg_size_checked_before_the_ioctl(vcpu):
    with pytest.raises(ValueError, match="does not fit"):
        vcpu.set_one_reg(msr_reg_id(STAR), 1 << 64)
    with pytest.raises(ValueError, match="takes 8 bytes"):
        vcpu.set_one_reg(msr_reg_id(STAR), b"\0" * 4)


def test_msr_index_list_and_reg_list(kvm, vcpu):
    msrs = kvm.msr_index_list()
    assert STAR in msrs and 0xC0000082 in msrs      # STAR, LSTAR (EFER lives in sregs)
    assert isinstance(vcpu.reg_list(), list)     # this host lists only KVM-defined registers


def test_memory_slots(kvm):
    with kvm.create_vm() as vm:
        ram = vm.add_memory(0, 1 << 20)
        vm.memory.write(0xFFFF8, b"12345678")
        assert vm.memory.read(0xFFFF8, 8) == b"12345678"
        with pytest.raises(GuestMemoryError, match="not backed"):
            vm.memory.read(0xFFFF9, 8)
        with pytest.raises(GuestMemoryError, match="overlaps"):
            vm.add_memory(0x80000, 1 << 20)
        rom = vm.add_memory(1 << 20, 1 << 16, readonly=True)
        assert rom.readonly and vm.memory.size == (1 << 20) + (1 << 16)
        vm.memory.write(1 << 20, b"rom")          # the host may write a guest-read-only slot
        vm.remove_memory(rom)
        assert vm.memory.size == 1 << 20
        with pytest.raises(GuestMemoryError):
            vm.memory.read(1 << 20, 1)
        with pytest.raises(ValueError, match="multiple of"):
            vm.add_memory(2 << 20, 100)
        assert ram in list(vm.memory)


def test_vcpu_id_twice_is_a_typed_error(kvm):
    with kvm.create_vm() as vm:
        vm.create_vcpu(0)
        with pytest.raises(KvmError) as ei:
            vm.create_vcpu(0)
        assert ei.value.errno == errno.EEXIST and "KVM_CREATE_VCPU(id=0): EEXIST" in str(ei.value)


def _fds():
    return set(os.listdir("/proc/self/fd"))


def test_fds_closed_by_context_managers_and_gc():
    before = _fds()
    with Kvm() as kvm:
        with kvm.create_vm() as vm:
            vm.add_memory(0, 1 << 20)
            vm.create_vcpu()
            vm.ioeventfd(0x600, 2, pio=True)
    assert _fds() == before
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_vcpu()
    del kvm, vm
    gc.collect()
    assert _fds() == before


def test_stats(kvm):
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        st = v.stats()
        assert "exits" in st or "halt_exits" in st or len(st) > 5
        assert len(vm.stats()) > 0


def _real_mode(kvm, code):
    return real_mode_vm(kvm, code, 1 << 20)


# mov dx,0x3f8; mov al,'H'; out dx,al; mov al,'i'; out dx,al; mov dx,0x80; out dx,al;
# mov dx,0xf4; mov al,5; out dx,al; hlt
PROGRAM = bytes.fromhex("BAF803B048EEB069EEBA8000EEBAF400B005EEF4")


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_run_loops_agree(kvm, loop_cls):
    vm, v = _real_mode(kvm, PROGRAM)
    with vm:
        loop = loop_cls(v, pc_config())
        st = loop.run()
        assert st.kind == "exit" and st.exit.name == "IO" and st.exit.port == 0x80
        assert st.exit.data == b"i"
        assert bytes(loop.console) == b"Hi"
        st = loop.run()
        assert (st.kind, st.value) == ("debug_exit", 5)
        assert loop.counts == {"IO": 4}
        st = loop.run()
        assert st.kind == "exit" and st.exit.name == "HLT"


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_deadline_and_kick_stop_a_spinning_guest(kvm, loop_cls):
    import threading
    import time
    vm, v = _real_mode(kvm, b"\xEB\xFE")          # jmp .
    with vm:
        loop = loop_cls(v)
        t0 = time.monotonic()
        assert loop.run(deadline=t0 + 0.2).kind == "deadline"
        threading.Timer(0.1, loop.kick).start()
        assert loop.run().kind == "kick"
        loop.kick()                                 # a kick before the run: returns at once
        assert loop.run().kind == "kick"


def test_exit_is_stale_after_next_run(kvm):
    from pykvm import StaleExit
    vm, v = _real_mode(kvm, PROGRAM)
    with vm:
        ex = v.run()
        assert ex.name == "IO" and ex.port == 0x3F8
        v.run()
        with pytest.raises(StaleExit):
            _ = ex.port


def test_budget(kvm):
    vm, v = _real_mode(kvm, bytes.fromhex("BAF803B041EEEBFB"))  # loop: out 'A' forever
    with vm:
        loop = RunLoop(v, pc_config())
        assert loop.run(budget=50).kind == "budget"
        assert loop.exits_total == 50 and bytes(loop.console) == b"A" * 50


def test_ioctl_table_is_consistent():
    names = [i.name for i in ioctls.TABLE]
    assert len(names) == len(set(names))
    assert ioctls.KVM_RUN == 0xAE80
