"""Shared by the ports of the kernel's KVM selftests (tools/testing/selftests/kvm).

A port checks what its C original checks. On a host where the C original itself fails (run
both with ``python -m pykvm.lab.selftests_c``; see docs/selftests.md), the port fails on the same
assertion: :func:`host_fails` marks it as an expected failure there. Not strictly: the C verdicts
were measured on one kvm_pvm host (docs/selftests.md names it), and a host of the same kind with
the other CPU vendor may pass where this one fails; the day a port passes, the run's summary
lists it as XPASS (``-ra``), which is the sign to rerun the C original and update the table.
"""
import os

import pytest

#: the paravirtual kvm_pvm backend is loaded (ring-0 guest code emulated)
ON_PVM = os.path.isdir("/sys/module/kvm_pvm")


def host_fails(why: str):
    """An xfail mark for a port whose C original fails on a kvm_pvm host with the same
    assertion (``why``: the C test's own message); a plain test elsewhere."""
    return pytest.mark.xfail(ON_PVM, reason=f"kvm_pvm: C original fails too: {why}",
                             raises=AssertionError, strict=False)
