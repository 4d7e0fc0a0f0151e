"""The GDB stub's x86 paths that need VMX/SVM hardware, on the nested lab's real (nested) SVM:
Debian bookworm's gdb 13.1 in batch mode against ``pykvm run --gdb`` with the gdb_target guest
(guests/x86/gdb_target.c), L1's kvm_amd running it on QEMU TCG's emulated SVM (docs/gdb.md,
"What the nested lab proves").

On the kvm_pvm development host none of these can run: a planted ``int3`` is an emulation
failure there, data breakpoints never fire (``watch`` is emulated by single-stepping) and the
guest's own ``int3`` never reaches the stub. Here each test asserts which path ran (and records
it as a JUnit property), from what
``pykvm run --trace`` prints for every exit the stub sees (``<Debug exception=0x3, pc=...>`` is
KVM_EXIT_DEBUG with #BP; ``exception=0x1`` with DR6's B0-B3 is a debug-register hit, with DR6.BS
a single step) and from ``--json``'s exit counts, as well as from gdb's output and the guest's
own report. Measured under the lab's QEMU 7.2 TCG SVM: single step works, but KVM never gets
the #BP of an ``int3`` and DR0-DR3 never fire (docs/gdb.md), so the int3 and DR tests assert
those outcomes there and the hardware ones where they happen. Every gdb and pykvm process runs
under a timeout."""
import json
import re
import subprocess
import sys

import pytest

from pykvm import Kvm
from pykvm.gdbstub.x86 import data_breakpoints_fire, instruction_breakpoints_fire
from pykvm.testing.gdb import GDB, PykvmGdb, ensure_loopback, gdb_args, guest_elf

# the lab's JUnit is xunit2; the properties still reach the lab's own nested.xml
pytestmark = pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning")

TIMEOUT = 90                   # seconds for one gdb or pykvm process under TCG
_DEBUG = re.compile(r"<Debug exception=(0x[0-9a-f]+), pc=(0x[0-9a-f]+), dr6=(0x[0-9a-f]+)")
_DR6_B03 = 0xF                 # DR6 B0-B3: which debug register hit (Intel SDM vol. 3, 18.2.3)
_DR6_BS = 1 << 14              # DR6.BS: a single step


@pytest.fixture
def gdb(nested):
    """gdb's path (the nested lab's image carries bookworm's gdb: pykvm/lab/build.py NESTED);
    ``nested`` skips where this host's KVM has no (nested) SVM."""
    assert GDB, "the nested lab carries bookworm's gdb (pykvm/lab/build.py NESTED.user_packages)"
    ensure_loopback()
    return GDB


def _debug_exits(stderr):
    """(exception, pc, dr6) of each KVM_EXIT_DEBUG ``--trace`` printed, in order."""
    return [tuple(int(v, 16) for v in m.groups()) for m in _DEBUG.finditer(stderr)]


def _session(*cmds, params=None, wait=True):
    """``pykvm run --gdb ... --trace --json gdb_target.elf [--param P]`` with gdb running
    ``cmds``: (gdb's output, exit status, the --json object, stderr). A gdb that does not end
    within :data:`TIMEOUT` fails the test with what gdb and pykvm (its trace) printed."""
    elf = guest_elf("gdb_target")
    extra = ["--trace", "--json"] + (["--param", params] if params else [])
    with PykvmGdb(elf, *extra, wait=wait, timeout=TIMEOUT) as vm:
        g = subprocess.Popen(gdb_args(vm.port, elf, cmds), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        try:
            out, _ = g.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            g.kill()
            out, _ = g.communicate()
            vm.kill()
            pytest.fail(f"gdb did not end within {TIMEOUT} s:\n{out}\n--- pykvm's stderr:\n"
                        f"{vm.err_head.decode(errors='replace')[-8000:]}")
        try:
            code, stdout, stderr = vm.finish()
        except subprocess.TimeoutExpired:
            vm.p.kill()
            _code, _stdout, stderr = vm.finish()
            pytest.fail(f"pykvm did not end within {TIMEOUT} s of gdb's end; gdb:\n{out}\n"
                        f"--- pykvm's stderr:\n{stderr[-8000:]}")
    try:
        res = json.loads(stdout)
    except ValueError:
        pytest.fail(f"pykvm printed no JSON (status {code}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return out, code, res, stderr


def _address(out, what):
    """The address gdb gave breakpoint/watchpoint ``what`` ("Breakpoint 1 at 0x...")."""
    m = re.search(what + r" at (0x[0-9a-f]+)", out)
    assert m, out
    return int(m.group(1), 16)


def test_gdb_13_runs_in_the_nested_lab(gdb):
    r = subprocess.run([gdb, "--version"], capture_output=True, text=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "GNU gdb (Debian 13.1" in r.stdout, (r.stdout, r.stderr)


def test_planted_int3_reaches_kvm_or_the_guest(gdb, record_property):
    """``break`` plants int3 and sets KVM_GUESTDBG_USE_SW_BP. On VMX/SVM hardware the #BP is
    intercepted: KVM_EXIT_DEBUG (exception 3) at the int3, a breakpoint stop, then ``stepi`` is
    one KVM_GUESTDBG_SINGLESTEP (#DB with DR6.BS). Measured in the nested lab (QEMU 7.2 TCG,
    emulated SVM): the #BP is NOT intercepted there (KVM never exits for it; the guest's own
    IDT takes it and reports #BP at the RIP after the int3, status 4), so this asserts that
    outcome there and records which path ran (``int3_intercepted``)."""
    out, code, res, stderr = _session("break gdb_tick", "continue", "print gdb_counter",
                                      "info registers rip", "stepi", "info registers rip",
                                      "continue", "print gdb_counter", "delete", "continue")
    bp = _address(out, "Breakpoint 1")
    exits = _debug_exits(stderr)
    intercepted = bool([e for e in exits if e[0] == 3])
    record_property("int3_intercepted", intercepted)
    print(f"planted int3 intercepted by KVM: {intercepted}")
    assert "INTERNAL_ERROR" not in res["exits"] and "InternalError" not in stderr, stderr
    assert res["exits"].get("DEBUG", 0) == len(exits), (res, stderr)
    if not intercepted:                               # QEMU 7.2's SVM: the guest gets the #BP
        assert "exited with code 04" in out, out
        assert code == 4 and "#BP (vector 3)" in res["detail"], (res, stderr[-4000:])
        assert f"RIP {bp + 1:#x}" in res["detail"], res
        return
    assert re.search(r"Breakpoint 1, gdb_tick \(\) at x86/gdb_target.c:\d+", out), out
    assert "$1 = 0" in out and "$2 = 1" in out, out          # the first, then the second call
    rips = [int(ln.split()[1], 16) for ln in out.splitlines() if ln.startswith("rip ")]
    assert len(rips) == 2 and rips[0] == bp and rips[1] != bp, out
    assert "[Inferior 1 (Remote target) exited normally]" in out, out
    assert code == 0 and "counter: 15" in res["console"], (res, stderr)
    assert all(e[1] == bp for e in exits if e[0] == 3), stderr   # #BP at the planted int3
    assert [e for e in exits if e[0] == 1 and e[2] & _DR6_BS], stderr   # the stepi


def test_hbreak_follows_the_instruction_breakpoint_probe(gdb, record_property):
    """``hbreak`` puts the address in DR0 through KVM_SET_GUEST_DEBUG (KVM_GUESTDBG_USE_HW_BP).
    Where instruction breakpoints fire (:func:`pykvm.gdbstub.x86.instruction_breakpoints_fire`;
    VMX/SVM hardware, kvm_pvm) each hit is KVM_EXIT_DEBUG #DB at the address with DR6.B0.
    Measured in the nested lab (QEMU 7.2 TCG, emulated SVM): they do NOT fire there (QEMU
    before 9.1 loads the VMCB's DR7 at VMRUN without arming its breakpoints), so the stub
    refuses the ``Z1`` (gdb cannot insert the hardware breakpoint; a breakpoint that never
    stops would mislead), the guest runs to its end after ``delete`` and KVM reports no DR hit:
    asserted as such."""
    with Kvm() as k:
        fires = instruction_breakpoints_fire(k)
    record_property("instruction_breakpoints_fire", fires)
    print(f"instruction_breakpoints_fire() = {fires}")
    out, code, res, stderr = _session("hbreak gdb_tick", "continue", "continue",
                                      "print gdb_counter", "delete", "continue")
    bp = _address(out, "Hardware assisted breakpoint 1")
    assert code == 0 and "counter: 15" in res["console"], (res, stderr[-4000:])
    assert "exited normally" in out, out
    hits = [e for e in _debug_exits(stderr) if e[0] == 1 and e[1] == bp and e[2] & 1]
    if fires:
        assert out.count("Breakpoint 1, gdb_tick ()") == 2 and "$1 = 1" in out, out
        assert len(hits) == 2, stderr[-4000:]
    else:
        assert "Couldn't write debug register" in out or "insert hardware breakpoint" in out, out
        assert "Breakpoint 1, gdb_tick ()" not in out and not hits, (out, stderr[-4000:])
    assert "INTERNAL_ERROR" not in res["exits"], res


def test_watch_follows_the_data_breakpoint_probe(gdb, record_property):
    """``watch gdb_counter`` from gdb_spin, served the way the stub's probe
    (:func:`pykvm.gdbstub.x86.data_breakpoints_fire`: a real-mode VM writing a byte DR0
    watches) decides, and the stub's log line says which: where data breakpoints fire, both
    changes (0 -> 1, 1 -> 3) stop as DR hits (#DB with a B0-B3 bit) and the guest is never
    single-stepped; where they do not, every instruction from there on is a
    KVM_GUESTDBG_SINGLESTEP (#DB with DR6.BS) on SVM. Measured in the nested lab (QEMU 7.2 TCG,
    emulated SVM): the probe finds they do NOT fire there (QEMU before 9.1 loads the VMCB's DR7
    at VMRUN without arming its breakpoints; docs/gdb.md), so the emulated path runs on SVM."""
    with Kvm() as k:
        hardware = data_breakpoints_fire(k)
    record_property("data_breakpoints_fire", hardware)
    print(f"data_breakpoints_fire() = {hardware}")
    # the guest spins in gdb_spin (--param 1) when gdb attaches (no --gdb-wait): stepping from
    # _start (its BSS clearing) would take minutes under TCG
    out, code, res, stderr = _session("print gdb_spins > 0", "set var gdb_hold = 0",
                                      "watch gdb_counter", "continue", "continue",
                                      "print gdb_counter", "delete", "continue",
                                      params="1", wait=False)
    assert "$1 = 1" in out, out                       # attached while the guest spun
    assert "Hardware watchpoint 1: gdb_counter" in out, out
    assert "Old value = 0\nNew value = 1" in out, out
    assert "Old value = 1\nNew value = 3" in out and "$2 = 3" in out, out
    assert "exited normally" in out, out
    assert code == 0 and "counter: 15" in res["console"], (res, stderr[-4000:])
    exits = _debug_exits(stderr)
    steps = [e for e in exits if e[0] == 1 and e[2] & _DR6_BS]
    assert res["exits"]["DEBUG"] == len(exits), res
    if hardware:
        assert "pykvm: gdb watchpoints: in the target's debug registers" in stderr, stderr
        assert len([e for e in exits if e[0] == 1 and e[2] & _DR6_B03]) >= 2, stderr
        assert not steps, stderr[-4000:]                             # no single step at all
    else:
        assert "pykvm: gdb watchpoints: emulated by single-stepping" in stderr, stderr[-4000:]
        assert len(steps) > 2, stderr[-4000:]          # gdb_spin to the write, step by step


def _without_gdb():
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "--no-input", "--json",
                        guest_elf("gdb_target"), "--param", "0,1"], capture_output=True,
                       text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    return r.returncode, json.loads(r.stdout)


def test_the_guests_own_int3_ends_its_run_as_without_gdb(gdb, record_property):
    """gdb_target's own int3 (``--param 0,1``) with gdb attached and a breakpoint planted
    elsewhere ends the run as it does without gdb: same status, the same report of #BP
    (vector 3) at the RIP after the int3. On VMX/SVM hardware it reaches the stub once as
    KVM_EXIT_DEBUG #BP at an address it did not plant and is queued back into the guest
    (``give_to_guest``, KVM_SET_VCPU_EVENTS). Measured in the nested lab (QEMU 7.2 TCG,
    emulated SVM): it never reaches KVM there (the #BP intercept is not taken), so the guest's
    IDT gets it directly; which path ran is recorded (``own_int3_given_back``)."""
    want_code, want = _without_gdb()
    assert want_code != 0 and "(vector 3)" in want["detail"], want
    out, code, res, stderr = _session("break gdb_tick", "continue", params="0,1")
    bp = _address(out, "Breakpoint 1")
    assert code == want_code and res["detail"] == want["detail"], (res, want, stderr)
    assert f"exited with code {want_code:02o}" in out or f"exited with code {want_code:02}" \
        in out, out
    assert "SIGTRAP" not in out and "Breakpoint 1, gdb_tick" not in out, out
    own = [e for e in _debug_exits(stderr) if e[0] == 3 and e[1] != bp]
    record_property("own_int3_given_back", bool(own))
    print(f"the guest's own int3 reached the stub: {bool(own)}")
    assert len(own) <= 1, stderr                                   # at most once
    rip = re.search(r"at RIP (0x[0-9a-f]+)", res["detail"])
    assert rip, res
    if own:
        assert int(rip.group(1), 16) == own[0][1] + 1, (res, stderr)   # a trap: after the int3
