"""Network and shared-directory throughput inside a lab's Linux guest: pykvm against QEMU
``-accel kvm`` with the same backends (issue 20's benchmark), on :mod:`pykvm.lab.blkbench`'s
machinery (boot order, combining, table, ratios, JUnit properties).

Each boot (pykvm, QEMU, QEMU, pykvm: :func:`blkbench.abba`) runs the root-disk guest with one
vCPU, the same memory size and, on the same transport as the disk benchmark (virtio-pci on x86,
virtio-mmio on RISC-V):

* a NIC on **user-mode networking**: passt for both (``pykvm run --net user``; QEMU
  ``-netdev stream,addr.type=fd`` on one end of a socket pair whose other end a passt of ours
  holds as ``--fd``, which is how pykvm talks to it too). The guest takes its address by DHCP and
  reaches the host's 127.0.0.1 through the gateway passt gave it;
* a NIC on a **tap** (``pykvm run --net tap,ifname=``; QEMU ``-netdev tap,ifname=,script=no``),
  moved while the guest boots into a network namespace the test makes
  (:class:`linux_guest.TapNamespace`), with the host end's address; the guest takes
  :data:`TAP_GUEST`;
* a **virtio-fs share** of one directory served by the lab's virtiofsd with ``--cache=auto``
  (``pykvm run --share DIR,tag=``; QEMU ``vhost-user-fs-pci`` / ``vhost-user-fs-device`` on a
  virtiofsd ``--socket-path``, guest RAM a shared memfd in both).

Words on the kernel command line (``pykvm.netbench=LABEL,MAC,ADDR,HOST,PORT``,
``pykvm.fsbench=TAG``, ``pykvm.benchsecs=S``) make the root's init run ``/usr/bin/netbench``
(``pykvm/lab/netbench.c``): per NIC, TCP guest→host (``LABEL-tx``), host→guest (``LABEL-rx``) and
1-byte request/response round trips (``LABEL-rr``) against a :class:`Server` of this module, each
for S seconds; on the share, after dropping the guest's caches, a sequential read of
:data:`BIG_MIB` MiB in 1 MiB reads (``fs-read-1m``, at most S seconds) and the reading of
:data:`SMALL_FILES` files of 4 KiB (``fs-files-4k``). Ratios pykvm / QEMU: above 1 is pykvm
better; round trips and files are compared per second.

Runs inside the lab on the standard library (and pyroute2 for the tap's namespace).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from . import blkbench, linux_guest

PROGRAM = "netbench"
LABELS = ("user", "tap")
PHASES = tuple(f"{label}-{p}" for label in LABELS for p in ("tx", "rx", "rr")) + ("fs-read-1m", "fs-files-4k")
BY_OPS = ("user-rr", "tap-rr", "fs-files-4k")      # compared by round trips / files per second
TAG = "benchfs"                          # the share's virtio-fs tag
BIG_MIB = 32                             # the share's big file
SMALL_FILES = 256                        # and its 4 KiB files
TAP_HOST, TAP_GUEST = "10.79.0.1", "10.79.0.2/24"
CHUNK = 256 << 10


class Server:
    """The host end of netbench.c's TCP phases on the listening-ready socket ``sock`` (bound, not
    listening): a thread accepts connections and serves each in a thread of its own by its first
    byte: ``T`` read to the end, then answer with the count (8 bytes, big-endian); ``R`` write
    until the peer goes; ``P`` echo each byte. :attr:`served` counts the connections by that byte;
    :attr:`faults` says how each connection that did not end as its phase ends went (``P`` reset
    after 12 echoes: ConnectionResetError ...), for a failed benchmark's report.
    Use as a context manager; :attr:`port` is where it listens."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.listen(8)
        self.port = sock.getsockname()[1]
        self.served: dict[str, int] = {}
        self.faults: list[str] = []
        self._conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=10)
        for conn in self._conns:             # wakes a thread still writing to a guest that went
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        kind, count = "?", 0
        with conn:
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                what = conn.recv(1)
                if not what:
                    return
                kind = what.decode("latin-1")
                self.served[kind] = self.served.get(kind, 0) + 1
                if kind == "T":
                    buf = bytearray(CHUNK)
                    while n := conn.recv_into(buf):
                        count += n
                    conn.sendall(count.to_bytes(8, "big"))
                elif kind == "R":
                    data = bytes(CHUNK)
                    while True:
                        conn.sendall(data)
                        count += len(data)
                elif kind == "P":
                    while b := conn.recv(1):
                        conn.sendall(b)
                        count += 1
            except OSError as e:
                if kind != "R" and not self._stop:    # R ends so: the guest closes mid-stream
                    self.faults.append(f"{kind} ended after {count} bytes: {type(e).__name__}: {e}")


def make_share(directory: Path) -> Path:
    """``directory`` with ``big.bin`` (:data:`BIG_MIB` MiB, every block written) and ``small/``
    (:data:`SMALL_FILES` files of 4 KiB): what the guest reads."""
    directory.mkdir(parents=True, exist_ok=True)
    blkbench.make_disk(directory / "big.bin", BIG_MIB)
    small = directory / "small"
    small.mkdir(exist_ok=True)
    for i in range(SMALL_FILES):
        (small / f"f{i:04d}").write_bytes(bytes([i & 0xFF]) * 4096)
    os.chmod(directory, 0o755)
    return directory


def mac(i: int) -> str:
    """A locally chosen MAC (QEMU's 52:54:00 prefix, two random bytes) ending in ``i``."""
    return f"52:54:00:{secrets.token_hex(1)}:{secrets.token_hex(1)}:{i:02x}"


def qemu_devices(arch: str, *, mem: str, passt_fd: int, tap: str, macs, share_sock) -> list[str]:
    """QEMU's arguments for the benchmark's devices (module docstring), after
    :func:`blkbench.qemu_argv`'s: guest RAM a shared memfd of ``mem``, the user-mode NIC on the
    connected socket ``passt_fd`` (``macs[0]``), the tap NIC on ``tap`` (``macs[1]``), the share
    on the vhost-user socket ``share_sock``."""
    if arch in ("x86_64", "amd64"):
        # romfile=: no option ROM (pykvm's NIC has none; the lab's QEMU carries no efi-virtio.rom)
        net, fs = "virtio-net-pci,disable-legacy=on,romfile=", "vhost-user-fs-pci"
    elif arch == "riscv64":
        net, fs = "virtio-net-device", "vhost-user-fs-device"
    else:
        raise ValueError(f"no QEMU machine for arch {arch!r} (x86_64, amd64, riscv64)")
    return ["-object", f"memory-backend-memfd,id=mem,size={mem},share=on", "-machine", "memory-backend=mem",
            "-netdev", f"stream,id=n0,server=off,addr.type=fd,addr.str={passt_fd}",
            "-device", f"{net},netdev=n0,mac={macs[0]}",
            "-netdev", f"tap,id=n1,ifname={tap},script=no,downscript=no",
            "-device", f"{net},netdev=n1,mac={macs[1]}",
            "-chardev", "socket,id=c0,path=" + str(share_sock).replace(",", ",,"), "-device", f"{fs},chardev=c0,tag={TAG}"]


def _stop(proc) -> None:
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()


def _qemu_backends(d: Path, share: Path, env):
    """passt on one end of a socket pair (returns the other end) and virtiofsd listening on
    ``d/fs.sock``, for a QEMU boot: (passt, virtiofsd, QEMU's socket). Raises RuntimeError
    when virtiofsd's socket does not appear."""
    path = (env or os.environ).get("PATH")
    passt = shutil.which("passt", path=path)
    virtiofsd = shutil.which("virtiofsd")
    if passt is None or virtiofsd is None:
        raise RuntimeError("passt or virtiofsd missing")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pp = subprocess.Popen([passt, "--foreground", "--quiet", "--one-off", "--fd", str(theirs.fileno())],
                          pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    theirs.close()
    sock = d / "fs.sock"
    vp = subprocess.Popen([virtiofsd, f"--socket-path={sock}", f"--shared-dir={share}", "--sandbox=namespace",
                           "--cache=auto", "--log-level=warn"], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if time.monotonic() > deadline or vp.poll() is not None:
            _stop(pp)
            _stop(vp)
            ours.close()
            raise RuntimeError(f"virtiofsd did not make {sock} (exit {vp.poll()})")
        time.sleep(0.05)
    return pp, vp, ours


def compare(kernel, initrd, root_img, workdir, *, arch: str, cmdline: str, seconds: float = 1.0,
            rounds: int = 2, mem: str = "256M", timeout: float = 240.0, echo=None) -> blkbench.Comparison:
    """Boot the root-disk guest ``2 * rounds`` times (:func:`blkbench.run_abba`) with both NICs
    and the share (module docstring), each phase for ``seconds``. Raises RuntimeError when this
    lab boot carries no QEMU, ValueError for ``rounds`` < 1."""
    qemu = blkbench.inner_qemu()
    if qemu is None:
        raise RuntimeError(f"no QEMU in this lab boot ({blkbench.QEMU_DIR})")
    workdir = Path(workdir)
    share = make_share(workdir / "share")
    wrappers = workdir / "bin"
    wrappers.mkdir(exist_ok=True)
    env = linux_guest.passt_env(wrappers)

    def boot(vmm: str, d: Path) -> linux_guest.GuestRun:
        root = linux_guest.copy_root(Path(root_img), d)
        tag = f"{os.getpid() % 10000}{secrets.token_hex(2)}"
        tap, macs = f"pkvmbt{tag}", (mac(1), mac(2))
        with linux_guest.passt_template() as gw, linux_guest.TapNamespace(f"pkvmbn{tag}", TAP_HOST) as ns:
            tsock = ns.socket()
            tsock.bind((TAP_HOST, 0))
            usock = socket.socket()
            usock.bind(("127.0.0.1", 0))
            with Server(usock) as user, Server(tsock) as tapsrv:
                cmd = (f"{cmdline} pykvm.batch pykvm.benchsecs={seconds:g} "
                       f"pykvm.netbench=user,{macs[0]},dhcp,{gw},{user.port} "
                       f"pykvm.netbench=tap,{macs[1]},{TAP_GUEST},{TAP_HOST},{tapsrv.port} pykvm.fsbench={TAG}")
                out: list = []
                procs: list = []
                if vmm == "pykvm":
                    argv = None

                    def go():
                        out.append(linux_guest.run_guest(
                            kernel, initrd, cmdline=cmd, timeout=timeout, echo=echo, env=env,
                            extra=["--disk", str(root), "--mem", mem, "--vcpus", "1",
                                   "--net", f"user,mac={macs[0]}", "--net", f"tap,ifname={tap},mac={macs[1]}",
                                   "--share", f"{share},tag={TAG}"]))
                else:
                    prefix, qenv = qemu
                    pp, vp, qsock = _qemu_backends(d, share, env)
                    procs += [pp, vp]
                    argv = prefix + blkbench.qemu_argv(arch, kernel, initrd, cmdline=cmd, mem=mem,
                                                       disks=[(root, None)])
                    argv += qemu_devices(arch, mem=mem, passt_fd=qsock.fileno(), tap=tap, macs=macs,
                                         share_sock=d / "fs.sock")

                    def go():
                        try:
                            out.append(linux_guest.run_console(argv, timeout=timeout, echo=echo, env=qenv,
                                                               pass_fds=(qsock.fileno(),)))
                        finally:
                            qsock.close()

                def guarded():
                    try:
                        go()
                    except (OSError, subprocess.SubprocessError) as e:   # it did not start: no phases
                        out.append(linux_guest.GuestRun(argv or [vmm], -1, "", stderr=f"{type(e).__name__}: {e}"))
                th = threading.Thread(target=guarded)
                th.start()
                try:
                    ns.adopt(tap, 60, alive=th.is_alive)
                except AssertionError:
                    pass                     # the run's own output says why; its phases go missing
                th.join()
                for p in procs:
                    _stop(p)
                faults = [f"host server {label}: {f}" for label, srv in (("user", user), ("tap", tapsrv))
                          for f in srv.faults]
                if faults:                   # beside the VMM's stderr in a failed run's report
                    out[0] = dataclasses.replace(out[0], stderr="\n".join([out[0].stderr, *faults]))
        root.unlink()                        # the lab keeps its files in RAM
        return out[0]

    return blkbench.run_abba(boot, workdir, rounds, kind="net", phases=PHASES, program=PROGRAM, by_ops=BY_OPS)


def missing(arch: str) -> str | None:
    """What this lab boot lacks for the comparison, as the end of a "host lacks ..." sentence,
    or None: what :func:`blkbench.missing` names, else passt, virtiofsd or pyroute2. (A root
    image without ``/usr/bin/netbench`` is not caught here: its phases go missing, and the test
    says so.)"""
    why = blkbench.missing(arch)
    if why:
        return why
    for prog, what in (("passt", "passt (user-mode networking)"), ("virtiofsd", "virtiofsd (the share)")):
        if shutil.which(prog) is None:
            return what
    if importlib.util.find_spec("pyroute2") is None:
        return "pyroute2 (the tap's network namespace)"
    return None


def run_and_report(arch: str, cmdline: str, workdir, record_property) -> blkbench.Comparison:
    """For the labs' tests: :func:`compare` on the lab's root-disk guest
    (:data:`blkbench.LAB_ROUNDS` rounds), then :func:`blkbench.report`."""
    files = linux_guest.root_files()
    assert files is not None, "missing() first"
    kernel, initrd, root = files
    cmp = compare(kernel, initrd, root, workdir, arch=arch, cmdline=cmdline,
                  rounds=blkbench.LAB_ROUNDS, echo=linux_guest.console_echo("guest"))
    blkbench.report(cmp, record_property, title=(
        f"virtio-net (passt, tap) and virtio-fs (virtiofsd, cache=auto) in the guest, pykvm against "
        f"{blkbench.qemu_version()} -accel kvm, {len(cmp.pykvm_runs)} boots each (rr, files: per second):"))
    return cmp
