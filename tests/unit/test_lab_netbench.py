"""The host side of the labs' network and share benchmark (pykvm/lab/netbench.py): netbench.c
built for this host against the real :class:`Server` over loopback and on a real directory, its
lines parsed and combined with blkbench.py's machinery, the table and ratios (round trips and
files compared per second), QEMU's device arguments, and the ABBA boot order."""
import re
import socket
import subprocess
import time

import pytest

from pykvm.lab import blkbench, netbench
from pykvm.lab.rootfs import NETBENCH_SOURCE, blkbench_compiler
from pykvm.testing import wait_until


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    cc = blkbench_compiler("x86_64")
    if cc is None:
        pytest.skip("no C compiler for this host's arch")
    out = tmp_path_factory.mktemp("nb") / "netbench"
    subprocess.run([cc, "-O2", "-static", "-Wall", "-Werror", "-o", str(out), str(NETBENCH_SOURCE)],
                   check=True)
    return out


def marks(stdout: str):
    return [(0.0, line.split("M:", 1)[1]) for line in stdout.splitlines() if "M:" in line]


def test_tcp_phases_against_the_host_server(exe):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    with netbench.Server(s) as srv:
        r = subprocess.run([str(exe), "tcp", "127.0.0.1", str(srv.port), "0.2", "M:", "user"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = blkbench.parse(marks(r.stdout), netbench.PROGRAM)
    assert set(got) == {"user-tx", "user-rx", "user-rr"}
    assert srv.served == {"T": 1, "R": 1, "P": 1}
    assert got["user-tx"].bytes >= 64 << 10           # the host's count of what arrived
    assert got["user-rr"].bytes == got["user-rr"].ops > 0
    assert blkbench.parse(marks(r.stdout)) == {}      # blkbench's lines only for "blkbench"


class ResetsRoundTrips(netbench.Server):
    """The benchmark's server, but the first ``resets`` round-trip connections are reset at once."""
    resets = 1

    def _serve(self, conn):
        if conn.recv(1, socket.MSG_PEEK) == b"P" and self.resets > 0:
            self.resets -= 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            conn.close()                                  # RST
            return
        super()._serve(conn)


@pytest.mark.parametrize("resets", [1, 2])
def test_a_broken_phase_is_said_and_run_once_more(exe, resets):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    with ResetsRoundTrips(s) as srv:
        srv.resets = resets
        r = subprocess.run([str(exe), "tcp", "127.0.0.1", str(srv.port), "0.2", "M:", "user"],
                           capture_output=True, text=True, timeout=60)
    said = r.stderr.splitlines()
    assert re.fullmatch(r"netbench: user-rr: (read|write): .+ \(after 0 ops\); once more", said[0]), said
    got = blkbench.parse(marks(r.stdout), netbench.PROGRAM)
    if resets == 1:
        assert r.returncode == 0 and len(said) == 1, r.stderr
        assert set(got) == {"user-tx", "user-rx", "user-rr"} and srv.served["P"] == 1
    else:                                                 # a second break ends it, as before
        assert r.returncode == 1 and set(got) == {"user-tx", "user-rx"}
        assert re.fullmatch(r"netbench: (read|write): .+", said[1]) and len(said) == 2, said


@pytest.fixture(scope="module")
def exe_stall2(tmp_path_factory):
    """netbench.c built with a connection taken as stalled after 2 s without progress (60 s in
    the labs' build)."""
    cc = blkbench_compiler("x86_64")
    if cc is None:
        pytest.skip("no C compiler for this host's arch")
    out = tmp_path_factory.mktemp("nb2") / "netbench"
    subprocess.run([cc, "-O2", "-static", "-Wall", "-Werror", "-DSTALL=2", "-o", str(out),
                    str(NETBENCH_SOURCE)], check=True)
    return out


class Hostile(netbench.Server):
    """The benchmark's server gone wrong for one phase (``kind``, its first byte): ``fin-rst``
    closes its end, then resets; ``silent`` holds the connection and does nothing; ``empty``
    closes at once (no byte of rx)."""
    kind, how = "T", "fin-rst"

    def _serve(self, conn):
        if conn.recv(1, socket.MSG_PEEK) != self.kind.encode():
            return super()._serve(conn)
        conn.recv(1)
        if self.how == "fin-rst":
            conn.shutdown(socket.SHUT_WR)
            time.sleep(0.05)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        elif self.how == "silent":
            self._conns.append(conn)                      # closed by __exit__
            return
        conn.close()


@pytest.mark.parametrize("kind,how,phase", [
    ("T", "fin-rst", "tx"), ("P", "fin-rst", "rr"),          # a write to a peer gone: no SIGPIPE death
    ("T", "silent", "tx"), ("R", "silent", "rx"), ("P", "silent", "rr"),   # no progress: bounded
    ("R", "empty", "rx"),                                      # an rx phase of no byte is broken
])
def test_a_hostile_host_ends_the_program_with_its_lines(exe_stall2, kind, how, phase):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    with Hostile(s) as srv:
        srv.kind, srv.how = kind, how
        r = subprocess.run([str(exe_stall2), "tcp", "127.0.0.1", str(srv.port), "0.2", "M:", "user"],
                           capture_output=True, text=True, timeout=60)
    said = r.stderr.splitlines()
    assert r.returncode == 1 and len(said) == 2, (r.returncode, said)
    assert re.fullmatch(rf"netbench: user-{phase}: .+; once more", said[0]), said
    assert said[1].startswith("netbench: ") and "once more" not in said[1], said
    if how == "silent":
        assert said[1].endswith("no progress for 2 s"), said
    got = blkbench.parse(marks(r.stdout), netbench.PROGRAM)
    assert f"user-{phase}" not in got and all(p.ops > 0 for p in got.values())


def test_server_names_a_connection_that_was_reset():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    with netbench.Server(s) as srv:
        assert srv.faults == []
        c = socket.create_connection(("127.0.0.1", srv.port))
        c.sendall(b"Pab")
        assert c.recv(2, socket.MSG_WAITALL) == b"ab"
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")   # close = RST
        c.close()
        wait_until(lambda: srv.faults, "the server's note of the reset")
    assert len(srv.faults) == 1 and srv.faults[0].startswith("P ended after 2 bytes: ConnectionResetError")


def test_share_phases_on_a_directory(exe, tmp_path):
    share = netbench.make_share(tmp_path / "share")
    r1 = subprocess.run([str(exe), "read", str(share / "big.bin"), "30", "M:", "fs"],
                        capture_output=True, text=True, timeout=60)
    r2 = subprocess.run([str(exe), "files", str(share / "small"), "M:", "fs"],
                        capture_output=True, text=True, timeout=60)
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr, r2.stderr)
    got = blkbench.parse(marks(r1.stdout + r2.stdout), netbench.PROGRAM)
    assert got["fs-read-1m"].bytes == netbench.BIG_MIB << 20 and got["fs-read-1m"].ops == netbench.BIG_MIB
    assert got["fs-files-4k"].ops == netbench.SMALL_FILES
    assert got["fs-files-4k"].bytes == 4096 * netbench.SMALL_FILES


def test_bad_command_lines_give_one_line(exe, tmp_path):
    for args, rc, msg in (([], 2, "usage"), (["tcp", "h", "1", "1", "M", "L"], 2, "IPv4"),
                          (["tcp", "127.0.0.1", "0", "1", "M", "L"], 2, "PORT"),
                          (["read", str(tmp_path / "none"), "1", "M", "L"], 1, "No such file"),
                          (["read", "x", "0", "M", "L"], 2, "SECONDS"),
                          (["files", str(tmp_path / "none"), "M", "L"], 1, "No such file")):
        r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == rc and msg in r.stderr and len(r.stderr.splitlines()) == 1, (args, r)


def test_combine_table_and_ratios_by_rate_or_by_ops():
    def run(tx_bytes, rr_ops):
        return blkbench.parse([(0, f"netbench user-tx bytes={tx_bytes} ops=4 seconds=1.0"),
                               (0, f"netbench user-rr bytes={rr_ops} ops={rr_ops} seconds=1.0")], "netbench")
    p = blkbench.combine([run(4 << 20, 300), run(2 << 20, 100)], netbench.PHASES)
    q = blkbench.combine([run(3 << 20, 100), run(3 << 20, 100)], netbench.PHASES)
    assert p["user-tx"].mib_s == 3.0 and p["user-rr"].iops == 200.0
    assert blkbench.ratios(p, q, netbench.PHASES, netbench.BY_OPS) == {"user-tx": 1.0, "user-rr": 2.0}
    rows = blkbench.table(p, q, netbench.PHASES, netbench.BY_OPS)
    assert len(rows) == 1 + len(netbench.PHASES)
    assert rows[1].split()[-1] == "1.00" and rows[3].split()[-1] == "2.00"    # tx, rr
    assert "missing" in rows[2]                                                # rx
    cmp = blkbench.Comparison([], [], p, q, "net", netbench.PHASES, "netbench", netbench.BY_OPS)
    props = cmp.properties()
    assert props["ratio_net_user-rr"] == 2.0 and props["bench_net_user-rr"].startswith("pykvm 200/s")
    assert set(props) == {"bench_net_user-tx", "ratio_net_user-tx", "bench_net_user-rr", "ratio_net_user-rr"}


def test_abba_order_and_run_abba_combines_per_vmm(tmp_path):
    from pykvm.lab.linux_guest import GuestRun
    assert blkbench.abba(2) == ["pykvm", "qemu", "qemu", "pykvm"]
    with pytest.raises(ValueError):
        blkbench.abba(0)
    seen = []

    def boot(vmm, d):
        seen.append((vmm, d.name))
        ops = 30 if vmm == "pykvm" else 10
        return GuestRun([vmm], 0, "", [(1.0, f"netbench fs-files-4k bytes={ops * 4096} ops={ops} seconds=1.0")])
    cmp = blkbench.run_abba(boot, tmp_path, 2, kind="net", phases=netbench.PHASES, program="netbench",
                            by_ops=netbench.BY_OPS)
    assert seen == [("pykvm", "0-pykvm"), ("qemu", "1-qemu"), ("qemu", "2-qemu"), ("pykvm", "3-pykvm")]
    assert cmp.properties()["ratio_net_fs-files-4k"] == 3.0


def test_qemu_device_arguments():
    x86 = netbench.qemu_devices("x86_64", mem="256M", passt_fd=7, tap="t0", macs=("m0", "m1"),
                                share_sock="/s,ock")
    assert "stream,id=n0,server=off,addr.type=fd,addr.str=7" in x86
    assert "virtio-net-pci,disable-legacy=on,romfile=,netdev=n1,mac=m1" in x86
    assert "tap,id=n1,ifname=t0,script=no,downscript=no" in x86
    assert f"vhost-user-fs-pci,chardev=c0,tag={netbench.TAG}" in x86
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in x86
    assert "socket,id=c0,path=/s,,ock" in x86                   # QEMU's option syntax
    rv = netbench.qemu_devices("riscv64", mem="256M", passt_fd=7, tap="t0", macs=("m0", "m1"), share_sock="s")
    assert f"vhost-user-fs-device,chardev=c0,tag={netbench.TAG}" in rv
    with pytest.raises(ValueError, match="aarch64"):
        netbench.qemu_devices("aarch64", mem="1G", passt_fd=7, tap="t", macs=("a", "b"), share_sock="s")
