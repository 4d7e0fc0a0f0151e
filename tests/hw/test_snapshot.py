"""Snapshots restored in another process (Machine.snapshot / Machine.restore, pykvm run
--snapshot-at / pykvm restore; docs/snapshots.md), on real KVM.

The guest snap_counter (guests/x86/snap_counter.c) fills a region of memory per vCPU, changes it
round by round and prints "snap cpu<N> count=<round> sum=<checksum of its region>" every ten
rounds. Its lines depend on nothing but its code, so the lines printed before a snapshot in one
process and after the restore in another must be, vCPU by vCPU, exactly those of an
uninterrupted run: same counts, same checksums, same final line."""
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib

import pytest

from pykvm import cli, guests, snapfile
from pykvm import snapshot as snapmod
from pykvm.errors import SnapshotError
from pykvm.machine import Machine
from pykvm.runloop import ConsoleWatch

pytestmark = pytest.mark.requires_kvm

GUEST = "snap_counter"
ROUNDS = 600


def _lines(text, cpu=None):
    out = [ln.split(" aps=")[0] for ln in text.splitlines() if ln.startswith("snap cpu")]
    if cpu is not None:
        out = [ln for ln in out if ln.startswith(f"snap cpu{cpu} ")]
    return out


def _uninterrupted(machine, vcpus):
    with Machine(GUEST, machine=machine, vcpus=vcpus) as m:
        r = m.run(timeout=120)
        assert r.exit == "done", r.detail
        return r.console_text


def _snapshot_at(path, text, *, machine, vcpus, params=None):
    """Run GUEST until ``text`` appears on its console, hold the vCPUs there (from the vCPU
    thread that printed it, as ``pykvm run --snapshot-at console:TEXT`` does), snapshot it to
    ``path`` (the run in progress), stop; the console printed before the snapshot. On the
    bare machine the vCPUs run in loose step (pykvm_params[2]), so that each is mid-run when
    vCPU 0 is, however unevenly the host schedules their threads."""
    if params is None:
        params = (0, 0, vcpus if machine == "bare" else 0)
    hit = ConsoleWatch(text, then=lambda: m.hold("test", timeout=None))
    m = Machine(GUEST, machine=machine, vcpus=vcpus, on_console=hit)
    try:
        m.set_params(*params)
        result = []
        t = threading.Thread(target=lambda: result.append(m.run(timeout=120)))
        t.start()
        assert hit.wait(60), "the guest never printed " + text
        assert m.finished_vcpus == set()
        size = m.snapshot(path)
        before = m.console.decode()
        m.stop("test")
        t.join()
        assert result[0].exit == "stopped"
    finally:
        m.close()
    assert size == os.path.getsize(path)
    return before


_RESTORE = """
import sys
from pykvm.machine import Machine
m = Machine.restore(sys.argv[1])
if len(sys.argv) > 2:
    m.snapshot(sys.argv[2])      # the state as loaded, before the guest runs on
r = m.run(timeout=120)
sys.stdout.write(r.console_text)
sys.stderr.write(f"EXIT {r.exit} {r.exit_code}\\n")
m.close()
"""


def _restore_elsewhere(path, again=None):
    """Restore ``path`` in a new Python process and run it to the end: (console, exit line)."""
    argv = [sys.executable, "-c", _RESTORE, path] + ([again] if again else [])
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("machine, vcpus", [("bare", 1), ("bare", 2), ("bare", 4), ("pc", 1)])
def test_restored_in_another_process_the_guest_continues_identically(tmp_path, machine, vcpus):
    full = _uninterrupted(machine, vcpus)
    path = str(tmp_path / "a.snap")
    before = _snapshot_at(path, "cpu0 count=200 ", machine=machine, vcpus=vcpus)
    after, exit_line = _restore_elsewhere(path)
    assert exit_line == "EXIT done 0"
    for cpu in range(vcpus):
        want = _lines(full, cpu)
        assert len(want) == ROUNDS // 10 + 1
        b, a = _lines(before, cpu), _lines(after, cpu)
        assert b and a, (b, a)                       # the snapshot landed mid-run
        assert b + a == want


@pytest.mark.parametrize("vcpus", [2, 4])
def test_pc_application_processors_run_on_after_restore(tmp_path, vcpus):
    """On the pc machine vCPU 0 wakes the others by INIT/SIPI into a loop that counts in
    memory: after the restore in another process they are running that loop again (their
    total goes on growing from where the snapshot had it) and vCPU 0's lines continue exactly."""
    full = _uninterrupted("pc", 1)
    path = str(tmp_path / "pc.snap")
    before = _snapshot_at(path, "cpu0 count=200 ", machine="pc", vcpus=vcpus,
                          params=(vcpus - 1, 0, 0))
    after, exit_line = _restore_elsewhere(path)
    assert exit_line == "EXIT debug_exit 1"
    assert _lines(before, 0) + _lines(after, 0) == _lines(full, 0)

    def totals(text):
        return [int(ln.split(" aps=")[1]) for ln in text.splitlines() if " aps=" in ln]
    tb, ta = totals(before), totals(after)
    assert tb and len(ta) >= 2
    assert tb[-1] < ta[0] < ta[-1]                   # the APs count on from the snapshot's value


def _vcpu_states(path):
    plan = snapmod.Plan(path)
    return plan.vcpus, plan.vm


def _msrs(blob):
    return {int.from_bytes(blob[i:i + 4], "little"): int.from_bytes(blob[i + 8:i + 16], "little")
            for i in range(0, len(blob), 16)}


@pytest.mark.parametrize("machine, vcpus", [("pc", 1), ("bare", 2)])
def test_every_piece_of_x86_state_reads_back_as_saved(tmp_path, machine, vcpus):
    """Restore in another process, read the state back before the guest runs on (a second
    snapshot): regs, sregs2, the XSAVE area, XCRs, debug registers, every MSR but the TSC
    (which counts on), the LAPIC, vCPU events, MP state, the PICs and IOAPIC are the bytes that
    were saved."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("x86 state")
    first, second = str(tmp_path / "1.snap"), str(tmp_path / "2.snap")
    _snapshot_at(first, "cpu0 count=100 ", machine=machine, vcpus=vcpus)
    _restore_elsewhere(first, again=second)
    (saved, saved_vm), (loaded, loaded_vm) = _vcpu_states(first), _vcpu_states(second)
    for s, t in zip(saved, loaded):
        names = set(s.blobs) - {"msrs"}
        assert {"regs", "sregs2", "xsave", "xcrs", "debugregs", "events", "mp_state"} <= names
        assert (machine == "pc") == ("lapic" in names)
        for name in names:
            assert s[name] == t[name], name
        ms, mt = _msrs(s["msrs"]), _msrs(t["msrs"])
        assert ms.keys() == mt.keys() and len(ms) > 10
        assert {k: v for k, v in ms.items() if k != 0x10} == \
            {k: v for k, v in mt.items() if k != 0x10}
        assert s.absent == t.absent
        assert ("nested" in s.absent) != ("nested" in s.blobs)     # captured, or said absent
    for name in ("pic_master", "pic_slave", "ioapic"):
        assert (name in saved_vm) == (machine == "pc")
        if name in saved_vm:
            assert saved_vm[name] == loaded_vm[name], name


def test_cli_snapshot_and_restore_in_two_processes(tmp_path):
    path = str(tmp_path / "cli.snap")
    cmd = [sys.executable, "-m", "pykvm"]
    full = subprocess.run(cmd + ["run", GUEST, "--vcpus", "2", "--timeout", "120", "--no-input"],
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    a = subprocess.run(cmd + ["run", GUEST, "--vcpus", "2", "--timeout", "120", "--no-input",
                              "--snapshot-at", "console:cpu1 count=150 ", "--snapshot", path],
                       capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr
    assert f"snapshot written to {path}" in a.stderr
    b = subprocess.run(cmd + ["restore", path, "--timeout", "120", "--no-input", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert b.returncode == 0, b.stderr
    out = json.loads(b.stdout)
    assert out["exit"] == "done"
    for cpu in (0, 1):
        assert _lines(a.stdout, cpu) + _lines(out["console"], cpu) == _lines(full.stdout, cpu)
    # held as the text appeared, by the vCPU that printed it: its next line is the restore's
    assert _lines(a.stdout, 1)[-1].startswith("snap cpu1 count=150 ")
    assert _lines(out["console"], 1)[0].startswith("snap cpu1 count=160 ")


def test_snapshot_at_console_text_holds_the_guest_where_the_text_appeared(tmp_path):
    """``--snapshot-at console:TEXT``: the vCPU thread that prints TEXT holds the guest right
    there, before the snapshot thread even runs (here it is started only once the guest is
    held: without the hold the guest would run to its end first). The snapshot then is of
    the guest as it stood at TEXT: the restore's first line is the next one."""
    path = str(tmp_path / "at.snap")
    m = Machine(GUEST, machine="bare")
    try:
        trigger = cli._SnapshotTrigger(m, ("console", b"cpu0 count=100 "), path)
        m.on_console = trigger.feed
        result = []
        t = threading.Thread(target=lambda: result.append(m.run(timeout=120)))
        t.start()
        end = time.monotonic() + 60
        while not m.held_for(trigger):
            assert t.is_alive() and time.monotonic() < end, "the guest was not held at TEXT"
            time.sleep(0.01)
        assert _lines(m.console.decode())[-1].startswith("snap cpu0 count=100 ")
        trigger.start()
        t.join(120)
        trigger.finish()
        assert result[0].exit == "stopped" and trigger.error is None, trigger.error
        assert trigger.written == os.path.getsize(path)
        assert not m.holders
    finally:
        m.close()
    after, exit_line = _restore_elsewhere(path)
    assert exit_line == "EXIT done 0"
    assert _lines(after)[0].startswith("snap cpu0 count=110 ")


@pytest.mark.skipif(shutil.which("gdb") is None,
                    reason="gdb is not installed (Debian: apt install gdb)")
def test_cli_restore_serves_gdb_from_the_snapshot_on(tmp_path):
    """``pykvm restore PATH --gdb ... --gdb-wait``: gdb attaches to the restored guest where
    the snapshot left it (spinning in gdb_spin, guests/x86/gdb_target.c), releases it, breaks
    in gdb_tick by name and continues to the end; the guest prints its untouched total."""
    path = str(tmp_path / "gdb.snap")
    cmd = [sys.executable, "-m", "pykvm"]
    a = subprocess.run(cmd + ["run", "gdb_target", "--param", "1", "--no-input",
                              "--snapshot-at", "1s", "--snapshot", path],
                       capture_output=True, text=True, timeout=120)
    assert a.returncode == 0, a.stderr
    sock = str(tmp_path / "gdb.sock")
    b = subprocess.Popen(cmd + ["restore", path, "--no-input", "--timeout", "120",
                                "--gdb", f"unix:{sock}", "--gdb-wait"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while not os.path.exists(sock):
            assert b.poll() is None and time.monotonic() < end, b.stderr.read() if b.stderr else ""
            time.sleep(0.05)
        elf = os.path.splitext(guests.path("gdb_target"))[0] + ".elf"
        g = subprocess.run(["gdb", "-batch", "-nx", "-ex", "set pagination off",
                            "-ex", f"target remote {sock}", "-ex", "print gdb_spins > 0",
                            "-ex", "set var gdb_hold = 0", "-ex", "break gdb_tick",
                            "-ex", "continue", "-ex", "print gdb_counter", "-ex", "delete",
                            "-ex", "continue", elf],
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        out = g.stdout + g.stderr
        stdout, stderr = b.communicate(timeout=120)
    finally:
        if b.poll() is None:
            b.kill()
            b.communicate()
    assert "gdb_spin () at x86/gdb_target.c" in out, out      # where the snapshot was taken
    assert "$1 = 1" in out, out                                # it had spun before
    assert "Breakpoint 1, gdb_tick ()" in out and "$2 = 0" in out, out
    assert "exited normally" in out, out
    assert b.returncode == 0 and "counter: 15" in stdout, (stdout, stderr)


# -- refused snapshots -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_snapshot(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("snap") / "good.snap")
    _snapshot_at(path, "cpu0 count=50 ", machine="bare", vcpus=1)
    return path


def _rewrite(src, dst, change):
    """Copy snapshot ``src`` to ``dst`` with valid checksums, ``change(sections)`` applied to
    {name: bytes payload}: a well-formed file whose content is wrong."""
    secs = snapfile.read(src)
    payloads = {n: s.payload(1 << 30) for n, s in secs.items()}
    change(payloads)
    w = snapfile.Writer()
    for n, data in payloads.items():
        w.add(n, data, compress=True)
    w.write(dst)
    return dst


def _meta(change):
    def edit(p):
        m = json.loads(p["meta"])
        change(m)
        p["meta"] = json.dumps(m).encode()
    return edit


def _ram_outside(p):
    rec = snapfile._RUN.pack(0x7FFF0000000, 4096, 0) + bytes(4096)
    p["ram"] = p["ram"] + rec


def _header(blob, *, version=None, length=None):
    b = bytearray(blob)
    if version is not None:
        b[8:12] = version.to_bytes(4, "little")
    if length is not None:            # the first section's length, digest made valid again
        off = snapfile._HEAD.size + snapfile.NAME_LEN + 8
        b[off:off + 8] = length.to_bytes(8, "little")
    body = bytes(b[:-snapfile.DIGEST_LEN])
    return body + hashlib.sha256(body).digest()


CASES = {
    "wrong magic": (lambda blob, d: b"NOTASNAP" + blob[8:], "not a pykvm snapshot"),
    "future version": (lambda blob, d: _header(blob, version=3), "format version 3"),
    "huge length": (lambda blob, d: _header(blob, length=1 << 62), "not where the file holds"),
    "truncated": (lambda blob, d: blob[:len(blob) // 2], "corrupted or truncated"),
    "empty": (lambda blob, d: b"", "not a pykvm snapshot"),
    "foreign arch": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: m.update(arch="riscv64"))), "foreign snapshot: taken on 'riscv64'"),
    # values from the file are quoted in at most 60 characters, escaped
    "arch of 1000 characters": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: m.update(arch="x" * 1000))), "taken on 'x{50,57}\\.\\.\\., this host"),
    "cpuid vendor of bytes 0xff": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: [e.__setitem__(slice(4, 7), [0xFFFFFFFF] * 3) for e in m["cpuid"]
                   if e[0] == 0])), r"its guest CPUID says (\\ufffd){12}, this host"),
    # a section name appears once: a foreign 'meta' in front of the real one, a second 'ram'
    "a second meta in front": (lambda blob, d: _duplicate(blob, d, "meta", _meta(
        lambda m: m.update(arch="riscv64")), first=True), "section 'meta' appears twice"),
    "a second ram": (lambda blob, d: _duplicate(blob, d, "ram", lambda p: None),
                     "section 'ram' appears twice"),
    "foreign vendor": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: m.update(vendor="AuthenticAMD" if m["vendor"] != "AuthenticAMD"
                           else "GenuineIntel"))), "foreign snapshot: taken on a"),
    "foreign cpuid": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: [e.__setitem__(5, 0xFFFFFFFF) for e in m["cpuid"] if e[0] == 1])),
        "CPUID features this host's KVM does not offer"),
    "ram outside guest memory": (lambda blob, d: _rewrite_bytes(blob, d, _ram_outside),
                                 "lies outside guest RAM"),
    "ram claim beyond the host": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: m.update(ram=[[0, 1 << 50]]))), "more than this host's"),
    "unknown section": (lambda blob, d: _rewrite_bytes(
        blob, d, lambda p: p.update(extra=b"x")), "unknown sections extra"),
    "vcpu state missing": (lambda blob, d: _rewrite_bytes(
        blob, d, lambda p: p.pop("vcpu.0")), "'vcpu.0' section is missing"),
    "bad meta": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: m.update(vcpus="two"))), "metadata field 'vcpus'"),
    # finished_vcpus: sorted distinct vCPU indices, never every vCPU
    "every vcpu finished": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: m.update(finished_vcpus=[0]))), "metadata field 'finished_vcpus'"),
    "finished vcpu out of range": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: m.update(vcpus=2, finished_vcpus=[7]))), "metadata field 'finished_vcpus'"),
    "finished vcpus not a list": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: m.update(finished_vcpus="0"))), "metadata field 'finished_vcpus'"),
    "finished vcpu a bool": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: m.update(vcpus=2, finished_vcpus=[True]))), "metadata field 'finished_vcpus'"),
    # a snapshot is data, never a capability: no platform option beyond each machine's
    # whitelist (a disk attaching a host file, Machine's own arguments)
    "option attaching a host file as a disk": (lambda blob, d: _rewrite_bytes(blob, d, _opts(
        disks=["/etc/passwd"])), "name 'disks', which a snapshot may not set"),
    "option clashing with Machine's arguments": (lambda blob, d: _rewrite_bytes(
        blob, d, _opts(kvm=1)), "name 'kvm', which a snapshot may not set"),
    "option of the wrong type": (lambda blob, d: _rewrite_bytes(
        blob, d, _opts(irqchip="yes")), "option 'irqchip' is 'yes'"),
    "unknown machine": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: m["platform"].update(name="zzz"))), "machine 'zzz' is not one"),
    # every decoded structure checked: types, ranges, sizes
    "json nested too deeply": (lambda blob, d: _rewrite_bytes(blob, d, lambda p: p.update(
        devices=b"[" * 100000 + b"]" * 100000)), "nested too deeply"),
    "mem_size KVM would refuse": (lambda blob, d: _rewrite_bytes(blob, d, _cfg(
        mem_size=1 << 46)), "config.mem_size"),
    "mem_size of one byte": (lambda blob, d: _rewrite_bytes(blob, d, _cfg(mem_size=1)),
                             "config.mem_size"),
    "bogus flat_mode": (lambda blob, d: _rewrite_bytes(blob, d, _cfg(flat_mode="zzz")),
                        "config.flat_mode"),
    "negative flat_addr": (lambda blob, d: _rewrite_bytes(blob, d, _cfg(flat_addr=-4096)),
                           "config.flat_addr"),
    "control characters in image_name": (lambda blob, d: _rewrite_bytes(blob, d, _cfg(
        image_name="a\x1b[2Jb\x00")), "config.image_name"),
    "empty cpuid": (lambda blob, d: _rewrite_bytes(blob, d, _meta(
        lambda m: m.update(cpuid=[]))), "metadata field 'cpuid'"),
    "garbage image": (lambda blob, d: _rewrite_bytes(blob, d, _image(b"\x7fELF\xff" +
                      bytes(60))), "does not build a machine: LoadError"),
    "unknown vcpu blob": (lambda blob, d: _rewrite_bytes(blob, d, _vcpu0(
        lambda v: v["blobs"].update(zzz="AAAA"))), "pieces this machine does not have: 'zzz'"),
    "junk msrs": (lambda blob, d: _rewrite_bytes(blob, d, _vcpu0(
        lambda v: v["blobs"].update(msrs=base64.b64encode(bytes(16 * 5000)).decode()))),
        "more than the .* this vCPU's MSR list gives"),
    "vcpu json beyond any real state": (lambda blob, d: _rewrite_bytes(blob, d, _vcpu0(
        lambda v: v.update(pad="A" * (1 << 20)))), "decompresses to more than"),
    "uart fifo count beyond its 16 bytes": (lambda blob, d: _rewrite_bytes(blob, d, _uart(
        uart_rx_count=17)), "uart_rx_count is 17, not 0-16"),
    "uart fifo head beyond its 16 bytes": (lambda blob, d: _rewrite_bytes(blob, d, _uart(
        uart_rx_head=16)), "uart_rx_head is 16, not 0-15"),
}


def _cfg(**change):
    return _meta(lambda m: m["config"].update(change))


def _opts(**change):
    return _meta(lambda m: m["config"]["platform_opts"].update(change))


def _image(data):
    def edit(p):
        p["image"] = data
        m = json.loads(p["meta"])
        m["image_sha256"] = hashlib.sha256(data).hexdigest()
        p["meta"] = json.dumps(m).encode()
    return edit


def _vcpu0(change):
    def edit(p):
        v = json.loads(p["vcpu.0"])
        change(v)
        p["vcpu.0"] = json.dumps(v).encode()
    return edit


def _uart(**change):
    def edit(p):
        d = json.loads(p["devices"])
        d["uart16550"].update(change)
        p["devices"] = json.dumps(d).encode()
    return edit


def _rewrite_bytes(blob, d, change):
    src, dst = os.path.join(d, "src.snap"), os.path.join(d, "dst.snap")
    with open(src, "wb") as f:
        f.write(blob)
    _rewrite(src, dst, change)
    with open(dst, "rb") as f:
        return f.read()


def _duplicate(blob, d, name, change, first=False):
    """``blob`` with a second section ``name`` (its payload with ``change`` applied), before
    the real one when ``first``, else after it; CRCs and digest valid (Writer refuses a name
    twice, so the file is assembled here as a crafter would)."""
    src = os.path.join(d, "src.snap")
    with open(src, "wb") as f:
        f.write(blob)
    secs = snapfile.read(src)
    payloads = {n: s.payload(1 << 30) for n, s in secs.items()}
    copy = dict(payloads)
    change(copy)
    extra = (name, zlib.compress(copy[name]), snapfile.FLAG_ZLIB)
    entries = []
    for n, data in payloads.items():
        own = (n, zlib.compress(data), snapfile.FLAG_ZLIB)
        entries += ([extra, own] if first else [own, extra]) if n == name else [own]
    off = snapfile._HEAD.size + len(entries) * snapfile._ENTRY.size
    table, body = b"", b""
    for n, data, flags in entries:
        table += snapfile._ENTRY.pack(n.encode(), off + len(body), len(data),
                                      zlib.crc32(data), flags)
        body += data
    out = snapfile._HEAD.pack(snapfile.MAGIC, snapfile.FORMAT_VERSION, len(entries)) + \
        table + body
    return out + hashlib.sha256(out).digest()


def _section_offsets(blob):
    n = int.from_bytes(blob[12:16], "little")
    out = {}
    for i in range(n):
        raw, off, length, _, _ = snapfile._ENTRY.unpack_from(blob, snapfile._HEAD.size +
                                                             i * snapfile._ENTRY.size)
        out[raw.rstrip(b"\0").decode()] = (off, length)
    return out


def _refused(path, match, leftovers):
    snap = leftovers()
    with pytest.raises(SnapshotError, match=match) as e:
        Machine.restore(path)
    line = str(e.value)
    assert "\n" not in line and len(line) < 400, line
    assert all(" " <= c <= "~" for c in line), line      # no raw control or U+FFFD
    snap.check()                                  # no fd, VM or thread left behind


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_snapshot_is_refused_in_one_line(tmp_path, good_snapshot, leftovers, case):
    make, match = CASES[case]
    with open(good_snapshot, "rb") as f:
        blob = f.read()
    path = str(tmp_path / "bad.snap")
    with open(path, "wb") as f:
        f.write(make(blob, str(tmp_path)))
    _refused(path, match, leftovers)


def test_a_flipped_byte_in_any_section_is_refused(tmp_path, good_snapshot, leftovers):
    with open(good_snapshot, "rb") as f:
        blob = f.read()
    offsets = _section_offsets(blob)
    assert {"meta", "image", "vm", "vcpu.0", "devices", "ram"} <= set(offsets)
    for name, (off, length) in offsets.items():
        b = bytearray(blob)
        b[off + length // 2] ^= 0x40
        path = str(tmp_path / f"flip-{name}.snap")
        with open(path, "wb") as f:
            f.write(b)
        _refused(path, f"section '{name}' fails its CRC-32", leftovers)


def test_the_good_snapshot_restores_after_all_that(good_snapshot):
    with Machine.restore(good_snapshot) as m:
        r = m.run(timeout=120)
    assert r.exit == "done" and _lines(r.console_text)[-1] == "snap cpu0 done"


def test_cli_refuses_a_bad_snapshot_with_status_2(tmp_path):
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"PYKVMSNP" + (1).to_bytes(4, "little") + bytes(100))
    for path, text in ((str(bad), "corrupted or truncated"),
                       (str(tmp_path / "none.snap"), "no such snapshot file")):
        p = subprocess.run([sys.executable, "-m", "pykvm", "restore", path],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2
        assert p.stderr.count("\n") == 1 and text in p.stderr and "Traceback" not in p.stderr


def test_a_machine_with_a_virtio_device_is_refused_naming_it(tmp_path):
    with Machine(GUEST, machine="pc", rng=True) as m:
        with pytest.raises(SnapshotError, match="VirtioRng"):
            m.snapshot(str(tmp_path / "x.snap"))
    assert not os.path.exists(tmp_path / "x.snap")


def test_a_machine_between_runs_is_snapshotted_as_it_stands(tmp_path):
    """No run in progress: a run stopped mid-way (here as soon as round 100's line is out;
    a run ended by its deadline is the same) leaves the guest where it was, and the snapshot
    taken then continues elsewhere exactly."""
    full = _uninterrupted("bare", 1)
    path = str(tmp_path / "between.snap")
    stop_at_round_100 = ConsoleWatch("cpu0 count=100 ", then=lambda: m.stop("round 100"))
    with Machine(GUEST, machine="bare", on_console=stop_at_round_100) as m:
        r = m.run(timeout=120)
        assert (r.exit, r.detail) == ("stopped", "round 100")
        m.snapshot(path)
        before = m.console.decode()
    assert 0 < len(_lines(before)) < len(_lines(full))
    after, exit_line = _restore_elsewhere(path)
    assert exit_line == "EXIT done 0"
    assert _lines(before) + _lines(after) == _lines(full)


# -- what restore trusts (docs/snapshots.md): hostile files and paths ---------------------------

def test_image_name_is_only_shown_never_opened(tmp_path, good_snapshot):
    """image_name naming a FIFO (an open would block for ever) or the directory '..': the
    restore builds the machine from the image bytes the snapshot carries and the guest runs
    on; image_name is what machine.image_name shows."""
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    for name in (fifo, ".."):
        path = _rewrite(good_snapshot, str(tmp_path / "named.snap"), _cfg(image_name=name))
        with Machine.restore(path) as m:
            assert m.image_name == name
            r = m.run(timeout=120)
        assert r.exit == "done", r.detail


def test_restore_takes_a_path_never_a_file_descriptor(good_snapshot):
    with open(good_snapshot, "rb") as f:
        with pytest.raises(TypeError, match="str or os.PathLike"):
            Machine.restore(f.fileno())
        os.fstat(f.fileno())                      # still open: restore did not close it
        assert f.read(8) == snapfile.MAGIC


def test_a_non_regular_snapshot_file_is_refused_at_once(tmp_path, leftovers):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    _refused(fifo, r"not a regular file \(a FIFO\)", leftovers)
    _refused(str(tmp_path), r"not a regular file \(a directory\)", leftovers)


def test_a_snapshot_is_never_written_over_a_special_file(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    with Machine(GUEST, machine="bare") as m:
        for target in (fifo, str(tmp_path), str(tmp_path / "no" / "x.snap")):
            with pytest.raises(SnapshotError, match="not a regular file|no directory"):
                m.snapshot(target)
    assert os.path.exists(fifo) and not os.path.isfile(fifo)


def test_a_guest_that_has_ended_is_not_snapshotted(tmp_path):
    """Decision (docs/snapshots.md): a guest that reported done (or powered off) has nothing
    left to continue, so snapshot() refuses it in one line instead of writing a file whose
    restore only finishes again. With two vCPUs, the guest has ended once both are done, by
    a run or by steps."""
    with Machine(GUEST, machine="bare") as m:
        assert m.run(timeout=120).exit == "done"
        with pytest.raises(SnapshotError, match=r"its guest has ended \(it reported done\)"):
            m.snapshot(str(tmp_path / "fin.snap"))
    with Machine(GUEST, machine="bare", vcpus=2) as m:
        assert m.step(1, timeout=120).name == "done"
        assert m.step(0, timeout=120).name == "done"
        with pytest.raises(SnapshotError, match="its guest has ended .every vCPU reported done"):
            m.snapshot(str(tmp_path / "fin.snap"))
    assert not os.path.exists(tmp_path / "fin.snap")


def test_a_finished_vcpu_stays_finished_in_a_run_and_across_a_snapshot(tmp_path):
    """One vCPU done while another runs on is not the end of the guest (what CI once met: on a
    loaded host one vCPU's thread finished all 600 rounds before the other printed round 100,
    and the snapshot was refused as "ended"). The snapshot records the finished vCPU; restored
    in another process only the other one runs, its lines going on exactly; and neither a run
    nor a step resumes the finished one past its DONE report (pykvm's guest runtime parks it
    with interrupts off: on the pc machine a resumed vCPU would halt for ever)."""
    full = _uninterrupted("bare", 2)
    path = str(tmp_path / "half.snap")
    with Machine(GUEST, machine="bare", vcpus=2) as m:
        assert m.step(1, timeout=120).name == "done"
        exits = m.loops[1].exits_total
        assert m.step(0, timeout=120, budget=20).kind == "budget"   # 20 prints: round 200
        assert m.finished_vcpus == {1}
        m.snapshot(path)
        before = m.console.decode()
        assert m.step(1, timeout=10).name == "done"
        assert m.loops[1].exits_total == exits                       # not resumed
        r = m.run(timeout=120)
        assert r.exit == "done", r.detail
        assert m.loops[1].exits_total == exits
        assert _lines(r.console_text, 0) == _lines(full, 0)
    assert _lines(before, 1) == _lines(full, 1)
    b = _lines(before, 0)
    assert b == _lines(full, 0)[:20]
    with Machine.restore(path) as m2:
        assert m2.finished_vcpus == {1}
    assert _vcpu_states(path) and snapmod.Plan(path).meta["finished_vcpus"] == [1]
    after, exit_line = _restore_elsewhere(path)
    assert exit_line == "EXIT done 0"
    assert _lines(after, 1) == []
    assert b + _lines(after, 0) == _lines(full, 0)


def test_reset_returns_the_finished_vcpus_of_its_checkpoint():
    """Machine.reset() (docs/reset.md) brings back the set of finished vCPUs the checkpoint
    had: none before any vCPU reported done (so both run again, to the same lines), {1} for a
    checkpoint taken after vCPU 1's DONE (vCPU 1 then stays parked)."""
    with Machine(GUEST, machine="bare", vcpus=2) as m:
        m.checkpoint()
        first = m.run(timeout=120)
        assert first.exit == "done" and m.finished_vcpus == {0, 1}
        m.reset()
        assert m.finished_vcpus == set()
        again = m.run(timeout=120)
        assert again.exit == "done"
        for cpu in (0, 1):
            assert _lines(again.console_text, cpu) == _lines(first.console_text, cpu)
        m.reset()
        assert m.step(1, timeout=120).name == "done"
        m.checkpoint()
        exits = m.loops[1].exits_total
        assert m.run(timeout=120).exit == "done"
        m.reset()
        assert m.finished_vcpus == {1}
        r = m.run(timeout=120)
        assert r.exit == "done" and m.loops[1].exits_total == exits
        assert _lines(r.console_text, 0) == _lines(first.console_text, 0)


def test_two_vcpu_threads_snapshot_from_their_callbacks_at_once(tmp_path):
    """Each vCPU's thread, in the console callback of its own round-100 line, snapshots the
    running machine, both at the same moment (a barrier): one block waits for the other, and
    the other's hold counts the waiting thread's vCPU as held (it is out of KVM_RUN, in its
    callback). Before, each waited for the other's vCPU until its 10 s ran out (Busy). Both
    snapshots restore and run to the end."""
    barrier = threading.Barrier(2, timeout=60)
    errors, paths = [], {}

    def at_round_100(cpu):
        def then():
            try:
                barrier.wait()
                paths[cpu] = str(tmp_path / f"cpu{cpu}.snap")
                m.snapshot(paths[cpu])
            except Exception as e:  # noqa: BLE001 — asserted below, not raised in the vCPU
                errors.append((cpu, e))
        return ConsoleWatch(f"cpu{cpu} count=100 ", then=then)

    watches = [at_round_100(0), at_round_100(1)]
    with Machine(GUEST, machine="bare", vcpus=2,
                 on_console=lambda d: [w(d) for w in watches]) as m:
        m.set_params(0, 0, 2)
        r = m.run(timeout=120)
    assert not errors, errors
    assert r.exit == "done", r.detail
    for cpu in (0, 1):
        with Machine.restore(paths[cpu]) as m2:
            assert m2.run(timeout=120).exit == "done"


def test_a_version_1_snapshot_is_still_read(tmp_path, good_snapshot):
    """Format version 2 added meta.finished_vcpus; a version 1 file (no such field: no vCPU
    had finished) restores and runs to the end."""
    path = _rewrite(good_snapshot, str(tmp_path / "v1.snap"),
                    _meta(lambda m: (m.pop("finished_vcpus"), m.update(format=1))))
    with open(path, "rb") as f:
        blob = _header(f.read(), version=1)
    with open(path, "wb") as f:
        f.write(blob)
    with Machine.restore(path) as m:
        assert m.finished_vcpus == set()
        r = m.run(timeout=120)
    assert r.exit == "done" and _lines(r.console_text)[-1] == "snap cpu0 done"


def _cli(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "pykvm", *argv], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("value", ["nan", "inf", "1e308", "-1"])
def test_cli_restore_timeout_is_checked_as_run_does(good_snapshot, value):
    p = _cli("restore", good_snapshot, "--timeout", value)
    assert p.returncode == 2, p.stderr
    assert "not a number of seconds" in p.stderr and "Traceback" not in p.stderr


def test_cli_bad_snapshot_arguments_are_refused_before_the_guest_runs(tmp_path):
    """A --snapshot path in a missing directory, a directory, an empty path; --snapshot-at
    beyond any deadline; a huge console: TEXT — one short line and status 2, and the guest
    never started (no console output)."""
    cases = [
        (["--snapshot", str(tmp_path / "no" / "x.snap"), "--snapshot-at", "1s"], "no directory"),
        (["--snapshot", str(tmp_path), "--snapshot-at", "1s"], "not a regular file"),
        (["--snapshot", "", "--snapshot-at", "1s"], "bad snapshot path"),
        # a directory in which no file can be made: refused now, not after the run
        (["--snapshot", "/proc/x.snap", "--snapshot-at", "0.1s"],
         "cannot write the snapshot '/proc/x.snap': No such file or directory"),
        (["--snapshot", "/sys/kernel/x.snap", "--snapshot-at", "0.1s"],
         "cannot write the snapshot '/sys/kernel/x.snap': "),
        (["--snapshot", str(tmp_path / "x.snap"), "--snapshot-at", "1e308"],
         "seconds must be a number from 0 to"),
        (["--snapshot", str(tmp_path / "x.snap"), "--snapshot-at", "1e20s"],
         "seconds must be a number from 0 to"),
        (["--snapshot", str(tmp_path / "x.snap"), "--snapshot-at", "console:" + "A" * 100000],
         "TEXT is 100000 bytes"),
    ]
    for extra, text in cases:
        p = _cli("run", GUEST, "--no-input", *extra)
        assert p.returncode == 2, (extra[:3], p.stderr[-300:])
        assert p.stderr.count("\n") == 1 and text in p.stderr, p.stderr[-300:]
        assert len(p.stderr) < 400 and p.stdout == ""


def test_cli_restore_says_what_a_non_regular_path_is(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    for path, text in ((fifo, "not a regular file (a FIFO)"),
                       (str(tmp_path), "not a regular file (a directory)"),
                       ("/dev/zero", "not a regular file (a device)")):
        p = _cli("restore", path)
        assert p.returncode == 2 and text in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_cli_refuses_a_crafted_option_with_status_2(tmp_path, good_snapshot):
    path = _rewrite(good_snapshot, str(tmp_path / "disk.snap"), _opts(disks=["/etc/passwd"]))
    p = _cli("restore", path)
    assert p.returncode == 2 and "may not set" in p.stderr and p.stderr.count("\n") == 1


def test_an_unwritable_target_is_a_snapshot_error_and_the_machine_runs_on(tmp_path):
    """Machine.snapshot() into a directory that takes no new file (/proc) raises SnapshotError
    naming the path and the error, before the machine is paused; the machine runs on and a
    snapshot to a good path works."""
    with Machine(GUEST, machine="bare") as m:
        m.run(timeout=0.05)
        with pytest.raises(SnapshotError, match="cannot write the snapshot '/proc/x.snap': "
                                                "No such file or directory") as e:
            m.snapshot("/proc/x.snap")
        assert "\n" not in str(e.value)
        assert m.snapshot(str(tmp_path / "ok.snap")) > 0
        assert m.run(timeout=120).exit == "done"


def test_an_image_larger_than_what_restore_accepts_is_not_snapshotted(tmp_path):
    """The image a snapshot carries may be no larger than the guest RAM (restore bounds it so,
    docs/snapshots.md "Sizes"): an ELF padded past the RAM size boots, but snapshot() refuses
    it in one line instead of writing a file restore would refuse."""
    with open(guests.path(GUEST), "rb") as f:
        image = f.read()
    mem = 16 << 20
    padded = tmp_path / "padded.elf"
    padded.write_bytes(image + bytes(mem + 4096 - len(image)))
    with Machine(str(padded), machine="bare", mem_size=mem) as m:
        m.run(timeout=0.05)
        with pytest.raises(SnapshotError, match=f"its image is {mem + 4096} bytes, more than "
                                                f"the guest RAM size \\({mem} bytes\\)"):
            m.snapshot(str(tmp_path / "big.snap"))
    assert not os.path.exists(tmp_path / "big.snap")
