"""pykvm's ABI description equals the installed kernel headers, item by item."""
import shutil

import pytest

from pykvm.abi import ffi, ioctls, proof


@pytest.fixture(scope="module")
def comparison():
    assert shutil.which("cc"), "a C compiler is needed to compile the ABI probe"
    return proof.compare()


def test_every_item_the_header_has_is_identical(comparison):
    checked, mismatches, missing = comparison
    assert not mismatches, "\n".join(f"{n}: pykvm {a:#x} != header {b:#x}" for n, a, b in mismatches)


def test_at_least_150_items_checked(comparison):
    checked, _, _ = comparison
    assert len(checked) >= 150, len(checked)
    kinds = {"sizeof": 0, "offsetof": 0, "KVM_": 0}
    for n in checked:
        for k in kinds:
            if n.startswith(k):
                kinds[k] += 1
    assert all(v >= 20 for v in kinds.values()), kinds


def test_every_ioctl_number_checked(comparison):
    checked, _, missing = comparison
    names = {i.name for i in ioctls.available()}
    assert names <= set(checked) | set(missing)
    # the installed header may be older than pykvm: only rows newer than Linux 6.1's header go
    # unchecked here (tests/unit/test_abi_proof_newer_uapi.py checks them against a newer uAPI)
    newer = {"KVM_SET_USER_MEMORY_REGION2", "KVM_SET_MEMORY_ATTRIBUTES", "KVM_CREATE_GUEST_MEMFD"}
    assert names - set(checked) <= newer, names - set(checked)


def test_a_mismatch_is_detected(monkeypatch):
    """The probe is not a rubber stamp: a deliberately wrong value is reported."""
    real = proof.ours

    def wrong():
        items = real()
        items["KVM_EXIT_HLT"] = 6
        items["sizeof(struct kvm_regs)"] += 8
        return items
    monkeypatch.setattr(proof, "ours", wrong)
    _, mismatches, _ = proof.compare()
    names = {m[0] for m in mismatches}
    assert {"KVM_EXIT_HLT", "sizeof(struct kvm_regs)"} <= names


def test_ioctl_numbers_use_our_struct_sizes():
    i = ioctls.BY_NAME["KVM_GET_ONE_REG"]
    assert (i.request >> 16) & 0x3FFF == ffi.sizeof("struct kvm_one_reg") == 16


def test_the_compiled_abi_is_current():
    """pykvm._native was built from today's declarations: its ffi is the one pykvm uses (no C is
    parsed at import). A stale build (ABI files edited since `pip install -e .`) fails here."""
    from pykvm import _native, abi
    assert abi.COMPILED, "pykvm._native was built from other ABI declarations: " \
                         "run `pip install -e .` again"
    assert abi.ffi is _native.ffi


def test_compiled_layouts_equal_the_declarations():
    """Every size and offset the C compiler gave the compiled ABI is what cffi computes from the
    declaration text itself (both are then checked against the kernel headers above)."""
    from pykvm import abi
    parsed = proof.layouts(abi.build_ffi(abi.arch))
    compiled = proof.layouts(abi.ffi)
    assert parsed == compiled
    assert len(compiled) >= 300, len(compiled)


def test_the_abi_declares_no_pykvm_struct_as_kvm():
    names = proof._struct_names()
    assert names and not any(n.startswith("pykvm_") for n in names)
    assert "kvm_run" in names


def test_request_numbers_match_ioctl_opt():
    """Our _IOC formula is ioctl-opt's (and the kernel's asm-generic one)."""
    ioctl_opt = pytest.importorskip("ioctl_opt")
    dirs = {ioctls.NONE: ioctl_opt.IOC_NONE, ioctls.W: ioctl_opt.IOC_WRITE,
            ioctls.R: ioctl_opt.IOC_READ, ioctls.WR: ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE}
    for i in ioctls.available():
        size = ffi.sizeof(i.arg) if i.arg else 0
        assert i == ioctl_opt.IOC(dirs[i.direction], 0xAE, i.nr, size), i.name


def test_a_table_row_is_its_request_number():
    i = ioctls.KVM_GET_ONE_REG
    assert isinstance(i, int) and i == i.request and i is ioctls.BY_NAME["KVM_GET_ONE_REG"]
    assert i.name == "KVM_GET_ONE_REG" and i.cap == "ONE_REG" and i.fd == "vcpu"
    with pytest.raises(AttributeError):
        i.cap = "X"
    other = [r for r in ioctls.TABLE if not r.available]
    for r in other:
        with pytest.raises(ValueError, match="does not exist on"):
            _ = r.request
