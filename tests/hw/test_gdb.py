"""The GDB stub against real KVM and the real gdb (Debian's, batch mode): ``pykvm run --gdb``
with the gdb_target guest (guests/x86/gdb_target.c), gdb breaking at a function by name,
stepping, reading a global and a register, writing memory, hardware breakpoints, a watchpoint,
Ctrl-C, a 32-bit guest, detaching; a raw-socket client that sends garbage; the API form.

Every gdb and pykvm process runs under a subprocess timeout, so a hang fails the test. What is
asserted is gdb's output and the guest's own report of what it saw (the values gdb wrote), and
the run's exit status."""
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from pykvm import Kvm
from pykvm.gdbstub import packets as pk
from pykvm.gdbstub.server import serve
from pykvm.gdbstub.x86 import data_breakpoints_fire
from pykvm.machine import Machine
from rsp_client import Raw
from pykvm.testing import wait_until
from pykvm.testing.gdb import (GDB, TIMEOUT, PykvmGdb, gdb_args as _gdb_args,
                               guest_elf as _elf, run_gdb, source_line as _line_of)

pytestmark = pytest.mark.skipif(GDB is None, reason="gdb is not installed (Debian: apt install gdb)")


def test_gdb_breaks_steps_reads_writes_and_continues():
    elf = _elf("gdb_target")
    with PykvmGdb(elf) as vm:
        out = run_gdb(vm.port, elf,
                      "break gdb_tick", "continue",
                      "print gdb_counter", "info registers rip",
                      "stepi", "info registers rip",
                      "step",
                      "print/x $rsp",
                      "set var $r11 = 0x1234abcd",      # caller-saved: the guest does not care
                      "print/x $r11",
                      "set var gdb_value = 42",
                      'set {char[8]}&gdb_buffer = "by gdb!"',
                      "x/s &gdb_buffer",
                      "delete", "continue")
        code, stdout, stderr = vm.finish()
    body = _line_of("gdb_counter += n;")
    assert f"Breakpoint 1, gdb_tick () at x86/gdb_target.c:{body}" in out, out
    assert "$1 = 0" in out, out                         # the first call, before it adds
    rips = [ln.split()[1] for ln in out.splitlines() if ln.startswith("rip ")]
    assert len(rips) == 2 and rips[0] != rips[1], out   # stepi moved RIP
    assert "<gdb_tick>" in out and "<gdb_tick+" in out, out
    assert f"\n{body + 1}\t" in out, out                # step reached the next line
    assert '"by gdb!"' in out, out                      # read back through gdb
    assert "= 0x1234abcd" in out, out                   # a register written (P) and read
    assert "[Inferior 1 (Remote target) exited normally]" in out, out
    assert code == 0, stderr
    assert "value: 42" in stdout and "buffer: by gdb!" in stdout, stdout
    assert "counter: 15" in stdout, stdout


def test_hardware_breakpoint_and_watchpoint():
    elf = _elf("gdb_target")
    with PykvmGdb(elf) as vm:
        out = run_gdb(vm.port, elf,
                      "hbreak gdb_tick", "continue", "continue", "print gdb_counter",
                      "delete", "watch gdb_counter", "continue", "print gdb_counter",
                      "delete", "continue")
        code, stdout, stderr = vm.finish()
    assert "Hardware assisted breakpoint 1 at" in out, out
    assert out.count("Breakpoint 1, gdb_tick ()") == 2, out
    assert "$1 = 1" in out, out                         # hit again on the second call
    assert "atchpoint 2: gdb_counter" in out, out
    assert "Old value = 1\nNew value = 3" in out, out   # the second call's write
    assert "$2 = 3" in out, out
    assert "exited normally" in out, out
    assert code == 0 and "counter: 15" in stdout, (stdout, stderr)
    with Kvm() as k:                                     # the stub says which watch it used
        hardware = data_breakpoints_fire(k)
    assert ("pykvm: gdb watchpoints: in the target's debug registers" if hardware else
            "pykvm: gdb watchpoints: emulated by single-stepping") in stderr, stderr


def test_ctrl_c_interrupts_a_spinning_guest():
    """gdb's Ctrl-C (SIGINT to gdb while it waits in ``continue``) sends 0x03; the stub stops
    every vCPU and reports SIGINT; gdb then releases the guest's spin loop."""
    elf = _elf("gdb_target")
    with PykvmGdb(elf, "--param", "1") as vm, _ResumeWatch(vm.port) as watch:
        g = subprocess.Popen(_gdb_args(watch.port, elf, [
            "continue", "info threads", "print gdb_spins > 0", "set var gdb_hold = 0",
            "continue"]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL)
        try:
            # interrupt once gdb waits in its continue and the guest has spun
            _wait_for_spins(vm, watch)
            g.send_signal(signal.SIGINT)
            out, _ = g.communicate(timeout=TIMEOUT)
        finally:
            if g.poll() is None:
                g.kill()
                g.communicate()
        code, stdout, stderr = vm.finish()
    assert "Program received signal SIGINT, Interrupt." in out, out
    assert "gdb_spin () at x86/gdb_target.c" in out, out
    assert "Thread 1 (vCPU 0)" in out, out
    assert "$1 = 1" in out, out
    assert "exited normally" in out, out
    assert code == 0 and "counter: 15" in stdout, (stdout, stderr)


# gdb's packets that resume the target: c, C<sig>, vCont;c and vCont;C (GDB RSP, "Packets")
_RESUME = re.compile(rb"\$(?:[cC]|vCont;[cC])[#:;0-9a-fA-F]")


class _ResumeWatch:
    """A TCP relay between gdb and the stub at ``port`` on localhost that notes when gdb sends
    a resume packet (:attr:`resumed`): from then on gdb waits in ``continue``, where a SIGINT
    becomes the interrupt byte. (A SIGINT before that stops gdb's own command instead, and
    the batch then waits for ever on the held guest: a fixed sleep guessed when that was.)"""

    def __init__(self, port):
        self.stub_port = port
        self.resumed = threading.Event()
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1)
        self.port = self.lsock.getsockname()[1]
        self.socks = [self.lsock]
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self):
        try:
            self.lsock.settimeout(TIMEOUT)
            client, _ = self.lsock.accept()
            stub = socket.create_connection(("127.0.0.1", self.stub_port), timeout=TIMEOUT)
        except OSError:
            return
        for sk in (client, stub):
            sk.settimeout(None)
            sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socks += [client, stub]
        back = threading.Thread(target=self._pump, args=(stub, client, False), daemon=True)
        self.threads.append(back)
        back.start()
        self._pump(client, stub, True)

    def _pump(self, src, dst, from_gdb):
        tail = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_gdb:
                    tail = (tail + data)[-64:]
                    if _RESUME.search(tail):
                        self.resumed.set()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for sk in self.socks:
            sk.close()
        for t in self.threads:
            t.join(TIMEOUT)


def _cpu_ticks(pid):
    """User plus system CPU time of process ``pid`` so far, in clock ticks (proc(5) stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _wait_for_spins(vm, watch):
    """Until gdb has resumed the guest (its resume packet went through ``watch``) and the
    pykvm process has then used 0.3 s more CPU time: the held guest spinning in gdb_spin is
    what runs then (far less takes it from its entry into the loop), observed in the CPU time
    its vCPU thread is given, however late a loaded host gives it."""
    assert watch.resumed.wait(TIMEOUT), "gdb never resumed the guest"
    start = _cpu_ticks(vm.p.pid)
    need = 0.3 * os.sysconf("SC_CLK_TCK")
    end = time.monotonic() + TIMEOUT
    while _cpu_ticks(vm.p.pid) - start < need:
        assert vm.p.poll() is None and time.monotonic() < end, "the resumed guest never ran"
        time.sleep(0.02)


def test_32_bit_guest():
    elf = _elf("hello32")
    with PykvmGdb(elf) as vm:
        out = run_gdb(vm.port, elf, "break guest_main32", "continue", "info registers eip",
                      "stepi", "info registers eip", "print/x $esp", "delete", "continue")
        code, stdout, stderr = vm.finish()
    assert "Breakpoint 1, guest_main32 ()" in out, out
    eips = [ln.split()[1] for ln in out.splitlines() if ln.startswith("eip ")]
    assert len(eips) == 2 and eips[0] != eips[1], out
    assert "<guest_main32+" in out, out
    assert "exited with code 01" in out, out            # isa-debug-exit 0: status 1
    assert code == 1 and "Hello from pykvm guest! (32-bit multiboot)" in stdout, stderr


def test_real_mode_guest_with_a_hardware_breakpoint():
    """A real-mode guest (hello16.bin, symbols from hello16.elf): ``hbreak`` at a function by
    name and ``stepi`` (``break``'s int3 is not trapped in real mode on kvm_pvm: docs/gdb.md)."""
    elf = _elf("hello16")
    with PykvmGdb(os.path.splitext(elf)[0] + ".bin") as vm:
        out = run_gdb(vm.port, elf, "hbreak guest_main16", "continue", "info registers eip",
                      "stepi", "info registers eip", "delete", "continue")
        code, stdout, stderr = vm.finish()
    assert "Breakpoint 1, guest_main16 ()" in out, out
    eips = [ln.split()[1] for ln in out.splitlines() if ln.startswith("eip ")]
    assert len(eips) == 2 and eips[0] != eips[1] and "<guest_main16>" in out, out
    assert "exited normally" in out, out
    assert code == 0 and "mode: real (16-bit)" in stdout, stderr


def test_two_vcpus_are_two_threads():
    elf = _elf("gdb_target")
    with PykvmGdb(elf, "--vcpus", "2") as vm:
        out = run_gdb(vm.port, elf, "info threads", "break gdb_tick", "continue",
                      "info threads", "delete", "continue")
        code, stdout, stderr = vm.finish()
    assert "Thread 1 (vCPU 0)" in out and "Thread 2 (vCPU 1)" in out, out
    assert "hit Breakpoint 1, gdb_tick ()" in out, out
    assert "exited normally" in out, out
    # each vCPU runs the loop once on the bare machine: the shared counter gets both
    assert code == 0 and "counter: 30" in stdout, (stdout, stderr)


def test_hostile_client_gets_errors_and_the_vm_still_finishes():
    elf = _elf("gdb_target")
    with PykvmGdb(elf) as vm:
        c = Raw(vm.port)
        try:
            c.send_raw(b"garbage\x00\xff")                       # ignored
            c.send_raw(b"$g#00")                                 # bad checksum: NAK
            assert c.read_byte() == b"-"
            c.send_raw(b"$" + b"A" * (pk.MAX_PACKET + 100) + b"#00")   # too long: NAK
            assert c.read_byte() == b"-"
            assert c.ask(b"?").startswith(b"T05thread:1;")
            assert c.ask(b"m0,ffffffffff") == b"E16"            # length past the cap
            assert c.ask(b"m0,%x" % (pk.MAX_MEMORY + 1)) == b"E16"
            assert c.ask(b"mffff800000000000,4") == b"E0e"      # not mapped
            assert c.ask(b"m1ffffffffff000,10") == b"E0e"
            assert c.ask(b"Mffff800000000000,1:00") == b"E0e"
            assert c.ask(b"M1000,2:0") == b"E16"                # odd hex
            assert c.ask(b"M1000,2:00") == b"E16"               # length and data differ
            assert c.ask(b"Xffff800000000000,1:\x00") == b"E0e"
            assert c.ask(b"mzz,4") == b"E16"
            assert c.ask(b"Hg99") == b"E16"                     # no such thread
            assert c.ask(b"T99") == b"E16"
            assert c.ask(b"p999") == b"E16"                     # no such register
            assert c.ask(b"P0=00") == b"E16"                    # wrong size
            assert c.ask(b"G00") == b"E16"                      # wrong blob size
            assert c.ask(b"Z0,1000,7") == b"E16"                # no such breakpoint kind
            assert c.ask(b"Z0,ffff800000000000,1") == b"E0e"
            assert c.ask(b"Z9,1000,1") == b""                   # unknown type: unsupported
            assert c.ask(b"z9,1000,1") == b""                   # removing one too
            assert c.ask(b"Z3,1000,4") == b""                   # no read watchpoints on x86
            assert c.ask(b"qXfer:features:read:nope.xml:0,100") == b"E00"
            assert c.ask(b"vCont;x") == b"E16"
            assert c.ask(b"bogus") == b""
            # and it still answers good packets
            regs = c.ask(b"g")
            assert len(regs) > 16 * 16 and all(ch in b"0123456789abcdef" for ch in regs)
            xml = c.ask(b"qXfer:features:read:target.xml:0,1000")
            assert xml[:1] in (b"m", b"l") and b"org.gnu.gdb.i386.core" in xml
            assert c.ask(b"qfThreadInfo") == b"m1"
            assert c.ask(b"D") == b"OK"                         # detach: the guest runs on
        finally:
            c.close()
        code, stdout, stderr = vm.finish()
    assert code == 0 and "counter: 15" in stdout, (stdout, stderr)
    assert "Traceback" not in stderr, stderr


def test_random_packets_never_break_the_stub():
    """500 seeded random packets (every read-only or breakpoint command with random, often
    malformed, arguments; nothing that resumes, kills or writes registers or memory): each gets a
    reply and the connection stays up; then the guest, detached, finishes unharmed."""
    rng = random.Random(23)
    heads = [b"m", b"p", b"g", b"H", b"Hg", b"Hc", b"T", b"q", b"qXfer:features:read:",
             b"qXfer:features:read:target.xml:", b"qThreadExtraInfo,", b"qSupported:", b"Z0,",
             b"z0,", b"Z1,", b"z1,", b"Z2,", b"z2,", b"Z4,", b"z4,", b"Z", b"z", b"v", b"vCont?",
             b"Q", b"?", b"qC", b"qfThreadInfo", b"qsThreadInfo", b"qAttached", b""]
    alphabet = b"0123456789abcdefABCDEF,:;=-#$}*xyz\x00\xff"
    elf = _elf("gdb_target")
    with PykvmGdb(elf) as vm:
        c = Raw(vm.port)
        try:
            for _ in range(500):
                tail = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
                if rng.random() < 0.5:
                    tail = b"%x,%x" % (rng.getrandbits(rng.choice((8, 20, 48, 64))),
                                       rng.getrandbits(rng.choice((2, 8, 17, 64))))
                payload = pk.escape(rng.choice(heads) + tail)
                if payload[:1] in (b"c", b"C", b"s", b"S", b"D", b"k", b"M", b"X", b"G",
                                   b"P") or payload.startswith((b"vCont;", b"vKill")):
                    continue                        # resumes, kills or writes: not these
                reply = c.ask(payload)
                assert isinstance(reply, bytes)
            assert c.ask(b"?").startswith(b"T05")
            assert c.ask(b"D") == b"OK"
        finally:
            c.close()
        code, stdout, stderr = vm.finish()
    assert code == 0 and "counter: 15" in stdout, (stdout, stderr)
    assert "Traceback" not in stderr and "failed:" not in stderr, stderr


def test_disconnect_removes_breakpoints_and_the_guest_finishes():
    """A client that plants a breakpoint and vanishes (no D) leaves the guest as it was: the
    breakpoint is gone and the run completes."""
    elf = _elf("gdb_target")
    with PykvmGdb(elf) as vm:
        nm = subprocess.run(["nm", elf], capture_output=True, text=True, timeout=TIMEOUT)
        tick = int(next(ln.split()[0] for ln in nm.stdout.splitlines()
                        if ln.endswith(" gdb_tick")), 16)
        c = Raw(vm.port)
        try:
            assert c.ask(b"Z0,%x,1" % tick) == b"OK"
            assert c.ask(b"m%x,1" % tick) != b"cc"              # reads show the original
        finally:
            c.close()
        code, stdout, stderr = vm.finish()
    assert code == 0 and "counter: 15" in stdout, (stdout, stderr)


def test_gdb_detach_lets_the_guest_run_to_completion():
    elf = _elf("gdb_target")
    with PykvmGdb(elf) as vm:
        out = run_gdb(vm.port, elf, "break gdb_tick", "continue", "set var gdb_value = 9",
                      "detach")
        code, stdout, stderr = vm.finish()
    assert "Breakpoint 1, gdb_tick ()" in out, out
    assert "[Inferior 1 (Remote target) detached]" in out, out
    assert code == 0 and "value: 9" in stdout and "counter: 15" in stdout, (stdout, stderr)


def test_gdb_kill_stops_the_run():
    elf = _elf("gdb_target")
    with PykvmGdb(elf) as vm:
        out = run_gdb(vm.port, elf, "break gdb_tick", "continue", "kill")
        code, stdout, stderr = vm.finish()
    assert "Breakpoint 1, gdb_tick ()" in out and "[Inferior 1 (Remote target) killed]" in out, \
        out
    assert code == 0 and "killed by gdb" in stderr, stderr     # "stopped", as pykvm stop
    assert "counter:" not in stdout, stdout


def test_api_serve_from_python(leftovers):
    snap = leftovers()
    elf = _elf("gdb_target")
    with Machine(elf) as m:
        with serve(m, "tcp:127.0.0.1:0", wait=True) as server:
            result = []
            t = threading.Thread(target=lambda: result.append(server.run(timeout=TIMEOUT)))
            t.start()
            try:
                out = run_gdb(server.port, elf, "break gdb_tick", "continue",
                              "print gdb_counter", "set var gdb_value = 5", "delete",
                              "continue")
            finally:
                t.join(TIMEOUT)
    assert "Breakpoint 1, gdb_tick ()" in out and "$1 = 0" in out, out
    assert "exited normally" in out, out
    assert result and result[0].exit == "done", result
    assert "value: 5" in result[0].console_text and "counter: 15" in result[0].console_text
    snap.check()


def test_api_over_a_unix_socket(tmp_path, leftovers):
    snap = leftovers()
    path = str(tmp_path / "gdb.sock")
    with Machine(_elf("gdb_target")) as m:
        with serve(m, f"unix:{path}", wait=True) as server:
            assert server.address == f"unix:{path}" and server.port is None
            result = []
            t = threading.Thread(target=lambda: result.append(server.run(timeout=TIMEOUT)))
            t.start()
            c = Raw(path)
            try:
                assert c.ask(b"qSupported:multiprocess+").startswith(b"PacketSize=")
                assert c.ask(b"?").startswith(b"T05thread:1;")
                assert c.ask(b"qC") == b"QC1"
                assert c.ask(b"c") == b"W00"                  # the guest runs to its DONE
            finally:
                c.close()
                t.join(TIMEOUT)
        assert not os.path.exists(path)                     # removed at close
    assert result and result[0].exit == "done" and "counter: 15" in result[0].console_text
    snap.check()


def _own_int3_outcome(*extra):
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "--no-input", *extra,
                        _elf("gdb_target"), "--param", "0,1"], capture_output=True, text=True,
                       timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    last = [ln for ln in r.stderr.splitlines() if "listening on" not in ln]
    return r.returncode, last


def test_the_guests_own_int3_is_left_to_it():
    """The guest's own int3 ends its run the same way with the stub as without it (no
    client; then a client with a breakpoint planted elsewhere): the stub claims only the traps
    of breakpoints it planted. (On this host KVM's emulator cannot run int3: status 6 and the
    emulation failure; on VMX/SVM the guest's IDT reports the #BP.)"""
    want = _own_int3_outcome()
    assert want[0] != 0
    assert _own_int3_outcome("--gdb", "tcp:127.0.0.1:0") == want
    elf = _elf("gdb_target")
    with PykvmGdb(elf, "--param", "0,1") as vm:
        out = run_gdb(vm.port, elf, "break gdb_tick", "continue")
        code, stdout, stderr = vm.finish()
    assert f"exited with code {want[0]:02o}" in out or f"exited with code {want[0]:02}" in out, \
        out
    assert code == want[0], stderr
    assert want[1][-1] in stderr, stderr


def test_the_server_ends_when_the_machine_closes(leftovers):
    snap = leftovers()
    m = Machine(_elf("gdb_target"))
    server = serve(m, "tcp:127.0.0.1:0", wait=True)
    port = server.port
    c = Raw(port)
    try:
        assert c.ask(b"?").startswith(b"T05")
        m.close()                                   # the machine goes first
        end = time.monotonic() + TIMEOUT
        with pytest.raises((EOFError, OSError)):
            while time.monotonic() < end:           # the session ends: the stub hangs up
                c.ask(b"qC")
                time.sleep(0.05)
    finally:
        c.close()
    server._thread.join(TIMEOUT)
    assert not server._thread.is_alive()
    with pytest.raises(OSError):                    # and stops listening
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    server.close()
    snap.check()


def test_cli_refuses_bad_gdb_options():
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "--gdb", "nonsense", "--no-input",
                        _elf("gdb_target")], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2 and "--gdb: bad gdb address 'nonsense'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "--gdb-wait", "--no-input",
                        _elf("gdb_target")], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2 and "--gdb-wait needs --gdb" in r.stderr, r.stderr


# -- the hostile-test findings: bounds, whole-range checks, thread ids, ownership ------------

def _address_of(elf, name):
    """``name``'s link address in ``elf``, as gdb reads it from the symbols."""
    r = subprocess.run([GDB, "-batch", "-nx", "-ex", f"print/x (long)&{name}", elf],
                       capture_output=True, text=True, timeout=TIMEOUT)
    return int(r.stdout.strip().rsplit("=", 1)[1], 16)


def _rss_pages():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])


class _Served:
    """A gdb_target machine served on ``tcp:127.0.0.1:0`` (held for gdb), a raw client
    attached, and a thread that runs the machine (``start()``)."""

    def __init__(self, *params):
        self.elf = _elf("gdb_target")
        self.m = Machine(self.elf)
        if params:
            self.m.set_params(*params)
        self.server = serve(self.m, "tcp:127.0.0.1:0", wait=True)
        self.c = Raw(self.server.port)
        assert self.c.ask(b"?").startswith(b"T05")
        self.result = []
        self.t = None

    def start(self):
        self.t = threading.Thread(target=lambda: self.result.append(
            self.server.run(timeout=TIMEOUT)))
        self.t.start()

    def close(self):
        self.c.close()
        self.server.close()
        if self.t is not None:
            self.t.join(TIMEOUT)
        self.m.close()


def test_breakpoint_and_watchpoint_counts_are_capped_and_memory_bounded(leftovers):
    """Finding 2: 3000 64 KiB write watchpoints and 2000 breakpoints: the stub takes
    MAX_WATCHED_BYTES in total and MAX_BREAKPOINTS, answers the rest E1c (ENOSPC), and the
    process grows by a bounded amount (it grew 200 MB before the caps)."""
    from pykvm.gdbstub.server import MAX_BREAKPOINTS, MAX_SOFT_WATCHES, MAX_WATCHED_BYTES
    snap = leftovers()
    v = _Served()
    try:
        before = _rss_pages()
        replies = [v.c.ask(b"Z2,%x,10000" % (0x1000000 + i * 0x10)) for i in range(3000)]
        taken = replies.count(b"OK")
        assert taken * 0x10000 <= MAX_WATCHED_BYTES and taken >= 1, replies[:3]
        assert set(replies[taken:]) == {b"E1c"}, set(replies[taken:])
        small = [v.c.ask(b"Z2,%x,4" % (0x2000000 + i * 8)) for i in range(200)]
        assert small.count(b"OK") <= MAX_SOFT_WATCHES and small[-1] == b"E1c"
        bps = [v.c.ask(b"Z0,%x,1" % (0x200000 + i)) for i in range(2000)]
        assert bps.count(b"OK") == MAX_BREAKPOINTS and set(bps[MAX_BREAKPOINTS:]) == {b"E1c"}
        assert len(v.m.ram_patches) == MAX_BREAKPOINTS
        grown = (_rss_pages() - before) * 4096
        assert grown < 32 << 20, f"the VMM grew {grown} bytes"
        for i in range(2000):
            assert v.c.ask(b"z0,%x,1" % (0x200000 + i)) == b"OK"
        assert v.m.ram_patches == {}
        assert v.m.memory.read(0x200000, 2000) == bytes(2000)   # the guest's zeros back
    finally:
        v.close()
    snap.check()


def test_writes_spanning_the_end_of_ram_write_nothing(leftovers):
    """Finding 16: an M or X packet whose range runs past guest RAM (or into an unmapped
    page) is refused before any byte is written: no partial write."""
    snap = leftovers()
    v = _Served()
    try:
        end = v.m.memory.read(0x3fffff0, 0x10)
        assert v.c.ask(b"M3fffffe,4:aabbccdd") == b"E0e"
        assert v.c.ask(b"X3fffffe,4:" + pk.escape(b"\x11\x22\x33\x44")) == b"E0e"
        assert v.m.memory.read(0x3fffff0, 0x10) == end
        assert v.c.ask(b"m3fffffe,4") == pk.hex_encode(end[-2:])    # the readable part
        assert v.c.ask(b"Mfee00000,4:00000000") == b"E0e"          # the LAPIC is not RAM
        assert v.c.ask(b"M3fffffc,4:aabbccdd") == b"OK"            # the last 4 bytes: fine
        assert v.m.memory.read(0x3fffffc, 4) == bytes.fromhex("aabbccdd")
    finally:
        v.close()
    snap.check()


def test_thread_ids_that_do_not_exist_are_refused(leftovers):
    """Findings 14 and 15: qThreadExtraInfo and T of thread 0 (no one thread) or a thread
    that does not exist answer E; every vCont action's thread id is parsed, a bad one answers
    E and resumes nothing; so do c/C/s/S with a bad signal or an address (not supported)."""
    snap = leftovers()
    v = _Served()
    try:
        v.start()
        for bad in (b"qThreadExtraInfo,0", b"qThreadExtraInfo,2", b"T0", b"T2", b"T-1",
                    b"vCont;c:zz", b"vCont;c:2", b"vCont;s:1;c:zz", b"vCont;c:", b"vCont;x",
                    b"vCont;Czz", b"czz", b"Czz", b"C05;zz", b"szz", b"s1000", b"S05;1000"):
            assert v.c.ask(bad) == b"E16", bad
        assert v.c.ask(b"qThreadExtraInfo,1") == pk.hex_encode(b"vCPU 0")
        # nothing was resumed: the run's vCPU reaches gdb's hold (the run thread may start
        # after the packets were answered) and stays there
        wait_until(lambda: v.m.held_for("gdb"), "the started run to be held for gdb",
                   timeout=TIMEOUT)
        assert v.c.ask(b"qC") == b"QC1"                    # the stub still answers, stopped
        assert v.c.ask(b"vCont;c:1") == b"W00"             # a good one runs to the end
    finally:
        v.close()
    assert v.result and v.result[0].exit == "done", v.result
    snap.check()


def test_a_second_server_on_a_machine_is_refused(leftovers):
    """Finding 18: while a machine's gdb server lives, another serve() of it raises
    GdbServerExists naming the first; once the first is closed, a new one may serve."""
    from pykvm.errors import Busy
    from pykvm.gdbstub.server import GdbServerExists
    snap = leftovers()
    with Machine(_elf("gdb_target")) as m:
        first = serve(m, "tcp:127.0.0.1:0")
        try:
            with pytest.raises(GdbServerExists, match=first.address) as e:
                serve(m, "tcp:127.0.0.1:0")
            assert isinstance(e.value, Busy) and e.value.server is first
            c = Raw(first.port)
            assert c.ask(b"qC") == b"QC1"                  # the first is untouched
            c.close()
        finally:
            first.close()
        second = serve(m, "tcp:127.0.0.1:0")
        second.close()
    snap.check()


def test_the_unix_socket_of_a_live_server_is_left_alone(tmp_path, leftovers):
    """Finding 13: ``unix:PATH`` where a live server listens is refused (GdbAddressInUse;
    the CLI: one line, status 2) and the first server stays reachable, its guest still held
    (--gdb-wait) after the probes; a stale socket (no listener) is replaced; a file that is
    not a socket is refused."""
    from pykvm.gdbstub.server import GdbAddressInUse
    snap = leftovers()
    path = str(tmp_path / "g.sock")
    result = []
    with Machine(_elf("gdb_target")) as m1, Machine(_elf("gdb_target")) as m2:
        first = serve(m1, f"unix:{path}", wait=True)
        t = threading.Thread(target=lambda: result.append(first.run(timeout=TIMEOUT)))
        t.start()
        try:
            with pytest.raises(GdbAddressInUse):
                serve(m2, f"unix:{path}")
            r = subprocess.run([sys.executable, "-m", "pykvm", "run", "--gdb", f"unix:{path}",
                                "--no-input", _elf("gdb_target")], capture_output=True,
                               text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1 and "live server" in r.stderr
            # the probes released nothing: the run is held for gdb (once its vCPU thread has
            # reached the hold) and has not ended
            wait_until(lambda: m1.held_for("gdb"), "the run to be held for gdb", timeout=TIMEOUT)
            assert not result
            c = Raw(path)                                   # the first still serves
            assert c.ask(b"qC") == b"QC1"
            assert c.ask(b"c") == b"W00"
            c.close()
        finally:
            first.close()
            t.join(TIMEOUT)
        assert result and result[0].exit == "done"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)                                    # bound, never listening: stale
        stale.close()
        again = serve(m2, f"unix:{path}")
        assert again.address == f"unix:{path}"
        again.close()
        plain = tmp_path / "plain"
        plain.write_text("keep me")
        with pytest.raises(FileExistsError):
            serve(m2, f"unix:{plain}")
        assert plain.read_text() == "keep me"
    snap.check()


def test_snapshot_with_a_planted_breakpoint_holds_the_guests_bytes(tmp_path, leftovers):
    """Finding 3 (snapshots): a snapshot taken while gdb has a breakpoint planted holds the
    guest's own instruction bytes (Machine.ram_patches), so it restores and runs to the end
    in another process; the breakpoint stays planted in the machine that took it."""
    snap = leftovers()
    elf = _elf("gdb_target")
    tick = _address_of(elf, "gdb_tick")
    path = str(tmp_path / "bp.snap")
    v = _Served()
    try:
        own = v.m.memory.read(tick, 1)
        assert v.c.ask(b"Z0,%x,1" % tick) == b"OK"
        assert v.m.memory.read(tick, 1) == b"\xcc" and v.m.ram_patches[tick] == (own, b"\xcc")
        v.m.snapshot(path)
        assert v.m.memory.read(tick, 1) == b"\xcc"         # still planted
        v.start()
        assert v.c.ask(b"c").startswith(b"T05")             # and it still stops the guest
        assert v.c.ask(b"z0,%x,1" % tick) == b"OK"
        assert v.c.ask(b"c") == b"W00"
    finally:
        v.close()
    r = subprocess.run([sys.executable, "-m", "pykvm", "restore", "--no-input", path],
                       capture_output=True, text=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "counter: 15" in r.stdout, (r.stdout, r.stderr)
    snap.check()


def test_reset_keeps_the_debuggers_breakpoints_and_the_guests_bytes(leftovers):
    """Finding 3 (checkpoint/reset): checkpoint -> plant -> reset keeps the breakpoint
    planted and working; plant -> checkpoint -> remove -> reset leaves the guest's own byte
    (the baseline never holds int3)."""
    snap = leftovers()
    elf = _elf("gdb_target")
    tick = _address_of(elf, "gdb_tick")
    v = _Served()
    try:
        own = v.m.memory.read(tick, 1)
        assert own != b"\xcc"
        assert v.c.ask(b"Z0,%x,1" % tick) == b"OK"
        v.m.checkpoint()                                    # taken with the breakpoint in
        assert v.c.ask(b"z0,%x,1" % tick) == b"OK"
        v.m.reset()
        assert v.m.memory.read(tick, 1) == own and v.m.ram_patches == {}
        v.m.checkpoint()                                    # taken without it
        assert v.c.ask(b"Z0,%x,1" % tick) == b"OK"
        v.m.reset()
        assert v.m.memory.read(tick, 1) == b"\xcc" and v.m.ram_patches[tick] == (own, b"\xcc")
        assert v.c.ask(b"m%x,1" % tick) == pk.hex_encode(own)   # gdb sees the guest's byte
        v.start()
        stop = v.c.ask(b"c")
        assert stop.startswith(b"T05") and b"swbreak" in stop, stop
        assert v.c.ask(b"z0,%x,1" % tick) == b"OK"
        assert v.c.ask(b"c") == b"W00"
    finally:
        v.close()
    assert v.result and "counter: 15" in v.result[0].console_text
    snap.check()


def test_a_targets_temporary_patches_are_ram_patches_too(tmp_path, leftovers):
    """Finding 3, the target's side: the instruction bytes a target writes through the
    GuestAccess the stub gives it (RISC-V's single-step ``ebreak``; driven here on x86 through
    the same object) are RAM patches: a snapshot and a checkpoint hold the guest's bytes, a
    reset plants the patch again, and the target's next write there puts the guest's bytes
    back; over a gdb breakpoint the write goes through as it is."""
    snap = leftovers()
    tick = _address_of(_elf("gdb_target"), "gdb_tick")
    path = str(tmp_path / "t.snap")
    v = _Served()
    try:
        mem = v.server._target_memory(0)
        own = v.m.memory.read(tick, 1)
        mem.write(tick, b"\xcc")
        assert v.m.ram_patches == {tick: (own, b"\xcc")}
        v.m.checkpoint()
        v.m.snapshot(path)
        v.m.reset()
        assert v.m.memory.read(tick, 1) == b"\xcc"        # planted again after the copy-back
        mem.write(tick, b"\x00")                           # the next write: the guest's bytes
        assert v.m.memory.read(tick, 1) == own and v.m.ram_patches == {}
        v.m.reset()
        assert v.m.memory.read(tick, 1) == own             # the baseline never held 0xcc
        with Machine.restore(path) as r:
            assert r.memory.read(tick, 1) == own           # nor did the snapshot
        assert v.c.ask(b"Z0,%x,1" % tick) == b"OK"
        mem.write(tick, b"\xcc")                           # a step onto gdb's breakpoint
        mem.write(tick, b"\xcc")
        assert v.m.ram_patches == {tick: (own, b"\xcc")}
        assert v.c.ask(b"z0,%x,1" % tick) == b"OK"
        assert v.m.memory.read(tick, 1) == own and v.m.ram_patches == {}
    finally:
        v.close()
    snap.check()


def test_register_packets_wait_for_another_threads_hold_of_the_machine(leftovers):
    """gdb's register and memory packets are served inside Machine.holding(): while another
    thread reads or loads the vCPUs (a snapshot, a checkpoint or reset, the control socket's
    dump; a snapshot may enter KVM_RUN to complete a pending exit, where a register read
    from the gdb thread answered E10), a packet waits for the block to end, then sees what
    the block left. Here the block writes RBX just before it ends; gdb's ``p 1`` (RBX), sent
    while the block is open, answers the new value."""
    snap = leftovers()
    v = _Served()
    try:
        value = 0x1122334455667788
        opened, inside, replies = threading.Event(), [], []

        def block():
            with v.m.holding("test"):
                inside.append(True)
                opened.set()
                time.sleep(0.5)                # gdb's packet arrives meanwhile
                regs = v.m.vcpus[0].get_regs()
                regs.rbx = value
                v.m.vcpus[0].set_regs(regs)
                inside.clear()

        t = threading.Thread(target=block)
        t.start()
        assert opened.wait(TIMEOUT)
        replies.append((v.c.ask(b"p1"), bool(inside)))           # x86-64: rax, rbx, ...
        t.join(TIMEOUT)
        reply, while_inside = replies[0]
        assert not while_inside, "the packet was answered inside the other thread's block"
        assert reply == value.to_bytes(8, "little").hex().encode(), reply
        v.start()
        assert v.c.ask(b"c") == b"W00"
    finally:
        v.close()
    snap.check()
