"""gdb against `pykvm run --gdb` on RISC-V, inside the RISC-V lab (real KVM, the lab's trixie
riscv64 gdb in batch mode).

The guest is guests/riscv/gdb_target.c: it turns on Sv39 paging (so every address gdb sends is
a GVA the stub translates by walking the guest's page tables), runs its own ebreaks, calls
gdb_tick(1..5) and prints what gdb may have changed. gdb breaks at gdb_tick by name, reads a
global and registers, single-steps (emulated by the stub with a temporary ebreak), writes a
global and guest memory through a second mapping of RAM, and continues to the end.
"""
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from pykvm import guests
from pykvm.testing.gdb import ensure_loopback

pytestmark = pytest.mark.requires_arch("riscv64")

GDB_TIMEOUT = 300          # seconds for one whole gdb session under TCG
ALIAS = 0x3FC0000000       # gdb_target.c's GDB_ALIAS: a second GVA of GPA 0x80000000
RAM = 0x80000000


def _gdb() -> str:
    gdb = shutil.which("gdb")
    assert gdb, "the RISC-V lab carries trixie's gdb (pykvm/lab/build.py RISCV.user_packages)"
    return gdb


def _elf() -> str:
    return guests.path("gdb_target", arch="riscv64")


@pytest.fixture
def loopback():
    """127.0.0.1 reachable: the lab's initramfs leaves ``lo`` down (this brings it up, as the
    lab's Linux guests' scripts do for theirs)."""
    ensure_loopback()


def _start(*extra, address="tcp::0", guest=None):
    """`pykvm run --gdb ADDRESS ... GUEST` (default gdb_target.elf), once it says it listens
    (after listen(): a unix socket's file exists from bind() on): the process and its TCP port
    (None for a unix socket)."""
    p = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--gdb", address, *extra,
                          guest or _elf()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        seen.append(line)
        if "gdb server listening on" in line:
            m = re.search(r":(\d+)\s*$", line)
            return p, (int(m.group(1)) if m and address.startswith("tcp:") else None)
    p.kill()
    out, err = p.communicate(timeout=30)
    pytest.fail(f"pykvm run --gdb did not say where it listens: {''.join(seen)}{err}")


def _finish(p, timeout=120):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate(timeout=30)
        pytest.fail(f"pykvm run did not end: {out}{err}")
    return p.returncode, out, err


def test_gdb_version_runs_in_the_lab():
    r = subprocess.run([_gdb(), "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("GNU gdb"), r.stdout + r.stderr


def test_gdb_breaks_steps_reads_writes_and_continues(tmp_path, loopback):
    p, port = _start("--gdb-wait")
    script = tmp_path / "session.gdb"
    script.write_text(f"""set pagination off
set confirm off
target remote 127.0.0.1:{port}
info threads
break gdb_tick
continue
continue
print counter
print $a0
print/x $pc
print/x &gdb_tick
info registers pc
print/x $satp
stepi
print/x $pc
stepi
stepi
print/x $pc
print/x *(unsigned long *)({ALIAS:#x} + ((unsigned long)&counter - {RAM:#x}))
print counter == *(unsigned long *)({ALIAS:#x} + ((unsigned long)&counter - {RAM:#x}))
set var poke = 4660
set {{unsigned int}}({ALIAS:#x} + ((unsigned long)&buffer - {RAM:#x})) = 0x00626467
print buffer
x/2xw &poke
next
print $pc != &gdb_tick
delete
continue
""")
    try:
        r = subprocess.run([_gdb(), "-batch", "-nx", "-x", str(script), _elf()],
                           capture_output=True, text=True, timeout=GDB_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        p.kill()
        pytest.fail(f"gdb did not finish in {GDB_TIMEOUT} s: {e.stdout}{e.stderr}")
    log = r.stdout + r.stderr
    print(log)
    if r.returncode != 0 and p.poll() is None:
        p.kill()                          # gdb gave up: the guest may still wait for it
    rc, out, err = _finish(p)
    assert r.returncode == 0, log
    values = dict(re.findall(r"^\$(\d+) = (.*)$", r.stdout, re.M))
    # break at a function by name, twice: gdb_tick(1), then gdb_tick(2)
    assert re.search(r"Breakpoint 1, (0x[0-9a-f]+ in )?gdb_tick \(n=(n@entry=)?1\)", log), log
    assert re.search(r"Breakpoint 1, (0x[0-9a-f]+ in )?gdb_tick \(n=(n@entry=)?2\)", log), log
    assert values["1"] == "1", log                    # counter after gdb_tick(1)
    assert values["2"] == "2", log                    # $a0: gdb_tick's argument
    assert values["3"] == values["4"], log            # $pc is gdb_tick's address
    assert re.search(r"^pc\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <gdb_tick(\+0)?>", log, re.M), log
    assert int(values["5"], 16) >> 60 == 8, log       # satp: Sv39
    pc0, pc1, pc3 = (int(values[k], 16) for k in ("3", "6", "7"))
    assert pc0 < pc1 < pc3 <= pc0 + 3 * 4, log        # stepi went one instruction at a time
    assert values["8"] == "0x1" and values["9"] == "1", log   # the alias reads the same global
    assert values["10"].startswith('"gdb'), log        # the write through the alias landed
    assert "0x00001234" in log, log                  # poke, by x/xw
    assert values["11"] == "1", log                   # `next` left gdb_tick's entry
    assert "exited normally" in log or "exited with code 0" in log or \
        "Remote connection closed" in log, log
    assert r.returncode == 0, log
    console = out + err
    assert rc == 0, console
    assert "gdb_target: counter=15 poke=4660 buffer=gdb" in console, console
    assert "gdb_target: own_breaks=4 scause=3" in console, console


def test_gdb_target_without_a_debugger_takes_its_own_ebreaks():
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", _elf()], capture_output=True,
                       text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "gdb_target: counter=15 poke=0 buffer=untouched" in out, out
    assert "gdb_target: own_breaks=4 scause=3" in out, out


def _packet(payload: bytes) -> bytes:
    return b"$" + payload + b"#" + b"%02x" % (sum(payload) % 256)


def _reply(s: socket.socket) -> bytes:
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {buf!r}")
        buf += chunk
        m = re.search(rb"\$([^#]*)#[0-9a-f]{2}", buf)
        if m:
            return m.group(1)


def test_raw_client_on_a_unix_socket_registers_and_garbage(tmp_path):
    path = str(tmp_path / "gdb.sock")
    p, _ = _start("--gdb-wait", address=f"unix:{path}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(path)
            s.sendall(b"+" + _packet(b"qXfer:features:read:target.xml:0,ffff"))
            xml = _reply(s)
            assert b"org.gnu.gdb.riscv.cpu" in xml and b"riscv:rv64" in xml
            sizes = [int(b) for b in re.findall(rb'bitsize="(\d+)"', xml)]
            s.sendall(b"+" + _packet(b"g"))
            regs = _reply(s)
            assert len(regs) == sum(sizes) // 4, (len(regs), sizes)
            pc = int.from_bytes(bytes.fromhex(regs[32 * 16:33 * 16].decode()), "little")
            assert pc == 0x80200000                     # held before the first instruction
            # a bad checksum, an overlong packet, a packet for an unknown register, junk bytes
            s.sendall(b"$g#00" + b"$" + b"m" * 100000 + b"#00" + b"\xff\x00junk")
            s.sendall(b"+" + _packet(b"p1000"))
            s.sendall(b"+" + _packet(b"m3fc0000000,8"))      # the alias of RAM: Bare here
            time.sleep(1)
            s.sendall(b"+" + _packet(b"D"))
            time.sleep(1)
    except BaseException:
        p.kill()                          # still held for a debugger: do not wait for it
        raise
    rc, out, err = _finish(p)
    # detached: the guest ran on to the end
    assert rc == 0, out + err
    assert "own_breaks=4" in out + err, out + err


def test_ctrl_c_stops_a_guest_waiting_in_wfi(tmp_path):
    """The 0x03 byte while the guest runs: every vCPU is kicked out of KVM_RUN (here one
    sleeping in WFI with interrupts off) and gdb hears SIGINT; `k` ends the run."""
    path = str(tmp_path / "gdb.sock")
    p, _ = _start(address=f"unix:{path}", guest=guests.path("idle", arch="riscv64"))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(120)
            s.connect(path)
            s.sendall(b"+" + _packet(b"?"))
            assert _reply(s).startswith(b"T05")           # attaching stops the guest
            s.sendall(b"+" + _packet(b"c"))
            time.sleep(2)                                  # it runs into its WFI loop
            s.sendall(b"\x03")
            assert _reply(s).startswith(b"T02thread:1;")
            s.sendall(b"+" + _packet(b"p20"))              # pc (register 32)
            pc = int.from_bytes(bytes.fromhex(_reply(s).decode()), "little")
            assert 0x80200000 <= pc < 0x80400000, hex(pc)
            s.sendall(b"+" + _packet(b"k"))
            time.sleep(1)
    except BaseException:
        p.kill()
        raise
    rc, out, err = _finish(p)
    assert "Traceback" not in err, err
