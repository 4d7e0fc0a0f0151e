"""The host side of the labs' disk benchmark (pykvm/lab/blkbench.py): reading blkbench.c's lines,
the side-by-side table and ratios, QEMU's arguments; and blkbench.c itself on a regular file."""
import subprocess

import pytest

from pykvm.lab import blkbench
from pykvm.lab.rootfs import BLKBENCH_SOURCE, blkbench_compiler


def test_parse_takes_only_whole_well_formed_lines():
    good = "blkbench seq-read-1m bytes=2097152 ops=2 seconds=0.500000"
    got = blkbench.parse([(0.0, good), (1.0, "P " + good.replace("seq-read", "seq-write"))])
    assert set(got) == {"seq-read-1m", "seq-write-1m"}
    assert got["seq-read-1m"].mib_s == 4.0 and got["seq-read-1m"].iops == 4.0
    for bad in ("blkbench seq-read-1m bytes=x ops=1 seconds=1", "blkbench a bytes=1 ops=1 seconds=1.2.3",
                "blkbench a bytes=1 ops=1 seconds=1e-3", "blkbench a bytes=1 ops=1 seconds=1.0garbage",
                "blkbench a bytes=1 ops=1 seconds=0.0", "blkbench a bytes=1 ops=0 seconds=1.0",
                "blkbench a bytes=1 ops=1"):
        assert blkbench.parse([(0.0, bad)]) == {}, bad


def test_unparsed_names_the_guest_programs_other_lines():
    console = "\n".join((
        "[    1.0] Kernel command line: console=ttyS0 pykvm.netbench=user,52:54:00:12:34:56,dhcp",
        "pykvm-linux-guest: netbench user-tx bytes=10 ops=1 seconds=1.000000",
        "netbench: read: Connection reset by peer",
        "pykvm-linux-guest: netbench user failed",
        "pykvm-linux-guest: netbench user-rr bytes=9 ops=9 sec[    3.2] rcu: INFO: stall",
        "onds=1.000000",
        "pykvm-linux-guest: netbench tap-rx bytes=0 ops=0 seconds=0.000400",
    ))
    assert blkbench.unparsed(console, "netbench") == [
        "netbench: read: Connection reset by peer", "pykvm-linux-guest: netbench user failed",
        "pykvm-linux-guest: netbench user-rr bytes=9 ops=9 sec[    3.2] rcu: INFO: stall",
        "pykvm-linux-guest: netbench tap-rx bytes=0 ops=0 seconds=0.000400"]
    assert blkbench.unparsed(console, "blkbench") == []


def test_table_and_ratios():
    p = blkbench.parse([(0, "blkbench seq-read-1m bytes=2097152 ops=2 seconds=1.0")])
    q = blkbench.parse([(0, "blkbench seq-read-1m bytes=1048576 ops=1 seconds=1.0")])
    assert blkbench.ratios(p, q) == {"seq-read-1m": 2.0}
    rows = blkbench.table(p, q)
    assert "missing" in rows[1] and rows[2].split()[-1] == "2.00"     # seq-write, seq-read
    assert len(blkbench.table({}, {})) == 1 + len(blkbench.PHASES)


def test_qemu_arguments_escape_commas_and_name_only_known_arches():
    argv = blkbench.qemu_argv("x86_64", "K", "I", cmdline="c", mem="256M",
                              disks=[("/tmp/a,b.img", None), ("/tmp/b.img", "s")])
    assert "file=/tmp/a,,b.img,format=raw,if=none,id=d0,cache=writeback,aio=threads" in argv
    assert "virtio-blk-pci,disable-legacy=on,drive=d1,serial=s" in argv
    assert "virt,aia=aplic-imsic" in blkbench.qemu_argv("riscv64", "K", "I", cmdline="", mem="1G", disks=[])
    with pytest.raises(ValueError, match="aarch64"):
        blkbench.qemu_argv("aarch64", "K", "I", cmdline="", mem="1G", disks=[])


def test_the_guest_program_on_a_file(tmp_path):
    cc = blkbench_compiler("x86_64")
    if cc is None:
        pytest.skip("no C compiler for this host's arch")
    exe = tmp_path / "blkbench"
    subprocess.run([cc, "-O2", "-static", "-o", str(exe), str(BLKBENCH_SOURCE)], check=True)
    img = tmp_path / "b.img"
    img.write_bytes(bytes(4 << 20))
    r = subprocess.run([str(exe), str(img), "0.05", "M:"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    marks = [(0.0, line.split("M:", 1)[1]) for line in r.stdout.splitlines()]
    assert set(blkbench.parse(marks)) == set(blkbench.PHASES)
    small = tmp_path / "s.img"
    small.write_bytes(bytes(8192))
    for args, rc, msg in (([], 2, "usage"), ([str(img), "0.1x"], 2, "SECONDS"),
                          ([str(img), "0"], 2, "SECONDS"), ([str(small), "0.1"], 1, "8192 bytes"),
                          ([str(tmp_path / "none"), "1"], 1, "No such file")):
        r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == rc and msg in r.stderr and len(r.stderr.splitlines()) == 1, (args, r)


def test_write_part_is_atomic(tmp_path):
    import gzip

    from pykvm.lab.initramfs import write_part
    out = tmp_path / "part.cpio.gz"

    def broken(w):
        w.dir("lab")
        raise RuntimeError("half-way")
    with pytest.raises(RuntimeError):
        write_part(out, broken)
    assert list(tmp_path.iterdir()) == []                  # neither the part nor a temporary
    write_part(out, lambda w: w.file("lab/x", b"hello"))
    data = gzip.decompress(out.read_bytes())
    assert data.startswith(b"070701") and b"lab/x" in data and b"TRAILER!!!" in data


def test_combine_sums_runs_and_drops_a_phase_one_run_lacks():
    a = blkbench.parse([(0, "blkbench seq-read-1m bytes=1048576 ops=1 seconds=1.0"),
                        (0, "blkbench rand-read-4k bytes=4096 ops=1 seconds=1.0")])
    b = blkbench.parse([(0, "blkbench seq-read-1m bytes=3145728 ops=3 seconds=1.0")])
    both = blkbench.combine([a, b])
    assert set(both) == {"seq-read-1m"} and both["seq-read-1m"].mib_s == 2.0
    assert blkbench.combine([]) == {}


def test_report_records_the_figures_and_names_a_lost_phase_with_the_guests_lines(capsys):
    from pykvm.lab.linux_guest import MARK, GuestRun

    def run(*lines):
        console = "\n".join(f"{MARK} {t}" if t.startswith("netbench ") else t for t in lines)
        marks = [(0.0, t) for t in lines if t.startswith("netbench ")]
        return GuestRun(["vmm"], 0, console, marks, 1.0)
    whole = run("netbench a bytes=1048576 ops=1 seconds=1.0", "netbench b bytes=2 ops=2 seconds=1.0")
    broken = run("netbench a bytes=1048576 ops=1 seconds=1.0", "netbench: read: Connection reset by peer")
    props = {}

    def cmp_of(qemu_run):
        return blkbench.Comparison([whole], [qemu_run],
                                   blkbench.combine([blkbench.parse(whole.marks, "netbench")], ("a", "b")),
                                   blkbench.combine([blkbench.parse(qemu_run.marks, "netbench")], ("a", "b")),
                                   kind="net", phases=("a", "b"), program="netbench", by_ops=("b",))
    blkbench.report(cmp_of(whole), props.__setitem__, title="T")
    assert props and "T" in capsys.readouterr().out
    with pytest.raises(AssertionError) as ei:
        blkbench.report(cmp_of(broken), props.__setitem__, title="T")
    msg = str(ei.value)                                   # (pytest indents its lines)
    assert msg.startswith("QEMU: no result for b (exit 0); the guest's other netbench lines:"), msg
    said = msg.split("other netbench lines:", 1)[1].split("console tail:", 1)[0]
    assert said.split() == "netbench: read: Connection reset by peer".split(), msg
    assert "\n  netbench: read: Connection reset by peer" in capsys.readouterr().out
