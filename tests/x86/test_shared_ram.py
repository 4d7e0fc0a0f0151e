"""Guest RAM as a shared memfd (``Vm.add_memory(shared=True)``, what virtio-fs's virtiofsd needs):
a real-mode guest runs on it, and another process that maps nothing of ours but holds the memfd
sees what the guest wrote, and the guest sees what was written through the memfd."""
import os
import subprocess
import sys

from _asm import real_mode_vcpu

# mov byte ptr [0x2000], 0x5a ; mov al, [0x2100] ; out 0x80, al ; hlt
PROGRAM = bytes.fromhex("C60600205A" "A00021" "E680" "F4")


def test_guest_runs_on_shared_ram_and_another_process_sees_it(kvm):
    with kvm.create_vm() as vm:
        assert vm.shared_memory is False
        ram = vm.add_memory(0, 1 << 20, shared=True)
        assert ram.shared and ram.fd >= 0
        assert os.readlink(f"/proc/self/fd/{ram.fd}").startswith("/memfd:pykvm-guest-ram")
        assert os.fstat(ram.fd).st_size == 1 << 20
        vm.memory.write(0x1000, PROGRAM)
        os.pwrite(ram.fd, b"\x77", 0x2100)          # written through the file, not our mapping
        v = real_mode_vcpu(vm, rip=0x1000, flat_data=True)
        ex = v.run()
        assert ex.name == "IO" and ex.port == 0x80 and ex.data == b"\x77"
        assert v.run().name == "HLT"
        # another process, given only the memfd, reads the byte the guest stored
        out = subprocess.run([sys.executable, "-c",
                              f"import os; print(os.pread({ram.fd}, 1, 0x2000).hex())"],
                             pass_fds=(ram.fd,), capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "5a"
        # zero() frees the pages in the file itself: every mapping reads zeros
        vm.memory.zero(0, 1 << 20)
        assert os.pread(ram.fd, 1, 0x2000) == b"\0" and vm.memory.read(0x1000, 5) == bytes(5)
        fd = ram.fd
    assert not os.path.exists(f"/proc/self/fd/{fd}") or \
        not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:pykvm-guest-ram")


def test_private_ram_stays_the_default_and_vm_default_applies(kvm):
    with kvm.create_vm() as vm:
        a = vm.add_memory(0, 1 << 16)
        assert not a.shared and a.fd == -1
        vm.shared_memory = True                       # what a Machine with a share sets
        b = vm.add_memory(1 << 16, 1 << 16)
        c = vm.add_memory(2 << 16, 1 << 16, shared=False)
        assert b.shared and not c.shared
        vm.memory.write(0x10000, b"shared")
        assert os.pread(b.fd, 6, 0) == b"shared"
        vm.remove_memory(b)                           # the slot's memfd goes with it
        assert b.fd == -1
