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
    # the installed header may be older than pykvm; everything else must have been compared
    assert len(names & set(checked)) >= len(names) - 2


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
