"""Disk throughput inside a lab's Linux guest: pykvm against QEMU ``-accel kvm`` (issue 19's benchmark).

Both VMMs boot the same guest inside the same lab boot: the lab's Debian kernel, the root-disk
guest's boot initramfs and a copy of its ``root.img`` (:mod:`pykvm.lab.rootfs`), plus a second
raw disk, ``bench.img``, with the serial number :data:`SERIAL`, written in full by the host first
so that no read hits a hole. Both serve the images through the host's page cache (pykvm's
virtio-blk uses ``pread``/``pwrite``/``fdatasync``; QEMU runs ``cache=writeback,aio=threads``, its
default) over the same transport (virtio-pci with MSI-X on x86, virtio-mmio with the in-kernel AIA
on RISC-V), with one vCPU and the same memory size.

The guest's ``/sbin/init`` sees ``pykvm.blkbench=SECONDS`` and runs ``/usr/bin/blkbench`` (from
``pykvm/lab/blkbench.c``, built static for the guest's arch) on the disk with that serial: 1 MiB
sequential and 4 KiB random writes and reads with ``O_DIRECT`` at queue depth 1, each phase for
SECONDS, writes ended by ``fdatasync``. :func:`parse` reads its lines. :func:`compare` boots each
VMM twice, in the order pykvm, QEMU, QEMU, pykvm (a host load that drifts over the four boots then
weighs on both alike), combines each VMM's two runs per phase (:func:`combine`) and puts the two
side by side (throughput ratio pykvm / QEMU: above 1 is pykvm faster).

QEMU inside the lab comes from the lab's own Debian suite and arch (``/lab/qemu``, put there by
:func:`pykvm.lab.qemu.inner_qemu_part`); :func:`inner_qemu` is None in a lab boot without it.

The program is built on the host with the root image (:func:`pykvm.lab.rootfs.build_blkbench`);
this module runs inside the lab on the standard library alone.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import linux_guest

SERIAL = "pykvm-bench"                  # the bench disk's virtio-blk serial (GET_ID)
PHASES = ("seq-write-1m", "seq-read-1m", "rand-write-4k", "rand-read-4k")
QEMU_DIR = Path("/lab/qemu")            # where a lab boot carries its inner QEMU
DISK_MIB = 64                           # the bench disk's size
MIB = 1 << 20

# one phase's line, as blkbench.c (and netbench.c) print it (after an optional prefix, e.g. the
# console mark); the program's name is filled in
_LINE = r"(?:^|\s){} (\S+) bytes=(\d+) ops=(\d+) seconds=(\d+(?:\.\d+)?)\s*$"


# -- running and comparing (inside a lab) -------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """One phase's result: ``bytes`` moved in ``ops`` requests over ``seconds`` (guest wall time)."""
    name: str
    bytes: int
    ops: int
    seconds: float

    @property
    def mib_s(self) -> float:
        """Throughput in MiB/s (2**20 bytes per second)."""
        return self.bytes / MIB / self.seconds if self.seconds > 0 else 0.0

    @property
    def iops(self) -> float:
        """Requests per second."""
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def parse(marks, program: str = "blkbench") -> dict[str, Phase]:
    """The phases in ``marks`` (``GuestRun.marks``: (seconds, text) pairs; the text may carry a
    prefix before ``program``: ``blkbench`` or ``netbench``), by phase name. A line that is not
    exactly blkbench.c's form, or reports no request or no time, is not a result."""
    out = {}
    line = re.compile(_LINE.format(re.escape(program)))
    for _, text in marks:
        phase = _result(line, text)
        if phase is not None:
            out[phase.name] = phase
    return out


def _result(line: re.Pattern, text: str) -> Phase | None:
    """The phase ``text`` reports (``line``: :data:`_LINE` for the program), or None."""
    m = line.search(text)
    if m and int(m[3]) > 0 and float(m[4]) > 0:
        return Phase(m[1], int(m[2]), int(m[3]), float(m[4]))
    return None


def unparsed(console: str, program: str = "blkbench") -> list[str]:
    """The lines of ``console`` that name ``program`` but are not a result :func:`parse` takes:
    the guest program's failures (``netbench: read: Connection reset by peer``), the root init's
    (``... netbench user failed``), result lines that something else printed into, and results
    of no request or no time."""
    line = re.compile(_LINE.format(re.escape(program)))
    named = re.compile(rf"(?:^|\s){re.escape(program)}[\s:]")
    return [t for t in console.splitlines() if named.search(t) and _result(line, t) is None]


def make_disk(path: Path, mib: int = DISK_MIB) -> Path:
    """``path`` as a raw image of ``mib`` MiB, every block written (no holes)."""
    block = bytes((i * 131 + 7) & 0xFF for i in range(256)) * (MIB // 256)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
    return path


def inner_qemu() -> tuple[list[str], dict[str, str]] | None:
    """(argv prefix, environment) of the QEMU this lab boot carries in :data:`QEMU_DIR`, or None."""
    try:
        info = json.loads((QEMU_DIR / "info.json").read_text())
    except (OSError, ValueError):
        return None
    env = dict(os.environ, LD_LIBRARY_PATH=str(QEMU_DIR / "lib"))
    return [str(QEMU_DIR / "bin" / info["exe"]), "-L", str(QEMU_DIR / "share")], env


def qemu_version() -> str:
    try:
        return json.loads((QEMU_DIR / "info.json").read_text()).get("version", "")
    except (OSError, ValueError):
        return ""


def qemu_argv(arch: str, kernel, initrd, *, cmdline: str, disks, mem: str) -> list[str]:
    """QEMU's machine arguments for the same guest as ``pykvm run`` boots: ``disks`` are
    (path, serial) pairs, the first the root (/dev/vda)."""
    if arch in ("x86_64", "amd64"):
        machine = ["-M", "pc", "-cpu", "host"]
        blk = "virtio-blk-pci,disable-legacy=on"
    elif arch == "riscv64":
        machine = ["-M", "virt,aia=aplic-imsic", "-cpu", "host"]
        blk = "virtio-blk-device"
    else:
        raise ValueError(f"no QEMU machine for arch {arch!r} (x86_64, amd64, riscv64)")
    argv = ["-accel", "kvm", *machine, "-smp", "1", "-m", mem, "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]
    for i, (path, serial) in enumerate(disks):
        q = str(path).replace(",", ",,")            # QEMU's option syntax: a comma doubled
        argv += ["-drive", f"file={q},format=raw,if=none,id=d{i},cache=writeback,aio=threads",
                 "-device", f"{blk},drive=d{i}" + (f",serial={serial}" if serial else "")]
    return argv


def rate(phase: Phase, by_ops: bool) -> float:
    """What a phase is compared by: requests per second when ``by_ops`` (round trips, files),
    else MiB/s."""
    return phase.iops if by_ops else phase.mib_s


def table(pykvm: dict[str, Phase], qemu: dict[str, Phase], phases=PHASES, by_ops=()) -> list[str]:
    """The two runs side by side, one line per phase of ``phases`` (MiB/s, requests per second,
    ratio pykvm / QEMU of the figure the phase is compared by: requests per second for those in
    ``by_ops``, else MiB/s)."""
    w = max([14, *map(len, phases)])
    rows = [f"{'phase':{w}} {'pykvm MiB/s':>12} {'QEMU MiB/s':>11} {'pykvm op/s':>11} {'QEMU op/s':>10} "
            f"{'ratio':>6}"]
    for name in phases:
        p, q = pykvm.get(name), qemu.get(name)
        if p is None or q is None:
            rows.append(f"{name:{w}} missing ({'pykvm' if p is None else 'QEMU'} printed no result)")
            continue
        qr = rate(q, name in by_ops)
        ratio = f"{rate(p, name in by_ops) / qr:6.2f}" if qr else f"{'n/a':>6}"
        rows.append(f"{name:{w}} {p.mib_s:12.2f} {q.mib_s:11.2f} {p.iops:11.1f} {q.iops:10.1f} {ratio}")
    return rows


def ratios(pykvm: dict[str, Phase], qemu: dict[str, Phase], phases=PHASES, by_ops=()) -> dict[str, float]:
    """Ratio pykvm / QEMU per phase of ``phases`` present in both (above 1: pykvm faster), of
    requests per second for the phases in ``by_ops``, else of throughput."""
    return {n: round(rate(pykvm[n], n in by_ops) / rate(qemu[n], n in by_ops), 3) for n in phases
            if n in pykvm and n in qemu and rate(qemu[n], n in by_ops) > 0}


def combine(runs: list[dict[str, Phase]], phases=PHASES) -> dict[str, Phase]:
    """One result per phase of ``phases`` from several runs of it: bytes, requests and seconds
    summed, so the throughput is the runs' total over their total time. A phase missing from any
    run is left out (then :func:`report` names it)."""
    out = {}
    for name in phases:
        got = [r[name] for r in runs if name in r]
        if runs and len(got) == len(runs):
            out[name] = Phase(name, sum(p.bytes for p in got), sum(p.ops for p in got),
                              sum(p.seconds for p in got))
    return out


@dataclass
class Comparison:
    """The boots of :func:`compare` (or :func:`run_abba`): each VMM's runs (``GuestRun``, in
    boot order) and their phases combined over those runs (:func:`combine`). ``kind`` names the
    JUnit properties (``blk``, ``net``); ``program`` is the guest program whose lines the runs
    carry; ``by_ops``: the phases compared by requests per second (:func:`ratios`)."""
    pykvm_runs: list[linux_guest.GuestRun]
    qemu_runs: list[linux_guest.GuestRun]
    pykvm: dict
    qemu: dict
    kind: str = "blk"
    phases: tuple = PHASES
    program: str = "blkbench"
    by_ops: tuple = ()

    def lines(self) -> list[str]:
        return table(self.pykvm, self.qemu, self.phases, self.by_ops)

    def properties(self) -> dict[str, object]:
        """JUnit properties: ``bench_<kind>_<phase>`` (text, printed in the lab's summary) and
        ``ratio_<kind>_<phase>`` (pykvm / QEMU, :func:`ratios`)."""
        out: dict[str, object] = {}
        for name, r in ratios(self.pykvm, self.qemu, self.phases, self.by_ops).items():
            p, q = self.pykvm[name], self.qemu[name]
            if name in self.by_ops:
                text = f"pykvm {p.iops:.0f}/s, QEMU {q.iops:.0f}/s, pykvm/QEMU {r:.2f}"
            else:
                text = (f"pykvm {p.mib_s:.2f} MiB/s ({p.iops:.0f} IOPS), QEMU {q.mib_s:.2f} MiB/s "
                        f"({q.iops:.0f} IOPS), pykvm/QEMU {r:.2f}")
            out[f"bench_{self.kind}_{name}"] = text
            out[f"ratio_{self.kind}_{name}"] = r
        return out


def abba(rounds: int) -> list[str]:
    """The boot order of ``rounds`` rounds: pykvm, QEMU, QEMU, pykvm, ... (so a load that changes
    steadily over the boots weighs on both alike). ValueError for ``rounds`` < 1."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    return [vmm for r in range(rounds) for vmm in (("pykvm", "qemu") if r % 2 == 0 else ("qemu", "pykvm"))]


def run_abba(boot, workdir, rounds: int, *, kind: str = "blk", phases=PHASES, program: str = "blkbench",
             by_ops=()) -> Comparison:
    """``boot(vmm, directory) -> GuestRun`` for each boot of :func:`abba` (``vmm``: "pykvm" or
    "qemu"; ``directory``: a fresh one under ``workdir``), the runs' phases parsed and combined
    per VMM. ValueError for ``rounds`` < 1."""
    workdir = Path(workdir)
    runs: dict[str, list] = {"pykvm": [], "qemu": []}
    for i, vmm in enumerate(abba(rounds)):
        d = workdir / f"{i}-{vmm}"
        d.mkdir(parents=True, exist_ok=True)
        runs[vmm].append(boot(vmm, d))
    return Comparison(runs["pykvm"], runs["qemu"],
                      combine([parse(r.marks, program) for r in runs["pykvm"]], phases),
                      combine([parse(r.marks, program) for r in runs["qemu"]], phases),
                      kind, tuple(phases), program, tuple(by_ops))


def compare(kernel, initrd, root_img, workdir, *, arch: str, cmdline: str, seconds: float = 1.5,
            rounds: int = 2, mem: str = "256M", pykvm_extra=(), timeout: float = 300.0,
            echo=None) -> Comparison:
    """Boot the root-disk guest ``2 * rounds`` times in ``workdir``, with ``pykvm run`` and with
    the lab's QEMU in the order of :func:`abba`, each on a fresh copy of ``root_img`` and a fresh
    bench disk, with ``pykvm.blkbench=seconds pykvm.batch`` added to ``cmdline``. Raises
    RuntimeError when this lab boot carries no QEMU (:func:`inner_qemu`), ValueError for
    ``rounds`` < 1."""
    qemu = inner_qemu()
    if qemu is None:
        raise RuntimeError(f"no QEMU in this lab boot ({QEMU_DIR})")
    abba(rounds)
    cmd = f"{cmdline} pykvm.batch pykvm.blkbench={seconds:g}"

    def boot(vmm: str, d: Path) -> linux_guest.GuestRun:
        root = linux_guest.copy_root(Path(root_img), d)
        bench = make_disk(d / "bench.img")
        if vmm == "pykvm":
            run = linux_guest.run_guest(
                kernel, initrd, cmdline=cmd, timeout=timeout, echo=echo,
                extra=["--disk", str(root), "--disk", f"{bench},serial={SERIAL}", "--mem", mem,
                       "--vcpus", "1", *pykvm_extra])
        else:
            prefix, env = qemu
            argv = prefix + qemu_argv(arch, kernel, initrd, cmdline=cmd, mem=mem,
                                      disks=[(root, None), (bench, SERIAL)])
            run = linux_guest.run_console(argv, timeout=timeout, echo=echo, env=env)
        for f in (root, bench):                     # the lab keeps its files in RAM
            f.unlink()
        return run

    return run_abba(boot, workdir, rounds)


def report(cmp: Comparison, record_property, title: str | None = None) -> None:
    """For the labs' tests: print each run's console tail and phases and the side-by-side table
    under ``title`` (default: the disk benchmark's), record the JUnit properties
    (:meth:`Comparison.properties`), and raise AssertionError unless every run of both VMMs ran
    every phase and exited 0 (the ratios are reported, never asserted)."""
    # (VMM, run, its phases, its other lines naming the program), read once for both passes
    runs = [(vmm, run, parse(run.marks, cmp.program), unparsed(run.console, cmp.program))
            for vmm, vmm_runs in (("pykvm", cmp.pykvm_runs), ("QEMU", cmp.qemu_runs))
            for run in vmm_runs]
    for vmm, run, got, other in runs:
        print(f"\n$ {' '.join(map(str, run.argv))}\n{run.tail(12)}\n({vmm}: exit {run.status}, "
              f"{run.seconds:.1f} s; " + ", ".join(f"{n} {p.mib_s:.2f} MiB/s" for n, p in got.items())
              + ")" + "".join(f"\n  {t}" for t in other) + run.stderr[-2000:])
    if title is None:
        title = (f"virtio-blk in the guest, pykvm against {qemu_version()} -accel kvm, queue depth 1, "
                 f"O_DIRECT, {len(cmp.pykvm_runs)} boots each:")
    print(f"\n{title}")
    print("\n".join(cmp.lines()))
    for name, value in cmp.properties().items():
        record_property(name, value)
    for vmm, run, got, other in runs:
        lost = [p for p in cmp.phases if p not in got]
        said = "\n".join(other) or "(nothing)"
        assert not lost, (f"{vmm}: no result for {', '.join(lost)} (exit {run.status}); the guest's "
                          f"other {cmp.program} lines:\n{said}\nconsole tail:\n{run.tail()}\n"
                          f"{run.stderr[-2000:]}")
        assert run.status == 0, f"{vmm} exited {run.status}: {run.stderr[-2000:]}\n{run.tail()}"


def missing(arch: str) -> str | None:
    """What this lab boot lacks for the comparison on ``arch``, as the end of a "host lacks ..."
    sentence, or None: the root-disk Linux guest (``/lab/linux/root.img``), the lab's QEMU
    (:data:`QEMU_DIR`), and on riscv64 KVM's in-kernel AIA (virtio-mmio's interrupts)."""
    if linux_guest.root_files() is None:
        return f"the root-disk Linux guest ({linux_guest.LAB_DIR}/root.img: the labs carry it)"
    if inner_qemu() is None:
        return f"QEMU in this lab boot ({QEMU_DIR}: only the lab's -qemu boot carries it)"
    if arch == "riscv64":
        from ..arch.riscv import aia
        from ..kvm import Kvm
        with Kvm() as kvm, kvm.create_vm() as vm:
            if not aia.available(vm.fd):
                return "KVM's in-kernel RISC-V AIA (KVM_DEV_TYPE_RISCV_AIA)"
    return None


# rounds of the labs' benchmark tests: one boot of each VMM. Two (pykvm, QEMU, QEMU, pykvm)
# cost 2-3 more minutes of a TCG-run L1 per benchmark and lab, and the whole test command is kept
# well under 30 minutes on a 2-CPU host; for steadier figures call compare() with rounds=2 or more
LAB_ROUNDS = 1


def run_and_report(arch: str, cmdline: str, workdir, record_property) -> Comparison:
    """For the labs' tests: :func:`compare` on the lab's root-disk guest, :data:`LAB_ROUNDS`
    rounds, then :func:`report`."""
    files = linux_guest.root_files()
    assert files is not None, "missing() first"
    kernel, initrd, root = files
    cmp = compare(kernel, initrd, root, workdir, arch=arch, cmdline=cmdline, rounds=LAB_ROUNDS,
                  echo=linux_guest.console_echo("guest"))
    report(cmp, record_property)
    return cmp
