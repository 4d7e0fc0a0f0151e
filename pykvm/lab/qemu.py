"""QEMU for the labs: obtaining it, booting a kernel + initramfs, collecting the inner pytest results.

RISC-V uses trixie's QEMU 10 (``-cpu max`` with Svvptc/Zabha/Ziccrse; ``rv64`` without Zabha).  It
needs glibc 2.38, so on bookworm it runs through trixie's own dynamic loader with the trixie libraries
on ``--library-path`` — all unpacked from downloaded, checksummed debs.  The nested x86 lab uses the
host's ``qemu-system-x86_64`` when installed, else bookworm's deb (same loader trick not needed).
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import signal
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from . import initramfs as ird
from .debian import Archive, LabError, log


@dataclass
class Qemu:
    """A runnable QEMU: ``argv_prefix`` + machine arguments."""

    argv_prefix: list[str]
    version: str = ""
    firmware: str | None = None  # explicit -bios (RISC-V)
    share: str | None = None  # -L
    env: dict[str, str] = field(default_factory=dict)  # added to the environment


def _unpack_once(archive: Archive, pkg, dest: Path, want=lambda p: True, purpose: str = "") -> Path:
    deb = archive.fetch(pkg, purpose)
    stamp = dest / f".unpacked-{pkg.sha256[:16]}"
    if not stamp.exists():
        from .debian import extract_deb

        extract_deb(deb, dest, want)
        stamp.touch()
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
    root.mkdir(parents=True, exist_ok=True)
    for p in libs:
        if p.name == binpkg:
            _unpack_once(archive, p, root, lambda r: r == "usr/bin/qemu-system-riscv64", "qemu")
        else:
            _unpack_once(
                archive, p, root,
                lambda r: r.startswith(("usr/lib/x86_64-linux-gnu/", "usr/lib64/")) and "/gconv/" not in r,
                "qemu library",
            )
    _unpack_once(archive, ix.get("qemu-system-data"), root, lambda r: r.startswith("usr/share/qemu/"), "qemu data")
    _unpack_once(archive, ix.get("opensbi"), root, lambda r: "/opensbi/generic/" in r, "qemu firmware")
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
    out = subprocess.run(prefix + ["--version"], capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode != 0:
        raise LabError(f"trixie qemu-system-riscv64 does not run: {out.stderr.strip()[:300]}")
    return Qemu(prefix + ["-audio", "none"], out.stdout.splitlines()[0], str(fw), str(root / "usr/share/qemu"), env)


def x86_qemu(archive: Archive, suite: str = "bookworm") -> Qemu:
    host = shutil.which("qemu-system-x86_64")
    if host:
        out = subprocess.run([host, "--version"], capture_output=True, text=True)
        if out.returncode == 0:
            return Qemu([host], out.stdout.splitlines()[0] + " (host)")
    ix = archive.index(suite, "amd64")
    # bookworm's QEMU links against bookworm's libraries, which this (bookworm) host has
    root = archive.cache / "unpacked" / f"qemu-x86-{ix.get('qemu-system-x86').sha256[:16]}"
    root.mkdir(parents=True, exist_ok=True)
    _unpack_once(archive, ix.get("qemu-system-x86"), root, lambda r: r == "usr/bin/qemu-system-x86_64", "qemu")
    _unpack_once(archive, ix.get("qemu-system-data"), root, lambda r: r.startswith("usr/share/qemu/"), "qemu data")
    _unpack_once(archive, ix.get("seabios"), root, lambda r: r.startswith("usr/share/seabios/"), "qemu firmware")
    exe = str(root / "usr/bin/qemu-system-x86_64")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    if out.returncode != 0:
        raise LabError(
            f"qemu-system-x86_64 from {suite} does not run ({out.stderr.strip()[:200]}); "
            "apt-get install qemu-system-x86"
        )
    return Qemu([exe], out.stdout.splitlines()[0], share=str(root / "usr/share/qemu"))


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


def boot(
    qemu: Qemu,
    machine_args: list[str],
    log_path: Path,
    nonce: str,
    name: str,
    timeout: float,
    interactive: bool = False,
) -> BootResult:
    """Run QEMU, tee the serial console to ``log_path``, and parse the /init markers."""
    argv = list(qemu.argv_prefix) + ["-no-user-config"]
    if qemu.share:
        argv += ["-L", qemu.share]
    if qemu.firmware:
        argv += ["-bios", qemu.firmware]
    argv += machine_args
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if interactive:
        rc = subprocess.call(argv + ["-nographic"], env={**os.environ, **qemu.env})
        return BootResult(name, rc, "interactive shell", seconds=time.monotonic() - t0)

    argv += ["-display", "none", "-serial", "stdio", "-monitor", "none"]
    log(f"{name}: booting with {qemu.version.split(' (')[0]} (command line at the top of {log_path.name})")
    rc_mark = ird.MARK_RC.format(nonce=nonce)
    err_mark = ird.MARK_INIT_ERROR.format(nonce=nonce)
    seen_end = threading.Event()
    lines: list[str] = []
    with open(log_path, "w") as logf:
        logf.write("# " + " ".join(argv) + "\n")
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, **qemu.env},
        )

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").replace("\r", "").rstrip("\n")
                lines.append(line)
                logf.write(line + "\n")
                logf.flush()
                if rc_mark in line or err_mark in line:
                    seen_end.set()

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        deadline = t0 + timeout
        timed_out = False
        while proc.poll() is None:
            if time.monotonic() > deadline:
                timed_out = True
                break
            if seen_end.is_set():
                # /init powers off right after the last marker; do not wait forever if it doesn't
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
                break
            time.sleep(0.1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        th.join(timeout=5)
    seconds = time.monotonic() - t0
    res = parse_console(lines, nonce, name)
    res.seconds = seconds
    res.log = str(log_path)
    if res.reason and timed_out:
        res.status, res.reason = 4, f"{name}: timed out after {timeout:.0f} s ({res.reason}); see {log_path}"
    elif res.reason:
        res.reason = f"{res.reason} (QEMU exit {proc.returncode}); see {log_path}"
    return res


def _between(lines: list[str], begin: str, end: str) -> list[str] | None:
    try:
        i = next(k for k, l in enumerate(lines) if begin in l)
    except StopIteration:
        return None
    out = []
    for l in lines[i + 1 :]:
        if end in l:
            return out
        out.append(l)
    return None


def parse_console(lines: list[str], nonce: str, name: str) -> BootResult:
    fmt = lambda m: m.format(nonce=nonce)
    err = next((l for l in lines if fmt(ird.MARK_INIT_ERROR) in l), None)
    if err:
        why = err.split(fmt(ird.MARK_INIT_ERROR), 1)[1].rstrip("@")
        return BootResult(name, 3, f"{name}: lab /init failed: {why}")
    output = _between(lines, fmt(ird.MARK_OUT_BEGIN), fmt(ird.MARK_OUT_END))
    rc_line = next((l for l in lines if fmt(ird.MARK_RC) in l), None)
    if output is None or rc_line is None:
        started = any(fmt(ird.MARK_OUT_BEGIN) in l for l in lines)
        tail = next((l for l in reversed(lines) if l.strip()), "no console output")
        what = "inner pytest did not finish" if started else "lab did not reach the tests"
        return BootResult(name, 3, f"{name}: {what}; last console line: {tail[:160]!r}")
    status = int(rc_line.split(fmt(ird.MARK_RC), 1)[1].split("@", 1)[0])
    b64 = _between(lines, fmt(ird.MARK_XML_BEGIN), fmt(ird.MARK_XML_END))
    junit = None
    reason = ""
    if b64 is not None:
        try:
            junit = base64.b64decode("".join(l.strip() for l in b64), validate=True)
        except (binascii.Error, ValueError):
            reason = f"{name}: JUnit XML came back corrupted"
            status = status or 5
    elif status not in (5,):  # 5 = no tests collected: pytest still writes the XML, so this is odd
        reason = f"{name}: inner pytest wrote no JUnit XML"
        status = status or 5
    summary = [l for l in output if l.strip()][-15:]
    return BootResult(name, status, reason, summary, "\n".join(output), junit)


def merge_junit(results: list[BootResult], out: Path, lab: str) -> ET.Element:
    """One JUnit file per lab; with several runs (CPU models) testsuite and testcase names carry the run name."""
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
    out.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)
    return root
