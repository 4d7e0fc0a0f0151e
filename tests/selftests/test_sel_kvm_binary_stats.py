"""Port of tools/testing/selftests/kvm/kvm_binary_stats_test.c: on 4 barebones VMs with 4 vCPUs
each, every binary stats file (KVM_GET_STATS_FD of the VM and of each vCPU, each read through a
dup'ed fd and through a second stats fd, and again after the VM and its vCPUs were closed) has
a header whose id starts with "kvm", valid non-overlapping descriptor and data blocks, and
descriptors whose name, type, unit, base, exponent, size and bucket size are in range; the
whole data block and each stat's data read in full; closing the fd frees it."""
import fcntl
import os
import struct

import pytest

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
HEADER = struct.Struct("<6I")            # flags, name_size, num_desc, id_offset, desc_offset, data_offset
DESC = struct.Struct("<IhHII")           # flags, exponent, size, offset, bucket_size; then name
TYPE_MASK, UNIT_MASK, BASE_MASK = 0xF, 0xF << 4, 0xF << 8
TYPE_MAX, UNIT_MAX, BASE_MAX = 4, 4 << 4, 1 << 8
TYPE_LINEAR_HIST = 3
UNIT_NONE, UNIT_BYTES, UNIT_SECONDS, UNIT_CYCLES, UNIT_BOOLEAN = (u << 4 for u in range(5))
NUM_VM = NUM_VCPU = 4


def stats_test(fd):
    """stats_test(): check one stats file; closes ``fd``."""
    _, name_size, num_desc, _, desc_offset, data_offset = HEADER.unpack(os.pread(fd, HEADER.size, 0))
    size_desc = DESC.size + name_size
    ident = os.pread(fd, name_size, HEADER.size)
    assert len(ident) == name_size, f"Expected header size '{name_size}', read '{len(ident)}' bytes"
    assert ident.startswith(b"kvm") and b"\0" in ident, f"Invalid KVM stats type, id: {ident!r}"
    if num_desc == 0:                    # "No KVM stats defined!"
        os.close(fd)
        return
    assert desc_offset and desc_offset >= HEADER.size and data_offset and \
        data_offset >= HEADER.size, "Invalid offset fields in header"
    assert desc_offset > data_offset or desc_offset + size_desc * num_desc <= data_offset, \
        "Descriptor block is overlapped with data block"
    block = os.pread(fd, size_desc * num_desc, desc_offset)
    assert len(block) == size_desc * num_desc, "Read KVM stats descriptors"
    descs, size_data = [], 0
    for i in range(num_desc):
        raw = block[i * size_desc:(i + 1) * size_desc]
        flags, exponent, size, offset, bucket_size = DESC.unpack_from(raw)
        name = raw[DESC.size:].split(b"\0")[0].decode()
        kind, unit, base = flags & TYPE_MASK, flags & UNIT_MASK, flags & BASE_MASK
        assert len(name) < name_size, f"KVM stats name (index: {i}) too long"
        assert kind <= TYPE_MAX, f"Unknown KVM stats ({name}) type: {kind}"
        assert unit <= UNIT_MAX, f"Unknown KVM stats ({name}) unit: {unit}"
        assert base <= BASE_MAX, f"Unknown KVM stats ({name}) base: {base}"
        if unit in (UNIT_NONE, UNIT_BYTES, UNIT_CYCLES):
            assert exponent >= 0, f"Unsupported KVM stats ({name}) exponent: {exponent}"
        elif unit == UNIT_SECONDS:
            assert exponent <= 0, f"Unsupported KVM stats ({name}) exponent: {exponent}"
        elif unit == UNIT_BOOLEAN:
            assert exponent == 0, f"Unsupported KVM stats ({name}) exponent: {exponent}"
        assert size, f"KVM descriptor({name}) with size of 0"
        if kind == TYPE_LINEAR_HIST:
            assert bucket_size, f"Bucket size of Linear Histogram stats ({name}) is zero"
        else:
            assert not bucket_size, f"Bucket size of stats ({name}) is not zero"
        size_data = max(size_data, offset + size * 8)
        descs.append((name, size, offset))
    assert data_offset >= desc_offset or data_offset + size_data <= desc_offset, \
        "Data block is overlapped with Descriptor block"
    assert size_data >= num_desc * 8, "Data size is not correct"
    assert len(os.pread(fd, size_data, data_offset)) == size_data, "Read KVM stats data"
    for name, size, offset in descs:     # read_stat_data() one by one
        got = len(os.pread(fd, size * 8, data_offset + offset))
        assert got == size * 8, f"pread() on stat '{name}' read {got} bytes, wanted {size * 8} bytes"
    os.close(fd)
    with pytest.raises(OSError):
        fcntl.fcntl(fd, fcntl.F_GETFD)   # "Stats fd not freed"


@pytest.mark.requires_cap("BINARY_STATS_FD")
def test_kvm_binary_stats(kvm):
    vms = [kvm.create_vm() for _ in range(NUM_VM)]        # barebones
    try:
        vcpus = [[vm.create_vcpu(j) for j in range(NUM_VCPU)] for vm in vms]
        for vm, vm_vcpus in zip(vms, vcpus):
            vm_fd = vm.ioctl("KVM_GET_STATS_FD")
            stats_test(os.dup(vm_fd))                      # several references to one file
            stats_test(vm.ioctl("KVM_GET_STATS_FD"))       # several stats files
            vcpu_fds = []
            for v in vm_vcpus:
                vcpu_fds.append(v.ioctl("KVM_GET_STATS_FD"))
                stats_test(os.dup(vcpu_fds[-1]))
                stats_test(v.ioctl("KVM_GET_STATS_FD"))
            vm.close()                                     # the stats fds keep the VM alive
            stats_test(vm_fd)
            for fd in vcpu_fds:
                stats_test(fd)
    finally:
        for vm in vms:
            vm.close()
