"""pykvm's ABI description against a newer kernel's uAPI than the installed headers.

The installed <linux/kvm.h> (Debian 12: Linux 6.1) predates guest_memfd, memory attributes and
KVM_SET_USER_MEMORY_REGION2, so tests/unit/test_abi_proof.py cannot check those rows. Debian
ships every kernel's uAPI headers in ``linux-libc-dev``: this test takes the newest one of the
suite below from the Debian archive (the labs' mirror and cache, the .deb checked against the
index's SHA256), unpacks its headers and compares every item pykvm declares with them."""
import os
import shutil

import pytest

from pykvm.abi import ioctls, proof
from pykvm.lab.debian import Archive, LabError, extract_deb

SUITE = "trixie"                       # linux-libc-dev 6.12: has everything pykvm declares
NEWER_ROWS = {"KVM_SET_USER_MEMORY_REGION2", "KVM_SET_MEMORY_ATTRIBUTES",
              "KVM_CREATE_GUEST_MEMFD", "KVM_RESET_DIRTY_RINGS"}


@pytest.fixture(scope="module")
def newer_uapi(tmp_path_factory):
    assert shutil.which("cc"), "a C compiler is needed to compile the ABI probe"
    arch = {"x86_64": "amd64", "riscv64": "riscv64", "aarch64": "arm64"}[os.uname().machine]
    try:
        a = Archive(os.path.expanduser(os.environ.get("PYKVM_LAB_CACHE", "~/.cache/pykvm/lab")))
        p = a.index(SUITE, arch).get("linux-libc-dev")
        deb = a.fetch(p, "uAPI headers for the ABI proof")
    except LabError as e:
        pytest.skip(f"pykvm: host lacks the Debian archive and a cached linux-libc-dev ({e})")
    root = tmp_path_factory.mktemp("uapi")
    # usr/include/<triplet>/asm/*.h are links into usr/lib/linux/uapi/<arch>/asm
    extract_deb(deb, root, lambda m: m.startswith(("usr/include/", "usr/lib/linux/uapi/")))
    inc = root / "usr" / "include"
    multiarch = inc / f"{os.uname().machine}-linux-gnu"
    assert (multiarch / "asm" / "kvm.h").exists(), f"linux-libc-dev {p.version}: no asm/kvm.h"
    return p.version, proof.compare(include=[str(multiarch), str(inc)])


def test_every_item_equals_a_newer_kernel_uapi(newer_uapi):
    version, (checked, mismatches, missing) = newer_uapi
    assert not mismatches, f"linux-libc-dev {version}: " + "\n".join(
        f"{n}: pykvm {a:#x} != header {b:#x}" for n, a, b in mismatches)
    assert NEWER_ROWS <= set(checked) and NEWER_ROWS <= {i.name for i in ioctls.available()}
    for item in ("sizeof(struct kvm_create_guest_memfd)", "sizeof(struct kvm_memory_attributes)",
                 "sizeof(struct kvm_dirty_gfn)", "offsetof(struct kvm_dirty_gfn, offset)",
                 "sizeof(struct kvm_userspace_memory_region2)", "KVM_DIRTY_LOG_PAGE_OFFSET",
                 "KVM_DIRTY_GFN_F_RESET", "KVM_MEMORY_ATTRIBUTE_PRIVATE",
                 "KVM_X86_SW_PROTECTED_VM", "KVM_EXIT_DIRTY_RING_FULL"):
        assert item in checked, item
    assert not {i.name for i in ioctls.available()} - set(checked), missing
