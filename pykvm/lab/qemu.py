"""QEMU for the labs: obtaining it, booting a kernel + initramfs, collecting the inner pytest results.

RISC-V uses trixie's QEMU 10 (``-cpu max`` with Svvptc/Zabha/Ziccrse; ``rv64`` without Zabha).  It
needs glibc 2.38, so on bookworm it runs through trixie's own dynamic loader with the trixie libraries
on ``--library-path`` — all unpacked from downloaded, checksummed debs.  The nested x86 lab uses the
host's ``qemu-system-x86_64`` when installed, else bookworm's deb (same loader trick not needed).

While QEMU runs, :class:`ConsoleProgress` reads the serial console as it arrives (partial lines too:
pytest's progress dots come without a newline) and a :class:`~pykvm.lab.progress.LiveLine` shows the
stage (firmware, kernel, KVM ready, pytest with its count, results), the last meaningful console line
and the elapsed time — or, with ``verbose``, the serial log itself.  QEMU runs in its own process
group, dies with the lab (``PR_SET_PDEATHSIG``) and is killed in a ``finally`` on any way out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ..outfile import write_report
from . import initramfs as ird
from . import ktap_junit as kj
from . import proc as procs
from .debian import Archive, LabError, extract_deb
from .progress import LiveLine, log, stage


@dataclass
class Qemu:
    """A runnable QEMU: ``argv_prefix`` + machine arguments."""

    argv_prefix: list[str]
    version: str = ""
    firmware: str | None = None  # explicit -bios (RISC-V)
    share: str | None = None  # -L
    env: dict[str, str] = field(default_factory=dict)  # added to the environment


def _unpack_all(archive: Archive, dest: Path, items: list[tuple]) -> Path:
    """Unpack each ``(package, want, purpose)`` of ``items`` into ``dest`` unless its stamp says it
    was.  All downloads first, then the unpacking under one cache lock of ``dest`` (labs sharing the
    cache unpack into the same tree)."""
    dest.mkdir(parents=True, exist_ok=True)
    debs = [(archive.fetch(p, purpose), p, want) for p, want, purpose in items]

    def stamp(p) -> Path:
        return dest / f".unpacked-{p.sha256[:16]}"
    if any(not stamp(p).exists() for _, p, _ in debs):
        with archive.lock(f"unpacked-{dest.name}", f"unpacking into {dest.name}"):
            for deb, p, want in debs:
                if not stamp(p).exists():
                    extract_deb(deb, dest, want)
                    stamp(p).touch()
    return dest


def trixie_riscv_qemu(archive: Archive, suite: str = "trixie") -> Qemu:
    """qemu-system-riscv64 from trixie amd64 debs (+ its library closure, qemu-system-data, opensbi)."""
    ix = archive.index(suite, "amd64")
    # trixie split qemu-system-riscv64 out of qemu-system-misc into qemu-system-riscv (7.6 vs 41 MB)
    binpkg = "qemu-system-riscv" if "qemu-system-riscv" in ix else "qemu-system-misc"
    main = ix.get(binpkg)
    # libraries only: the maintainer-script world (adduser, passwd, debconf ...) is not needed to run
    libs = ix.closure(
        [binpkg],
        skip=lambda n: n != binpkg and not (n.startswith("lib") or n == "zlib1g"),
    )
    root = archive.cache / "unpacked" / f"qemu-riscv-{main.sha256[:16]}"

    def lib(r: str) -> bool:
        return r.startswith(("usr/lib/x86_64-linux-gnu/", "usr/lib64/")) and "/gconv/" not in r
    _unpack_all(archive, root, [
        (p, lambda r: r == "usr/bin/qemu-system-riscv64", "qemu") if p.name == binpkg else (p, lib, "qemu library")
        for p in libs
    ] + [
        (ix.get("qemu-system-data"), lambda r: r.startswith("usr/share/qemu/"), "qemu data"),
        (ix.get("opensbi"), lambda r: "/opensbi/generic/" in r, "qemu firmware"),
    ])
    ld = root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    exe = root / "usr/bin/qemu-system-riscv64"
    fw = root / "usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin"
    for f in (ld, exe, fw):
        if not f.exists():
            raise LabError(f"trixie QEMU: {f.relative_to(root)} missing after unpacking")
    prefix = [str(ld), "--library-path", str(root / "usr/lib/x86_64-linux-gnu"), str(exe)]
    # QEMU 10 falls back to dlopen()ing modules from its configured module dir, which on this host
    # holds the host QEMU's (7.2) modules ("Only modules from the same build can be loaded" + abort).
    # `-audio none` (below) avoids the audio probe that triggers it; the empty QEMU_MODULE_DIR keeps
    # the first directory searched our own.
    moddir = root / "usr/lib/x86_64-linux-gnu/qemu"
    moddir.mkdir(exist_ok=True)
    env = {"QEMU_MODULE_DIR": str(moddir)}
    out = procs.run(prefix + ["--version"], capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode != 0:
        raise LabError(f"trixie qemu-system-riscv64 does not run: {out.stderr.strip()[:300]}")
    return Qemu(prefix + ["-audio", "none"], out.stdout.splitlines()[0], str(fw), str(root / "usr/share/qemu"), env)


def x86_qemu(archive: Archive, suite: str = "bookworm") -> Qemu:
    host = shutil.which("qemu-system-x86_64")
    if host:
        out = procs.run([host, "--version"], capture_output=True, text=True)
        if out.returncode == 0:
            return Qemu([host], out.stdout.splitlines()[0] + " (host)")
    ix = archive.index(suite, "amd64")
    # bookworm's QEMU links against bookworm's libraries, which this (bookworm) host has
    root = archive.cache / "unpacked" / f"qemu-x86-{ix.get('qemu-system-x86').sha256[:16]}"
    _unpack_all(archive, root, [
        (ix.get("qemu-system-x86"), lambda r: r == "usr/bin/qemu-system-x86_64", "qemu"),
        (ix.get("qemu-system-data"), lambda r: r.startswith("usr/share/qemu/"), "qemu data"),
        (ix.get("seabios"), lambda r: r.startswith("usr/share/seabios/"), "qemu firmware"),
    ])
    exe = str(root / "usr/bin/qemu-system-x86_64")
    out = procs.run([exe, "--version"], capture_output=True, text=True)
    if out.returncode != 0:
        raise LabError(
            f"qemu-system-x86_64 from {suite} does not run ({out.stderr.strip()[:200]}); "
            "apt-get install qemu-system-x86"
        )
    return Qemu([exe], out.stdout.splitlines()[0], share=str(root / "usr/share/qemu"))


# --------------------------------------------------------------------------------------------------
# QEMU inside a lab (for the inner tests that compare pykvm with QEMU -accel kvm)

INNER_FORMAT = 1  # bump when the layout of the inner QEMU part changes
# the binary package and program of QEMU for each lab userspace arch
_INNER = {"amd64": ("qemu-system-x86", "qemu-system-x86_64", "x86_64-linux-gnu"),
          "riscv64": ("qemu-system-riscv", "qemu-system-riscv64", "riscv64-linux-gnu")}
# firmware a guest booted with -kernel needs (x86: SeaBIOS and the option ROMs -kernel loads);
# RISC-V under KVM runs no firmware (KVM is the SBI implementation)
_INNER_DATA = {"amd64": (("seabios", ("usr/share/seabios/bios-256k.bin",)),
                         ("qemu-system-data", ("usr/share/qemu/linuxboot_dma.bin",
                                               "usr/share/qemu/kvmvapic.bin"))),
               "riscv64": ()}


def _needed(path: Path) -> list[str]:
    """DT_NEEDED sonames of the ELF file ``path``."""
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        for sec in ELFFile(f).iter_sections():
            if isinstance(sec, DynamicSection):
                return [t.needed for t in sec.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
    return []


def inner_qemu_part(archive: Archive, suite: str, arch: str, provided: list[str], name: str) -> tuple[Path, dict]:
    """A gzip'd newc part with QEMU for the lab's own ``suite``/``arch`` under ``/lab/qemu``
    (``bin/<program>``, ``lib/`` with the shared libraries it loads, ``share/`` with the firmware
    it needs, ``info.json``), for QEMU ``-accel kvm`` inside the lab
    (:mod:`pykvm.lab.blkbench`). The libraries are the DT_NEEDED closure of the program among
    its packages' dependency closure, less those of the packages in ``provided`` (the lab's
    userspace already has them). The walk goes through the provided packages' libraries too:
    what they load is shipped when the lab's userspace lacks it (QEMU's libgio, from a provided
    libglib2.0-0, loads libmount, which nothing provided has). Cached in ``<cache>/base/``.
    Returns (path, info); raises LabError."""
    binpkg, prog, triplet = _INNER[arch]
    ix = archive.index(suite, arch)
    if binpkg not in ix:
        binpkg = "qemu-system-misc"
    main = ix.get(binpkg)
    keep = set(provided)
    every = ix.closure([binpkg], skip=lambda n: n != binpkg and not (
        n.startswith("lib") or n == "zlib1g"))
    pkgs = [p for p in every if p.name not in keep]          # shipped from
    held = [p for p in every if p.name in keep]              # walked through, not shipped
    data = [(ix.get(p), files) for p, files in _INNER_DATA[arch]]
    key = _hash_pkgs([p.sha256 for p in pkgs] + [p.sha256 for p in held] +
                     [p.sha256 for p, _ in data] + [INNER_FORMAT])
    out = archive.cache / "base" / f"qemu-{name}-{key}.cpio.gz"
    info = {"inner_qemu": f"{main.name} {main.version} ({suite}/{arch})"}
    if out.exists():
        return out, info
    root = archive.cache / "unpacked" / f"inner-qemu-{name}-{key}"
    libdirs = (f"usr/lib/{triplet}/", f"lib/{triplet}/")

    def lib(r: str) -> bool:
        return r.startswith(libdirs) and ".so" in r and "/gconv/" not in r
    _unpack_all(archive, root, [
        (p, (lambda r: r == f"usr/bin/{prog}") if p.name == binpkg else lib, "lab QEMU") for p in pkgs
    ] + [(p, (lambda r, f=files: r in f), "lab QEMU firmware") for p, files in data])
    theirs_root = archive.cache / "unpacked" / f"inner-qemu-{name}-{key}-provided"
    _unpack_all(archive, theirs_root, [(p, lib, "lab QEMU (libraries the lab has)") for p in held])
    exe = root / "usr/bin" / prog
    if not exe.exists():
        raise LabError(f"{main.name}: no usr/bin/{prog} inside")

    def sos(top: Path) -> dict[str, Path]:
        return {f.name: f for d in libdirs if (top / d).is_dir() for f in (top / d).iterdir()}
    found, theirs = sos(root), sos(theirs_root)
    libs: dict[str, Path] = {}
    walked: set[str] = set()
    todo = _needed(exe)
    while todo:
        so = todo.pop()
        if so in walked:
            continue
        walked.add(so)
        if so in found:
            libs[so] = found[so].resolve()
            todo += _needed(libs[so])
        elif so in theirs:      # the lab's userspace has it; what it loads may be ours to ship
            todo += _needed(theirs[so].resolve())
    with archive.lock(f"base-{out.name}", f"building {out.name}"):
        if not out.exists():
            def fill(w: ird.CpioWriter) -> None:
                for d in ("lab", "lab/qemu", "lab/qemu/bin", "lab/qemu/lib", "lab/qemu/share"):
                    w.dir(d)
                w.file(f"lab/qemu/bin/{prog}", exe.read_bytes(), 0o755)
                for so, path in sorted(libs.items()):
                    w.file(f"lab/qemu/lib/{so}", path.read_bytes(), 0o755)
                for _, files in data:
                    for f in files:
                        w.file(f"lab/qemu/share/{Path(f).name}", (root / f).resolve().read_bytes())
                w.file("lab/qemu/info.json", json.dumps({
                    "exe": prog, "version": f"{main.name} {main.version} ({suite}/{arch})",
                    "libraries": sorted(libs)}).encode())
            ird.write_part(out, fill)
    log(f"{name}: QEMU for inside the lab: {info['inner_qemu']}, {len(libs)} libraries, "
        f"{out.stat().st_size / 1e6:.1f} MB")
    return out, info


def _hash_pkgs(items: list) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------
# booting and collecting


@dataclass
class BootResult:
    name: str  # e.g. "riscv-max"
    status: int  # inner pytest exit status, or 3 (boot failure) / 4 (timeout) / 5 (no results)
    reason: str  # "" when the inner run completed
    summary: list[str] = field(default_factory=list)  # pytest's own last lines
    output: str = ""  # the inner pytest output
    junit: bytes | None = None
    seconds: float = 0.0
    log: str = ""


_KTIME = re.compile(r"^\[\s*\d+\.\d+\]\s*")  # a kernel log timestamp
_PYTEST_PROGRESS = re.compile(r"^([.sFExX]+)\s*(?:\[\s*(\d+)%\])?\s*$")  # pytest -q's dots line
_OUTCOMES = {".": "passed", "F": "failed", "E": "errors", "s": "skipped", "x": "xfailed", "X": "xpassed"}


class ConsoleProgress:
    """Where a lab boot is, read from its serial console: ``stage``, pytest's ``tests()`` counts and
    ``percent``, and the ``last`` meaningful line.  ``feed(line)`` for each complete line,
    ``partial(text)`` for the line being written (pytest's dots arrive one by one).

    Stages only move forward (``STAGES`` order; the kernel's last "reboot: Power down" line does not
    take a finished run back to "kernel booting"); ``pop_transitions()`` returns each new stage once,
    with its detail, so a stage that lasted a fraction of a second still gets its line."""

    STAGES = ("starting QEMU", "firmware", "kernel booting", "KVM ready", "pytest starting", "pytest running",
              "pytest finished", "sending results", "powering off", "/init failed")

    def __init__(self, nonce: str):
        self.fmt = lambda m: m.format(nonce=nonce)
        self.stage = self.STAGES[0]
        self.counts: dict[str, int] = {}
        self.percent: int | None = None
        self.last = ""
        self.summary = ""
        self.kernel = ""
        self._in_pytest = False
        self._in_xml = False
        self._partial: dict[str, int] = {}
        self._transitions: list[tuple[str, str]] = [(self.stage, "")]
        self._stage_detail = ""

    def _to(self, stage_: str, detail: str = "") -> None:
        if self.STAGES.index(stage_) > self.STAGES.index(self.stage):
            self.stage, self._stage_detail = stage_, detail
            self._transitions.append((stage_, detail))

    def pop_transitions(self) -> list[tuple[str, str]]:
        out, self._transitions = self._transitions, []
        return out

    def feed(self, line: str) -> None:
        f = self.fmt
        text = line.strip()
        self._partial = {}
        if not text:
            return
        if f(ird.MARK_INIT_ERROR) in text:
            self.last = text.split(f(ird.MARK_INIT_ERROR), 1)[1].rstrip("@")
            self._to("/init failed", self.last)
            return
        if f(ird.MARK_OUT_BEGIN) in text:
            self._in_pytest = True
            self._to("pytest starting")
            return
        if f(ird.MARK_OUT_END) in text:
            self._in_pytest = False
            self._to("pytest finished", self.summary)
            return
        if f(ird.MARK_XML_BEGIN) in text:
            self._in_xml = True
            self._to("sending results")
            return
        if f(ird.MARK_XML_END) in text:
            self._in_xml = False
            return
        if f(ird.MARK_RC) in text:
            self._to("powering off")
            return
        if self._in_xml:
            return
        if self._in_pytest:
            m = _PYTEST_PROGRESS.match(text)
            if m:
                for c in m.group(1):
                    key = _OUTCOMES[c]
                    self.counts[key] = self.counts.get(key, 0) + 1
                if m.group(2) is not None:
                    self.percent = int(m.group(2))
                self._to("pytest running")
                return
            if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)\b|no tests ran", text):
                self.summary = text.strip("= ")
        elif "OpenSBI" in text or text.startswith("Platform Name"):
            self._to("firmware", text if "OpenSBI" in text else "")
        elif _KTIME.match(text) or text.startswith("Linux version"):
            self._to("kernel booting")
        elif text.startswith("[lab] ") and "kvm:" in text:
            self.kernel = text[len("[lab] "):].split(";", 1)[0]
            self._to("KVM ready", f"kernel {self.kernel}")
        if re.search(r"[A-Za-z]{3}", text):
            self.last = _KTIME.sub("", text)

    def partial(self, text: str) -> None:
        """The console line written so far (no newline yet)."""
        self._partial = {}
        if self._in_pytest:
            m = _PYTEST_PROGRESS.match(text.strip())
            if m and m.group(2) is None:
                for c in m.group(1):
                    self._partial[_OUTCOMES[c]] = self._partial.get(_OUTCOMES[c], 0) + 1
                self._to("pytest running")

    def tests(self) -> dict[str, int]:
        out = dict(self.counts)
        for k, v in self._partial.items():
            out[k] = out.get(k, 0) + v
        return out

    def describe(self) -> tuple[str, str, str]:
        """(stage, detail for a terminal line, detail for a plain line)."""
        t = self.tests()
        if self.stage == "pytest running":
            done = sum(t.values())
            parts = [f"{done} test{'' if done == 1 else 's'} done" + (f" ({self.percent}%)" if self.percent is not None else "")]
            parts += [f"{v} {k}" for k, v in t.items() if k != "passed" and v]
            counts = ", ".join(parts)
            return self.stage, counts + (f"  | {self.last[:100]}" if self.last else ""), counts
        if self.stage == "pytest finished":
            return self.stage, self.summary, self.summary
        if self.stage in ("KVM ready", "/init failed"):
            return self.stage, self._stage_detail, self._stage_detail
        return self.stage, self.last[:120], self._stage_detail


def boot(
    qemu: Qemu,
    machine_args: list[str],
    log_path: Path,
    nonce: str,
    name: str,
    timeout: float,
    interactive: bool = False,
    verbose: bool = False,
    silence: float | None = None,
) -> BootResult:
    """Run QEMU, tee the serial console to ``log_path``, show progress, and parse the /init markers.

    ``silence``: seconds without any console output (a test's progress dot counts) after which
    the boot is taken as stalled and stopped (status 4, the reason says "stalled"); None: only
    ``timeout`` ends it. QEMU is killed (with its process group) on every way out of here, an
    interrupt included."""
    argv = list(qemu.argv_prefix) + ["-no-user-config"]
    if qemu.share:
        argv += ["-L", qemu.share]
    if qemu.firmware:
        argv += ["-bios", qemu.firmware]
    argv += machine_args
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    stage(f"booting {name}")
    if interactive:
        # the terminal belongs to QEMU (-nographic): same process group, but still dies with the lab
        p = procs.popen(argv + ["-nographic"], new_session=False, env={**os.environ, **qemu.env})
        try:
            rc = p.wait()
        finally:
            procs.stop(p)
        return BootResult(name, rc, "interactive shell", seconds=time.monotonic() - t0)

    argv += ["-display", "none", "-serial", "stdio", "-monitor", "none"]
    log(f"{name}: booting with {qemu.version.split(' (')[0]} (command line at the top of {log_path.name})")
    rc_mark = ird.MARK_RC.format(nonce=nonce)
    err_mark = ird.MARK_INIT_ERROR.format(nonce=nonce)
    seen_end = threading.Event()
    lines: list[str] = []
    partial = [""]  # the console line being written (pump thread -> main thread)
    watch = ConsoleProgress(nonce)
    timed_out = stalled = False
    shown = 0
    with open(log_path, "w") as logf:
        logf.write("# " + " ".join(argv) + "\n")
        logf.flush()

        def pump(fd: int) -> None:
            buf = b""
            try:
                while True:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    buf += chunk
                    *complete, buf = buf.split(b"\n")
                    for raw in complete:
                        line = raw.decode("utf-8", "replace").replace("\r", "")
                        logf.write(line + "\n")
                        lines.append(line)
                        if rc_mark in line or err_mark in line:
                            seen_end.set()
                    logf.flush()
                    partial[0] = buf.decode("utf-8", "replace").replace("\r", "")
                if buf:
                    line = buf.decode("utf-8", "replace").replace("\r", "")
                    logf.write(line + "\n")
                    lines.append(line)
            except (OSError, ValueError):  # the pipe or the log closed under us: the boot is over
                pass
            partial[0] = ""

        # registered with pykvm.lab.proc from here on: even an interrupt before the `try` stops it
        proc = procs.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env={**os.environ, **qemu.env})
        th = threading.Thread(target=pump, args=(proc.stdout.fileno(),), daemon=True)  # type: ignore[union-attr]
        live = LiveLine(name, draw=not verbose)
        try:
            th.start()
            deadline = t0 + timeout
            end_seen_at = None
            heard, heard_at, stalled = (0, ""), t0, False
            while True:
                running = proc.poll() is None
                # everything drawn from here, the main thread: an interrupt stops it all at once
                n = len(lines)
                for line in lines[shown:n]:
                    watch.feed(line)
                    if verbose:
                        live.echo(f"  {name}| {line}")
                shown = n
                watch.partial(partial[0])
                for st, detail in watch.pop_transitions():  # every stage gets its line, however short
                    if not verbose and st != watch.stage:  # (the current one: just below, in full)
                        live.show(st, detail)
                if not verbose:
                    st, tty_detail, plain_detail = watch.describe()
                    live.show(st, tty_detail, plain_detail)
                if not running:
                    break
                now = time.monotonic()
                if (n, partial[0]) != heard:
                    heard, heard_at = (n, partial[0]), now
                if now > deadline:
                    timed_out = True
                    break
                if silence is not None and now - heard_at > silence and not interactive:
                    timed_out = stalled = True
                    break
                if seen_end.is_set():
                    # /init powers off right after the last marker; do not wait forever if it doesn't
                    end_seen_at = end_seen_at or now
                    if now - end_seen_at > 15:
                        break
                time.sleep(0.1)
        finally:
            live.close()
            procs.stop(proc)  # kills the process group if still running; reaps it either way
            if th.is_alive():
                th.join(timeout=5)
            proc.stdout.close()  # type: ignore[union-attr]
    seconds = time.monotonic() - t0
    if verbose:
        for line in lines[shown:]:  # what the pump read after the last look
            live.echo(f"  {name}| {line}")
    res = parse_console(lines, nonce, name)
    res.seconds = seconds
    res.log = str(log_path)
    if res.reason and stalled:
        res.status, res.reason = 4, (f"{name}: stalled: no console output for {silence:.0f} s "
                                     f"({res.reason}); see {log_path}")
    elif res.reason and timed_out:
        res.status, res.reason = 4, f"{name}: timed out after {timeout:.0f} s ({res.reason}); see {log_path}"
    elif res.reason:
        res.reason = f"{res.reason} (QEMU exit {proc.returncode}); see {log_path}"
    return res


def _between(lines: list[str], begin: str, end: str) -> list[str] | None:
    try:
        i = next(k for k, line in enumerate(lines) if begin in line)
    except StopIteration:
        return None
    out = []
    for line in lines[i + 1 :]:
        if end in line:
            return out
        out.append(line)
    return None


def parse_console(lines: list[str], nonce: str, name: str) -> BootResult:

    def fmt(m: str) -> str:
        return m.format(nonce=nonce)
    err = next((line for line in lines if fmt(ird.MARK_INIT_ERROR) in line), None)
    if err:
        why = err.split(fmt(ird.MARK_INIT_ERROR), 1)[1].rstrip("@")
        return BootResult(name, 3, f"{name}: lab /init failed: {why}")
    output = _between(lines, fmt(ird.MARK_OUT_BEGIN), fmt(ird.MARK_OUT_END))
    rc_line = next((line for line in lines if fmt(ird.MARK_RC) in line), None)
    if output is None or rc_line is None:
        started = any(fmt(ird.MARK_OUT_BEGIN) in line for line in lines)
        tail = next((line for line in reversed(lines) if line.strip()), "no console output")
        what = "inner pytest did not finish" if started else "lab did not reach the tests"
        return BootResult(name, 3, f"{name}: {what}; last console line: {tail[:160]!r}")
    status = int(rc_line.split(fmt(ird.MARK_RC), 1)[1].split("@", 1)[0])
    b64 = _between(lines, fmt(ird.MARK_XML_BEGIN), fmt(ird.MARK_XML_END))
    junit = None
    reason = ""
    if b64 is not None:
        try:
            junit = base64.b64decode("".join(line.strip() for line in b64), validate=True)
        except (binascii.Error, ValueError):
            reason = f"{name}: JUnit XML came back corrupted"
            status = status or 5
    elif status not in (5,):  # 5 = no tests collected: pytest still writes the XML, so this is odd
        reason = f"{name}: inner pytest wrote no JUnit XML"
        status = status or 5
    summary = [line for line in output if line.strip()][-15:]
    return BootResult(name, status, reason, summary, "\n".join(output), junit)


def bench_lines(junit: bytes | None) -> list[str]:
    """``name: value`` for each JUnit property named ``bench_*`` in an inner run's ``junit`` (the
    inner benchmarks record their side-by-side results so; the lab prints them in its summary)."""
    if not junit:
        return []
    try:
        root = ET.fromstring(junit)
    except ET.ParseError:
        return []
    return [f"{p.get('name')}: {p.get('value')}" for p in root.iter("property")
            if (p.get("name") or "").startswith("bench_")]


def merge_junit(results: list[BootResult], out: Path, lab: str) -> ET.Element:
    """One JUnit file per lab; with several runs (CPU models) testsuite and testcase names carry the run name.
    Its KTAP (:mod:`pykvm.lab.ktap_junit`) goes beside ``out``, ``.ktap`` for its suffix."""
    root = ET.Element("testsuites", name=f"pykvm-lab-{lab}")
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    tagged = len(results) > 1
    for r in results:
        suites: list[ET.Element] = []
        if r.junit:
            doc = ET.fromstring(r.junit)
            suites = [doc] if doc.tag == "testsuite" else list(doc.iter("testsuite"))
        if not suites or r.reason:
            # the run itself failed: make that a visible error testcase
            s = ET.Element("testsuite", name=f"{r.name}", tests="1", failures="0", errors="1", skipped="0")
            tc = ET.SubElement(s, "testcase", classname=f"lab.{r.name}", name="boot", time=f"{r.seconds:.1f}")
            ET.SubElement(tc, "error", message=r.reason or "no results").text = r.reason
            suites.append(s)
        for s in suites:
            s.set("name", f"{s.get('name', 'pytest')}[{r.name}]" if tagged else s.get("name", "pytest"))
            s.set("hostname", r.name)
            if tagged:
                for tc in s.iter("testcase"):
                    tc.set("name", f"{tc.get('name')}[{r.name}]")
            for k in tot:
                tot[k] += int(s.get(k, 0))
            root.append(s)
    for k, v in tot.items():
        root.set(k, str(v))
    buf = io.BytesIO()
    ET.ElementTree(root).write(buf, encoding="utf-8", xml_declaration=True)
    # atomic for a regular file; a symlink, device or FIFO is written through, never replaced
    write_report(out, buf.getvalue(), "the JUnit XML")
    # the same results as KTAP, beside it (<lab>.ktap: one subtest per boot and combination)
    write_report(kj.ktap_path(Path(out)), kj.junit_to_ktap(root, lab), "the KTAP report")
    return root
