"""Shared by the ports of the kernel's KVM selftests (tools/testing/selftests/kvm).

A port checks what its C original checks. On a host where the C original itself fails (run
both with ``python -m pykvm.lab.selftests_c``; see docs/selftests.md), the port fails on the same
assertion: :func:`host_fails` marks it as an expected failure there, strictly, so that the day the
host's KVM behaves as the kernel's test expects, the port reports it (XPASS fails the run).
"""
import os

import pytest

#: the paravirtual kvm_pvm backend is loaded (ring-0 guest code emulated)
ON_PVM = os.path.isdir("/sys/module/kvm_pvm")


def host_fails(why: str):
    """An xfail mark for a port whose C original fails on a kvm_pvm host with the same
    assertion (``why``: the C test's own message); a plain test elsewhere."""
    return pytest.mark.xfail(ON_PVM, reason=f"kvm_pvm: C original fails too: {why}",
                             raises=AssertionError, strict=True)
