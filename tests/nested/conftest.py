"""Fixtures of the nested-SVM tests (test_nested.py, test_svm_tlb.py): they run inside the nested
lab, where the lab kernel's KVM offers nested SVM; elsewhere they skip with the plugin's
"pykvm: host lacks" reason."""
import pytest

from pykvm import Kvm
from pykvm.arch.x86 import svm
from pykvm.arch.x86.nested import enable_svm_cpuid
from pykvm.testing.plugin import LACKS, kvm_usable

MEM = 8 << 20                   # bytes of L1 RAM: L1, its L2 code, page tables and VMCBs


@pytest.fixture(scope="module")
def nested():
    """The nested verdict of this host's KVM (``Kvm.info()["nested"]``) plus ``svm_features``
    (CPUID 0x8000000A's feature names); skips where there is no nested SVM."""
    if not kvm_usable():
        pytest.skip(f"{LACKS} a usable /dev/kvm")
    with Kvm() as k:
        info = k.info()["nested"]
        features = svm.svm_features(k.supported_cpuid())
    if not info["available"]:
        pytest.skip(f"{LACKS} nested virtualization: {info['reason']}")
    if info["backend"] != "svm":
        pytest.skip(f"{LACKS} nested SVM (nested backend is {info['backend']})")
    return dict(info, svm_features=features)


@pytest.fixture
def svm_vm(nested, kvm, guest_vm):
    """``svm_vm(guest, **machine_options)``: a Machine running an L1 guest with SVM in its CPUID
    (``mem_size`` :data:`MEM` unless given)."""
    def factory(guest, **kw):
        kw.setdefault("mem_size", MEM)
        kw.setdefault("cpuid", enable_svm_cpuid(kvm.supported_cpuid()))
        return guest_vm(guest, **kw)
    return factory
