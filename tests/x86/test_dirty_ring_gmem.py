"""Issue 21 item 1 (x86): the dirty ring (KVM_CAP_DIRTY_LOG_RING), KVM_SET_USER_MEMORY_REGION2,
guest_memfd, memory attributes and VM types, on the real /dev/kvm with real-mode guests.

A capability this host's KVM lacks skips its test ("pykvm: host lacks KVM_CAP_...").
"""
import os

import pytest

from pykvm import abi
from pykvm.errors import Closed, GuestMemoryError, KvmError
from pykvm.exits import DirtyRingFull, Hlt, Io

from _asm import asm16, real_mode_vcpu

pytestmark = pytest.mark.requires_arch("x86_64")
PAGE = 4096
FIRST = 0x10000                  # the guests below write from here up, one byte per page
MIB = 1 << 20

# Writes one byte at the start of each of CX pages from ES:0 on (ES += 0x100 per page), then
# OUT 0x10 (an I/O exit), then does it again for DX pages from the same start, then HLT.
TWO_ROUNDS = """
    mov ax, 0x1000
    mov es, ax
    mov cx, {first}
1:  mov byte ptr es:[0], 1
    mov ax, es
    add ax, 0x100
    mov es, ax
    loop 1b
    out 0x10, al
    mov ax, 0x1000
    mov es, ax
    mov cx, {second}
2:  mov byte ptr es:[0], 2
    mov ax, es
    add ax, 0x100
    mov es, ax
    loop 2b
    hlt
"""


def _pages(n):
    return [FIRST + i * PAGE for i in range(n)]


def _run_to(vcpu, kind, on_full=None, limit=100000):
    """Run until an exit of class ``kind``; DIRTY_RING_FULL exits go to ``on_full()``."""
    for _ in range(limit):
        ex = vcpu.run()
        if isinstance(ex, kind):
            return ex
        if isinstance(ex, DirtyRingFull) and on_full is not None:
            on_full()
            continue
        assert ex.name == "INTR", ex
    raise AssertionError(f"no {kind.__name__} exit")


def _ring_vm(kvm, ring_bytes, code):
    """A VM with a dirty ring of ``ring_bytes``, 1 MiB of dirty-logged RAM at 0 holding
    ``code`` at 0x1000, and one real-mode vCPU there."""
    vm = kvm.create_vm()
    try:
        vm.enable_dirty_ring(ring_bytes)
    except BaseException:
        vm.close()
        raise
    slot = vm.add_memory(0, MIB, log_dirty=True)
    vm.memory.write(0x1000, code)
    return vm, slot, real_mode_vcpu(vm, rip=0x1000)


@pytest.mark.requires_cap("DIRTY_LOG_RING")
def test_dirty_ring_reports_each_written_page_once_per_reset(kvm):
    code = asm16(TWO_ROUNDS.format(first=16, second=20))
    vm, slot, vcpu = _ring_vm(kvm, 64 * 1024, code)
    with vm:
        ring = vcpu.dirty_ring
        assert ring.entries == 64 * 1024 // 16
        ex = _run_to(vcpu, Io)
        assert ex.port == 0x10
        got = ring.harvest()                       # raw entries: (slot, page offset) in order
        assert got == [(slot.slot, FIRST // PAGE + i) for i in range(16)]
        assert ring.harvest() == []                # nothing new; the harvested wait for reset
        assert vm.reset_dirty_rings() == 16
        _run_to(vcpu, Hlt)
        # the reset re-protected the 16 pages: the second round's writes report them again
        assert vm.harvest_dirty_rings() == _pages(20)
        assert ring.fetch_index == 36
        assert vm.memory.read(FIRST + 19 * PAGE, 1) == b"\x02"


@pytest.mark.requires_cap("DIRTY_LOG_RING")
def test_a_full_dirty_ring_exits_until_harvested_and_reset(kvm):
    """224 pages into a 256-entry ring, whose soft limit is 256 less KVM's reserved entries
    (64 or more): KVM_RUN answers DIRTY_RING_FULL, and keeps answering it, until the ring is
    harvested and reset. (KVM raises the exit at a vCPU entry after the soft limit is reached:
    on this host that is sometimes before the guest's next I/O exit and sometimes not, so the
    test takes it wherever it comes.)"""
    code = asm16(TWO_ROUNDS.replace("hlt", "out 0x11, al\n    hlt").format(first=1, second=224))
    try:
        vm, slot, vcpu = _ring_vm(kvm, PAGE, code)      # 256 entries
    except KvmError as e:
        assert e.errno_name == "EINVAL"
        pytest.skip("pykvm: host lacks a dirty ring of one page (its KVM reserves more than "
                    "256 entries)")
    with vm:
        assert _run_to(vcpu, Io).port == 0x10
        assert vm.harvest_dirty_rings() == _pages(1)
        fulls, seen = [], set()

        def on_full():
            fulls.append(vcpu.dirty_ring.fetch_index)
            again = vcpu.run()                          # not harvested yet: refused again
            assert isinstance(again, DirtyRingFull), again
            seen.update(vm.harvest_dirty_rings())

        assert _run_to(vcpu, Io, on_full).port == 0x11   # all 224 pages written
        if not fulls:                                    # the exit comes at this entry
            assert isinstance(vcpu.run(), DirtyRingFull)
            on_full()
        _run_to(vcpu, Hlt)
        seen.update(vm.harvest_dirty_rings())
        assert len(fulls) == 1
        assert seen == set(_pages(224))
        assert vm.memory.read(FIRST + 223 * PAGE, 1) == b"\x02"


@pytest.mark.requires_cap("DIRTY_LOG_RING")
def test_dirty_ring_is_enabled_only_before_vcpus_and_with_a_valid_size(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(ValueError, match="power of two"):
            vm.enable_dirty_ring(3 * PAGE)
        with pytest.raises(ValueError, match="above KVM's limit"):
            vm.enable_dirty_ring(kvm.check_extension("DIRTY_LOG_RING") * 2)
        with pytest.raises(ValueError, match="not enabled"):
            vm.harvest_dirty_rings()
        v = vm.create_vcpu()
        assert v.dirty_ring is None
        with pytest.raises(ValueError, match="before the first vCPU"):
            vm.enable_dirty_ring(PAGE * 16)


@pytest.mark.requires_cap("DIRTY_LOG_RING")
def test_dirty_ring_entries_outside_logged_slots_are_not_reported(kvm):
    """A slot without KVM_MEM_LOG_DIRTY_PAGES reports nothing through the ring."""
    code = asm16(TWO_ROUNDS.format(first=4, second=4))
    with kvm.create_vm() as vm:
        vm.enable_dirty_ring(16 * PAGE)
        vm.add_memory(0, MIB)
        vm.memory.write(0x1000, code)
        vcpu = real_mode_vcpu(vm, rip=0x1000)
        _run_to(vcpu, Io)
        _run_to(vcpu, Hlt)
        assert vm.harvest_dirty_rings() == []
        assert vm.reset_dirty_rings() == 0


@pytest.mark.requires_cap("DIRTY_LOG_RING")
def test_a_closed_vcpus_ring_is_unmapped(kvm):
    with kvm.create_vm() as vm:
        vm.enable_dirty_ring(16 * PAGE)
        v = vm.create_vcpu()
        ring = v.dirty_ring
        v.close()
        with pytest.raises(Closed):
            ring.harvest()


# -- KVM_SET_USER_MEMORY_REGION2 ---------------------------------------------------------------

@pytest.mark.requires_cap("USER_MEMORY2")
def test_a_guest_runs_from_a_slot_set_with_region2(kvm):
    """Code and data in a slot set with KVM_SET_USER_MEMORY_REGION2 (no guest_memfd); dirty
    logging switched on through it; the slot removed and set again through it."""
    code = asm16("""
        mov ax, 0x1000
        mov es, ax
        mov word ptr es:[0x10], 0xBEEF
        out 0x10, al
        mov word ptr es:[0x2010], 0xCAFE
        hlt
    """)
    with kvm.create_vm() as vm:
        slot = vm.add_memory(0, MIB, region2=True)
        vm.memory.write(0x1000, code)
        vcpu = real_mode_vcpu(vm, rip=0x1000)
        assert _run_to(vcpu, Io).port == 0x10
        assert vm.memory.read(0x10010, 2) == (0xBEEF).to_bytes(2, "little")
        vm.set_memory_flags(slot, log_dirty=True)       # REGION2 again, with the new flags
        assert slot.flags == abi.MEM_LOG_DIRTY_PAGES
        _run_to(vcpu, Hlt)
        assert vm.memory.read(0x12010, 2) == (0xCAFE).to_bytes(2, "little")
        assert vm.get_dirty_log(slot) == [0x12000]
        vm.remove_memory(slot)
        again = vm.add_memory(0, MIB, region2=True, slot=slot.slot)
        assert again.slot == slot.slot and vm.memory.read(0x10010, 2) == b"\0\0"


@pytest.mark.requires_cap("USER_MEMORY2")
def test_region2_refusals_name_the_ioctl(kvm):
    with kvm.create_vm() as vm:
        vm.add_memory(0, MIB, region2=True)
        with pytest.raises(GuestMemoryError, match="overlaps"):
            vm.add_memory(0x80000, MIB, region2=True)
        with pytest.raises(GuestMemoryError, match="guest_memfd offset"):
            vm.add_memory(2 * MIB, MIB, guest_memfd=99, guest_memfd_offset=100)
        if not vm.check_extension("GUEST_MEMFD"):
            # KVM_MEM_GUEST_MEMFD on a VM that cannot take it: KVM's EINVAL, named
            with pytest.raises(KvmError, match=r"KVM_SET_USER_MEMORY_REGION2\(slot=1 .*"
                                               r"guest_memfd=0 offset=0x0\): EINVAL"):
                vm.add_memory(2 * MIB, MIB, guest_memfd=0)
            assert [s.slot for s in vm.memory] == [0]


# -- guest_memfd, memory attributes, VM types ---------------------------------------------------

def test_vm_types_name_what_kvm_creates(kvm):
    types = kvm.vm_types()
    assert types[0] == "DEFAULT"
    with kvm.create_vm("default") as vm:
        assert vm.fd >= 0
    with pytest.raises(ValueError, match="unknown VM type 'PDP11'"):
        kvm.create_vm("PDP11")
    if "SW_PROTECTED" not in types:
        with pytest.raises(KvmError, match=r"KVM_CREATE_VM\(1\): EINVAL"):
            kvm.create_vm("SW_PROTECTED")


def test_guest_memfd_is_made_where_offered_and_refused_naming_the_capability_elsewhere(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(ValueError, match="positive multiple"):
            vm.create_guest_memfd(100)
        if vm.check_extension("GUEST_MEMFD"):
            fd = vm.create_guest_memfd(MIB)
            assert os.fstat(fd).st_size == MIB
        else:
            with pytest.raises(KvmError, match=r"KVM_CREATE_GUEST_MEMFD\(size=0x100000 "
                                               r"flags=0x0\): E.*needs KVM_CAP_GUEST_MEMFD"):
                vm.create_guest_memfd(MIB)


@pytest.mark.requires_cap("GUEST_MEMFD")
def test_guest_memfd_backs_a_slot_whose_private_pages_the_host_cannot_see(kvm):
    """A software-protected VM: a slot backed by a guest_memfd, one page made private; the
    guest's write there lands in the guest_memfd, not in the host mapping, while its write to
    a shared page lands in the host mapping."""
    if "SW_PROTECTED" not in kvm.vm_types():
        pytest.skip("pykvm: host lacks KVM_X86_SW_PROTECTED_VM (KVM_CAP_VM_TYPES)")
    code = asm16("""
        mov ax, 0x1000
        mov es, ax
        mov word ptr es:[0x10], 0x1111
        mov word ptr es:[0x1010], 0x2222
        mov ax, word ptr es:[0x10]
        out 0x10, ax
        hlt
    """)
    with kvm.create_vm("SW_PROTECTED") as vm:
        if not vm.check_extension("GUEST_MEMFD"):
            pytest.skip("pykvm: host lacks KVM_CAP_GUEST_MEMFD on a KVM_X86_SW_PROTECTED_VM")
        if not vm.check_extension("MEMORY_ATTRIBUTES") & abi.MEMORY_ATTRIBUTE_PRIVATE:
            pytest.skip("pykvm: host lacks KVM_CAP_MEMORY_ATTRIBUTES (private)")
        gmem = vm.create_guest_memfd(MIB)
        vm.add_memory(0, MIB, guest_memfd=gmem)
        vm.memory.write(0x1000, code)
        vm.set_memory_attributes(0x10000, PAGE, private=True)
        vcpu = real_mode_vcpu(vm, rip=0x1000)
        ex = _run_to(vcpu, Io)
        assert ex.port == 0x10 and ex.data == (0x1111).to_bytes(2, "little")   # the guest reads its private page
        assert vm.memory.read(0x10010, 2) == b"\0\0"        # which the host never sees
        assert vm.memory.read(0x11010, 2) == (0x2222).to_bytes(2, "little")
        with pytest.raises(ValueError, match="page-aligned"):
            vm.set_memory_attributes(0x10001, PAGE, private=False)
