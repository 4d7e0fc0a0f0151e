"""Snapshots with nested state (docs/snapshots.md), inside the nested lab, where
KVM_CAP_NESTED_STATE > 0: an L1 guest stopped while its L2 runs is snapshotted, restored in
another process, and L2 goes on to its next instruction as if nothing had happened."""
import subprocess
import sys

from pykvm import snapshot as snapmod
from pykvm.arch.x86 import svm
from pykvm.arch.x86.nested import NestedState

from test_nested import PASS_PORT, STEP, expect_io

_B = """
import sys
from pykvm.machine import Machine
m = Machine.restore(sys.argv[1])
code, marker, r12 = m.sync(stage=2, timeout=float(sys.argv[2]))
m.done(timeout=float(sys.argv[2]))
print(code, marker, r12, int(m.vcpus[0].nested_state().guest_mode))
m.close()
"""


def test_l1_with_l2_running_restores_in_another_process(svm_vm, tmp_path):
    m = svm_vm("svm_state")
    m.set_params(PASS_PORT)
    vmcb_pa, _ = m.sync(stage=1, timeout=STEP)
    _, guest_mode = expect_io(m, PASS_PORT, 1)      # L2 stopped at its port write
    assert guest_mode
    path = str(tmp_path / "nested.snap")
    m.snapshot(path)                               # the pending OUT is completed first
    m.close()
    state = snapmod.Plan(path).vcpus[0]
    assert "nested" in state and "nested" not in state.absent
    st = NestedState.from_bytes(state["nested"])
    assert st.format_name == "SVM" and st.guest_mode and st.svm_vmcb_pa == vmcb_pa
    p = subprocess.run([sys.executable, "-c", _B, path, str(STEP)], capture_output=True,
                       text=True, timeout=4 * STEP)
    assert p.returncode == 0, p.stderr[-3000:]
    code, marker, r12, still_l2 = (int(x) for x in p.stdout.split())
    assert code == svm.EXIT_VMMCALL                # L2 went on to its VMMCALL
    assert (marker, r12) == (0xFEED0001, 0xABCDEF)
    assert not still_l2                            # and L1 took the exit and finished
