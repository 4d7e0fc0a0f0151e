"""The gdb stub and vCPUs whose guest reported done (docs/gdb.md, Machine.finished_vcpus), on
real KVM, second round.

A vCPU whose guest reported DONE is never resumed (pykvm's runtime parks it with interrupts
off). gdb still lists it as a thread and may select it and step it: ``stepi`` sends
``vCont;s:N;c``. That step could never end, and the stub had let the other vCPUs run on to the
guest's end: gdb's ``stepi`` on such a thread answered "exited normally" (the whole guest run
away under a single step). The step is now refused (``E16``: gdb says "Remote failure reply"
and the thread stays stopped where it is), nothing runs, and ``qThreadExtraInfo`` says the
vCPU is done.

Resuming packets (``c``, ``s``, ``vCont``, and ``D``, which resumes) load guest-debug state
into every vCPU (KVM_SET_GUEST_DEBUG). While another thread of the process snapshotted,
checkpointed or reset the machine (which completes pending exits with KVM_RUN), such a packet
had been answered ``E10`` (the vCPU "running in another thread"): gdb's ``continue`` failed at
random. They are now served inside ``Machine.holding()`` as the state packets are."""
import subprocess
import sys
import threading

import pytest

from pykvm.gdbstub import packets as pk
from pykvm.gdbstub.server import serve
from pykvm.machine import Machine
from rsp_client import Raw
from pykvm.testing import wait_until
from pykvm.testing.gdb import GDB, TIMEOUT
from pykvm import guests

pytestmark = pytest.mark.requires_kvm


def _one_vcpu_done(m):
    """Step vCPU 1 of the 2-vCPU snap_counter guest to its DONE report (vCPU 0 never ran)."""
    assert m.step(1, timeout=TIMEOUT).name == "done"
    assert m.finished_vcpus == {1}


def test_a_step_of_a_finished_vcpu_is_refused_and_nothing_runs(leftovers):
    snap = leftovers()
    with Machine("snap_counter", vcpus=2) as m:
        _one_vcpu_done(m)
        printed = m.console
        with serve(m, "tcp:127.0.0.1:0", wait=True) as server:
            result = []
            t = threading.Thread(target=lambda: result.append(server.run(timeout=TIMEOUT)))
            t.start()
            c = Raw(server.port)
            try:
                c.ask(b"qSupported")
                wait_until(lambda: m.held_for("gdb"), "the run to be held for gdb",
                           timeout=TIMEOUT)
                assert c.ask(b"Hg1") == b"OK"
                pc0 = c.ask(b"p10")
                assert c.ask(b"Hg2") == b"OK"
                pc1 = c.ask(b"p10")
                # gdb's stepi of thread 2 (scheduler-locking off), then of thread 2 alone,
                # then 's' with thread 2 selected for resuming
                assert c.ask(b"vCont;s:2;c") == b"E16"
                assert c.ask(b"vCont;s:2") == b"E16"
                assert c.ask(b"Hc2") == b"OK"
                assert c.ask(b"s") == b"E16"
                # nothing ran: both vCPUs where they were, still held, no new output
                assert m.held_for("gdb") and m.console == printed
                assert c.ask(b"p10") == pc1
                assert c.ask(b"Hg1") == b"OK" and c.ask(b"p10") == pc0
                assert c.ask(b"qThreadExtraInfo,2") == pk.hex_encode(b"vCPU 1 (done)")
                assert c.ask(b"qThreadExtraInfo,1") == pk.hex_encode(b"vCPU 0")
                # a step of the live vCPU still steps it, and the guest then runs to the end
                assert c.ask(b"vCont;s:1") == b"T05thread:1;"
                assert c.ask(b"p10") != pc0
                assert c.ask(b"vCont;c") == b"W00"
            finally:
                c.close()
                t.join(TIMEOUT)
        assert result and result[0].exit == "done", result
        assert m.finished_vcpus == {0, 1}
    snap.check()


@pytest.mark.skipif(GDB is None, reason="gdb is not installed on this host")
def test_gdb_stepi_and_next_on_a_restored_finished_vcpu_stop_there(tmp_path):
    """Debian's gdb against ``pykvm restore --gdb --gdb-wait`` of a snapshot with vCPU 1
    done: ``stepi`` and ``next`` on thread 2 end at once (a warning, the thread stopped at
    the same pc) instead of running the guest to its end or spinning; a ``continue`` then
    runs vCPU 0 to its end."""
    path = str(tmp_path / "one-done.snap")
    with Machine("snap_counter", vcpus=2) as m:
        _one_vcpu_done(m)
        m.snapshot(path)
    p = subprocess.Popen([sys.executable, "-m", "pykvm", "restore", path, "--gdb", "tcp::0",
                          "--gdb-wait", "--timeout", str(TIMEOUT)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
        assert "gdb server listening on tcp:127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1])
        elf = guests.path("snap_counter")
        g = subprocess.run([GDB, "-batch", "-nx", elf, "-ex", f"target remote :{port}",
                            "-ex", "thread 2", "-ex", "info registers rip", "-ex", "stepi",
                            "-ex", "info registers rip", "-ex", "next",
                            "-ex", "info registers rip", "-ex", "continue"],
                           capture_output=True, text=True, timeout=TIMEOUT)
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = g.stdout + g.stderr
    rips = [ln.split()[1] for ln in text.splitlines() if ln.startswith("rip ")]
    assert len(rips) == 3 and len(set(rips)) == 1, text
    assert text.count("Remote failure reply: E16") == 2, text
    assert "exited normally" in text, text
    assert p.returncode == 0, err
    assert [ln for ln in out.splitlines() if ln.startswith("snap cpu")][-1] == "snap cpu0 done"
    assert "snap cpu1" not in out


def test_continue_and_detach_while_another_thread_snapshots_and_resets(tmp_path, leftovers):
    """A raw client continues, interrupts (0x03) and reads the registers, over and over,
    while another thread of the same process snapshots, checkpoints and resets the machine:
    every continue is accepted (the ack alone, no E10), every interrupt stops the guest, and
    a detach during it lets the guest run to its end."""
    snap = leftovers()
    path = str(tmp_path / "hammer.snap")
    with Machine("snap_counter", vcpus=2) as m:
        m.set_params(0, 3000, 2)            # slow rounds: the guest runs through the loop
        with serve(m, "tcp:127.0.0.1:0", wait=True) as server:
            result = []
            t = threading.Thread(target=lambda: result.append(server.run(timeout=600)))
            t.start()
            c = Raw(server.port)
            stop = threading.Event()
            errors = []

            def hammer():
                ops = (lambda: m.snapshot(path), m.checkpoint, m.reset)
                i = 0
                while not stop.is_set():
                    try:
                        ops[i % 3]()
                    except Exception as e:  # noqa: BLE001 — recorded, asserted below
                        errors.append(repr(e))
                    i += 1

            h = threading.Thread(target=hammer)
            try:
                c.ask(b"qSupported")
                c.ask(b"?")
                h.start()
                for k in range(120):
                    c.s.sendall(pk.frame(b"vCont;c"))
                    c.ack()
                    # a resume is answered by the ack alone (its stop reply comes later);
                    # it had been "$E10" now and then, the guest left stopped
                    assert c.ask(b"g") == b"E10", k           # running: busy
                    c.s.sendall(b"\x03")
                    reply = c.reply()
                    assert reply.startswith(b"T02thread:"), (k, reply)
                    assert not c.ask(b"g").startswith(b"E"), k
                c.s.sendall(pk.frame(b"vCont;c"))
                c.ack()
                c.s.sendall(pk.frame(b"D"))               # detach while the hammer goes on
                c.ack()
                assert c.reply() == b"OK"
            finally:
                stop.set()
                if h.ident:
                    h.join(TIMEOUT)
                c.close()
                t.join(TIMEOUT)
            assert errors == []
        assert result and result[0].exit == "done", result
    snap.check()
