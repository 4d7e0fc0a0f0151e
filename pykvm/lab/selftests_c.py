"""Build and run the kernel's own C KVM selftests, for comparison with their pykvm ports.

``python -m pykvm.lab.selftests_c [--dir DIR] [--package PKG] [--timeout S] [--build-only] [TEST ...]``

1. ``apt-get download PKG`` (default ``linux-source-6.12``, the newest kernel source package this
   machine's apt knows; ``linux-source-6.1`` also works) into ``DIR`` (default
   ``build/selftests``, git-ignored) unless a ``PKG_*.deb`` is already there;
2. unpacks ``usr/src/linux-source-*.tar.xz`` from it and that tarball (once);
3. ``make headers`` in the source tree (the uAPI headers the selftests compile against), then
   ``make -C tools/testing/selftests/kvm -j2 <absolute target paths>`` for the tests named
   (default :data:`TESTS`); the Debian kernel sources are never copied into this repository;
4. runs each test binary (from its own directory, with ``--timeout`` seconds each) and prints one
   row per test: verdict from the kselftest exit status (0 pass, 4 skip, anything else fail; a
   timeout is ``timeout``), wall time in seconds, and the test's last output line; writes the
   same as JSON to ``DIR/results.json`` with the kernel source version and the host.

Exit status: 0 when every test passed or skipped, 1 when one failed or timed out, 3 when a step
before the runs (download, unpack, build) failed; the one-line reason is printed last.
Needs ``apt-get``, ``dpkg-deb``, ``tar``, ``make`` and ``gcc`` on the host; /dev/kvm to run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = CHECKOUT / "build" / "selftests"
DEFAULT_PACKAGE = "linux-source-6.12"

#: the selftests (paths under tools/testing/selftests/kvm) that make sense on a host without
#: VMX/SVM; docs/selftests.md lists their verdicts here and under pykvm
TESTS = (
    "x86_64/set_sregs_test", "x86_64/sync_regs_test", "x86_64/debug_regs", "x86_64/cpuid_test",
    "x86_64/platform_info_test", "kvm_binary_stats_test", "dirty_log_test",
    "memslot_modification_stress_test", "x86_64/xss_msr_test", "x86_64/hyperv_cpuid",
    "set_memory_region_test", "x86_64/tsc_msrs_test", "x86_64/userspace_msr_exit_test",
    "x86_64/userspace_io_test", "x86_64/cr4_cpuid_sync_test", "x86_64/kvm_pv_test",
    "kvm_create_max_vcpus", "x86_64/exit_on_emulation_failure_test", "x86_64/fix_hypercall_test",
    "x86_64/kvm_clock_test", "x86_64/xcr0_cpuid_test", "x86_64/get_msr_index_features",
    "x86_64/hwcr_msr_test", "x86_64/max_vcpuid_cap_test", "x86_64/triple_fault_event_test",
    "coalesced_io_test", "guest_print_test", "x86_64/monitor_mwait_test",
    "x86_64/xapic_state_test", "x86_64/set_boot_cpu_id",
)

KSFT_PASS, KSFT_SKIP = 0, 4


class StepError(Exception):
    """A step before the runs failed (download, unpack, build); the message is one line."""


def _run(cmd: List[str], cwd: Path, log: Path) -> None:
    """Run ``cmd`` in ``cwd`` with its output appended to ``log``; StepError when it fails."""
    with open(log, "ab") as f:
        rc = subprocess.call(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        raise StepError(f"{' '.join(cmd[:3])} ... failed with status {rc} (see {log})")


def source_tree(work: Path, package: str) -> Path:
    """The unpacked kernel source tree of ``package`` in ``work``, downloaded and unpacked when
    missing. Raises StepError when apt-get, dpkg-deb or tar fails."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "build.log"
    debs = sorted(glob.glob(str(work / f"{package}_*.deb")))
    if not debs:
        _run(["apt-get", "download", package], work, log)
        debs = sorted(glob.glob(str(work / f"{package}_*.deb")))
        if not debs:
            raise StepError(f"apt-get download {package} left no .deb in {work}")
    deb = Path(debs[-1])
    trees = [p for p in work.glob("linux-source-*") if p.is_dir()]
    if trees:
        return trees[0]
    tarball = work / "linux-source.tar.xz"
    if not tarball.exists():
        with open(tarball, "wb") as out:
            dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
            tar = subprocess.call(["tar", "-x", "--wildcards", "-O", "./usr/src/linux-source-*.tar.xz"],
                                  stdin=dpkg.stdout, stdout=out)
            if dpkg.wait() or tar:
                tarball.unlink()
                raise StepError(f"could not take the source tarball out of {deb.name}")
    _run(["tar", "-xJf", str(tarball)], work, log)
    trees = [p for p in work.glob("linux-source-*") if p.is_dir()]
    if not trees:
        raise StepError(f"{tarball.name} held no linux-source-* directory")
    return trees[0]


def kernel_version(src: Path) -> str:
    """``VERSION.PATCHLEVEL.SUBLEVEL`` from the tree's top Makefile ("" when unreadable)."""
    fields: Dict[str, str] = {}
    try:
        for line in (src / "Makefile").read_text().splitlines()[:8]:
            k, _, v = line.partition("=")
            fields[k.strip()] = v.strip()
    except OSError:
        return ""
    return ".".join(fields.get(k, "?") for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL"))


def build(src: Path, tests: List[str], jobs: int = 2) -> Path:
    """Build the named selftests in ``src``; returns the kvm selftests directory.
    Raises StepError when ``make`` fails."""
    log = src.parent / "build.log"
    if not (src / "usr" / "include" / "linux" / "kvm.h").exists():
        _run(["make", "headers", f"-j{jobs}"], src, log)
    kdir = src / "tools" / "testing" / "selftests" / "kvm"
    # absolute targets: the selftests Makefile's rules are written for $(OUTPUT)/<test>
    _run(["make", f"-j{jobs}", *[str(kdir / t) for t in tests]], kdir, log)
    return kdir


def run_one(kdir: Path, test: str, timeout: float) -> dict:
    """Run one built selftest; a dict with test, verdict, status, seconds and last_line."""
    binary = kdir / test
    t0 = time.monotonic()
    try:
        p = subprocess.run([str(binary)], cwd=binary.parent, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout)
        rc: Optional[int] = p.returncode
        out = p.stdout
    except subprocess.TimeoutExpired as e:
        rc, out = None, e.stdout or b""
    except OSError as e:
        rc, out = -1, str(e).encode()
    secs = time.monotonic() - t0
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    verdict = ("timeout" if rc is None else "pass" if rc == KSFT_PASS
               else "skip" if rc == KSFT_SKIP else "fail")
    return {"test": test, "verdict": verdict, "status": rc, "seconds": round(secs, 2),
            "last_line": lines[-1].strip() if lines else "", "output": lines[-40:]}


def host_facts() -> dict:
    """The host as docs/selftests.md names it: CPU model, kernel, KVM modules loaded."""
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:            # built-in modules are in /sys/module too, not in /proc/modules
        mods = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm"))
    except OSError:
        mods = []
    return {"cpu": model, "kernel": platform.release(), "kvm_modules": mods,
            "date": time.strftime("%Y-%m-%d")}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pykvm.lab.selftests_c", description=__doc__.split("\n")[0])
    ap.add_argument("tests", nargs="*", help=f"tests to build and run (default: {len(TESTS)} x86 ones)")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="work directory (build/selftests)")
    ap.add_argument("--package", default=DEFAULT_PACKAGE, help="Debian kernel source package")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per test (120)")
    ap.add_argument("--build-only", action="store_true", help="build, do not run")
    args = ap.parse_args(argv)
    tests = args.tests or list(TESTS)
    try:
        src = source_tree(args.dir, args.package)
        kdir = build(src, tests)
    except (StepError, OSError) as e:
        print(f"selftests_c: {e}", file=sys.stderr)
        return 3
    version = kernel_version(src)
    print(f"kernel source {version} ({src}); host {host_facts()}")
    if args.build_only:
        return 0
    results = []
    for t in tests:
        r = run_one(kdir, t, args.timeout)
        results.append(r)
        print(f"{t:45s} {r['verdict']:8s} {r['seconds']:8.2f}s  {r['last_line'][:100]}", flush=True)
    (args.dir / "results.json").write_text(json.dumps(
        {"kernel_source": version, "package": args.package, "host": host_facts(), "results": results},
        indent=1))
    bad = [r["test"] for r in results if r["verdict"] in ("fail", "timeout")]
    print(f"{len(results)} run: {len(results) - len(bad)} passed or skipped"
          + (f"; failed: {' '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
