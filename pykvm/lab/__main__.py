"""``python -m pykvm.lab {riscv,nested}``: build a lab image, boot it in QEMU, run pytest inside.

Exit status: the inner pytest's status; 2 bad arguments (including an --out or --cache that
is not, and cannot become, a directory, a --kernel that is not a kernel image for the lab, a
module built for another kernel release than the one that boots, a --param naming a module or
parameter the lab's KVM does not have); 3 when the lab could not be prepared or booted (or
/init failed), a directory it needs could not be created, or its results (JUnit XML, manifest)
could not be written; 4 on timeout; 5 when no results came back; 8 when stdout cannot take the
output (closed, a full disk; 141 when its reader went away), as for every pykvm command;
130 / 143 / 129 when SIGINT / SIGTERM / SIGHUP stopped it (QEMU and every other child stopped,
temporary files removed, one line on stderr). The one-line reason is printed last.
"""

from __future__ import annotations

import sys

from . import proc

if __name__ == "__main__":
    # first thing, so that a Ctrl-C from here on ends the lab cleanly (no traceback)
    proc.install_signal_handlers()

import argparse
import errno
import os
import time
from pathlib import Path

from .. import _cliutil
from ..outfile import ReportPathError, check_report_path
from . import devkernel as dk
from . import matrix as mx
from . import progress
from .build import CHECKOUT, Options, run_lab

PROG = "python -m pykvm.lab"
EXIT_PREPARE = 3          # the lab could not be prepared (here: a directory it needs)
EXIT_OUTPUT = 8           # stdout cannot take the output (as pykvm's own commands)
# errnos that mean the host failed a path, not the command line (a full or read-only disk ...)
_HOST_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
                errno.EROFS)


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line (no usage block), status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _dir_argument(text: str) -> Path:
    """An --out/--cache directory: one that exists, or whose nearest existing parent is a
    directory (it is created when the lab starts). A file, device, FIFO or socket there is
    refused (argparse's one line, status 2): the lab never writes over what a path names."""
    if not text or "\0" in text:
        raise argparse.ArgumentTypeError(f"not a directory path: {text!r}")
    p = Path(text).expanduser()
    if os.path.lexists(p):
        if not p.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: not a directory")
        return p
    try:
        check_report_path(p, "the directory")        # the parents: directories
    except ReportPathError as e:
        raise argparse.ArgumentTypeError(f"{text}: {os.strerror(e.errno)}") from None
    return p


def _cpus_argument(text: str) -> int:
    """--smp N: 1 to 8 CPUs (QEMU TCG on the host's own CPUs: more only slows the lab)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number of CPUs") from None
    if not 1 <= n <= 8:
        raise argparse.ArgumentTypeError(f"{n}: the lab VM takes 1 to 8 CPUs")
    return n


def _module_argument(text: str) -> Path:
    """A --kvm-module file: an existing file named as a kernel module (read before anything is
    downloaded; its contents are checked when the lab reads its .modinfo)."""
    p = _file_argument(text)
    if not p.name.endswith(dk.MODULE_SUFFIXES):
        raise argparse.ArgumentTypeError(f"{text}: not a module file name (*.ko, *.ko.xz, *.ko.zst, *.ko.gz)")
    return p


def _file_argument(text: str) -> Path:
    """A --kernel / --kvm-module file: one that exists and is a regular file (or a link to one)."""
    p = Path(text).expanduser()
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text}: {'not a file' if p.exists() else 'no such file'}")
    return p


def _modules(p: argparse.ArgumentParser, a: argparse.Namespace) -> list[Path]:
    """The module files of --modules DIR and --kvm-module FILE (a --kvm-module replaces the module
    of the same name found in DIR); one line and status 2 for a directory without the lab's KVM
    modules or a --param naming a module outside the lab's KVM stack."""
    found: list[Path] = []
    try:
        if a.modules:
            found = dk.find_modules(a.modules.expanduser(), a.lab, with_net=bool(a.kernel))
        if a.kernel:
            dk.check_kernel_image(a.kernel, a.lab)
    except dk.LabInputError as e:
        p.error(str(e))
    names = {dk.module_name(f) for f in a.kvm_module or []}
    mods = [f for f in found if dk.module_name(f) not in names] + list(a.kvm_module or [])
    given = [n for n in (dk.module_name(m) for m in mods) if n not in dk.NET_MODULES]
    # the modules a --param may name: the lab's KVM stack (Debian's, or built into --kernel) and
    # whatever else is given to load
    known = list(dict.fromkeys([*dk.KVM_STACK[a.lab], *given]))
    try:
        mx.check_modules(mx.parse_params(a.param or []), known)
    except ValueError as e:
        p.error(str(e))
    return mods


def _make_dirs(opts: Options) -> "tuple[int, str] | None":
    """Create --out and --cache before any work: (status, one line) when one cannot be made or
    written (2 when the path is refused, 3 when the host fails it), else None."""
    for opt, d in (("--out", opts.out), ("--cache", opts.cache)):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if not os.access(d, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as e:
            code = EXIT_PREPARE if e.errno in _HOST_ERRNOS else 2
            return code, f"{PROG}: error: argument {opt}: {d}: {e.strerror or e}"
    return None


def _parse(argv: list[str] | None) -> tuple[str, Options]:
    p = _Parser(
        prog=PROG,
        description="Run pykvm's inner test suites on real KVM inside QEMU: 'riscv' (a RISC-V hart with "
        "the H extension, Debian sid kernel) or 'nested' (x86_64 with nested SVM under TCG, Debian "
        "bookworm cloud kernel). Results go to <out>/<lab>.xml (JUnit), <out>/<lab>.ktap (KTAP) and <out>/manifest.json. "
        "Progress goes to stderr: bars and a live status line on a terminal, plain lines elsewhere "
        "(PYKVM_LAB_PROGRESS=tty|plain overrides). Ctrl-C stops QEMU and cleans up (exit 130).",
    )
    p.add_argument("lab", choices=["riscv", "nested"])
    p.add_argument("tests", nargs="*", help="inner test paths relative to the checkout (default: riscv: "
                   "tests/riscv tests/lab/inner_smoke; nested: tests/nested tests/lab/inner_smoke; absent ones are skipped)")
    p.add_argument("--cache", type=_dir_argument, default=Path(os.environ.get("PYKVM_LAB_CACHE", "~/.cache/pykvm/lab")),
                   help="download/unpack cache (default ~/.cache/pykvm/lab, or $PYKVM_LAB_CACHE); "
                   "labs may share one at the same time")
    p.add_argument("--out", type=_dir_argument, default=CHECKOUT / "build" / "lab", help="output dir (default <checkout>/build/lab)")
    p.add_argument("--keep", action="store_true", help="keep the staging trees of the run in <out>/<lab>/")
    p.add_argument("--timeout", type=float, help="seconds per QEMU boot (default: the lab's, 1200 s for a nested boot, 2400 s for "
                   "riscv's, 600 s for the benchmark boot)")
    p.add_argument("--smp", type=_cpus_argument, metavar="N",
                   help="CPUs of the lab VM (QEMU -smp) for the boots that run the selected tests "
                   "(default: nested 1, riscv 2; the nested-SVM suite's boot of its own and the "
                   "benchmark boot keep their 2). Several nested CPUs share one TCG thread")
    p.add_argument("--cpu", action="append", help="riscv CPU model (rv64 or max; repeatable; default both)")
    p.add_argument("-k", dest="k", metavar="EXPR", help="passed to the inner pytest as -k EXPR")
    p.add_argument("--shell", action="store_true", help="boot to an interactive busybox shell instead of running tests")
    p.add_argument("--refresh", action="store_true", help="re-fetch the Debian indexes even if cached ones are fresh")
    p.add_argument("--kernel-suite", default="sid", help="Debian suite for the riscv kernel (default sid; forky also works)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="echo QEMU's serial console to stderr instead of the live status line")
    g = p.add_argument_group(
        "a KVM developer's kernel and modules",
        "Each module's vermagic (its .modinfo) must name the release of the kernel that boots "
        "(Debian's, or that of --kernel as its image says; a release the image does not say is "
        "warned about, not checked); a mismatch is refused before booting. Kernel and modules "
        "(path, sha256, vermagic) go into manifest.json.")
    g.add_argument("--kernel", type=_file_argument, metavar="FILE",
                   help="boot this kernel instead of Debian's: nested an x86 bzImage "
                   "(arch/x86/boot/bzImage), riscv a RISC-V Image (arch/riscv/boot/Image). With no "
                   "KVM module given, KVM must be built in (the lab says so); Debian's modules are "
                   "not loaded into it (give tun and dummy too for the network tests). L2 Linux "
                   "guests keep Debian's kernel")
    g.add_argument("--modules", type=_dir_argument, metavar="DIR",
                   help="load the KVM modules found in DIR instead of Debian's: nested irqbypass.ko, "
                   "kvm.ko, kvm-amd.ko, riscv kvm.ko (also .ko.xz/.ko.zst/.ko.gz, at any depth: a "
                   "build tree or lib/modules/<release>; with --kernel also tun.ko, dummy.ko); "
                   "Debian's are kept for those not found")
    g.add_argument("--kvm-module", action="append", type=_module_argument, metavar="FILE",
                   help="load this module instead of Debian's of the same name (repeatable; replaces "
                   "the same module found by --modules); modules load in dependency order, "
                   "kvm_amd with the lab's nested=1")
    g.add_argument("--param", action="append", metavar="MOD.PARAM=V1,V2",
                   help="run the tests once per combination of these module parameter values (the "
                   "cartesian product of all --param), in one boot: the KVM modules are unloaded and "
                   "loaded again between combinations with the combination's values over the lab's "
                   "defaults (kvm_amd nested=1). Result names end in [MOD.PARAM=V] for the "
                   "parameters with several values, and a table per combination follows each boot. "
                   "Repeatable, e.g. --param kvm_amd.npt=0,1 --param kvm_amd.nested=1. --timeout is "
                   "per combination. With KVM built into --kernel, one value each (kernel command line)")
    a = p.parse_intermixed_args(argv)
    cpus = None
    if a.cpu:
        cpus = [c for arg in a.cpu for c in arg.split(",") if c]
        if a.lab != "riscv":
            p.error("--cpu applies to the riscv lab only")
    if a.param and a.shell:
        p.error("--param runs the tests once per combination; not with --shell")
    mods = _modules(p, a)
    return a.lab, Options(cache=a.cache.expanduser(), out=a.out.expanduser().resolve(), keep=a.keep,
                          timeout=a.timeout, cpus=cpus, k=a.k, tests=a.tests or None, shell=a.shell,
                          refresh=a.refresh, kernel_suite=a.kernel_suite, verbose=a.verbose, smp=a.smp,
                          kernel=a.kernel.resolve() if a.kernel else None,
                          modules=[m.resolve() for m in mods], params=list(a.param or []))


def main(argv: list[str] | None = None) -> int:
    proc.install_signal_handlers()
    t0 = time.monotonic()
    lab = "?"
    try:
        lab, opts = _parse(argv)
        bad = _make_dirs(opts)
        if bad:
            print(bad[1], file=sys.stderr, flush=True)
            return bad[0]
        return run_lab(lab, opts)
    except proc.Interrupted as e:
        # `finally` blocks on the way here stopped QEMU and removed the staging files; stop what is left
        proc.stop_all()
        progress.silence()
        sys.stdout.flush()
        print(f"lab {lab}: interrupted by {e.name} while {progress.current_stage()} after "
              f"{time.monotonic() - t0:.0f} s; QEMU and all child processes stopped, temporary files removed",
              file=sys.stderr, flush=True)
        return e.status
    except ReportPathError as e:          # the results (JUnit XML, manifest) could not be written
        progress.silence()
        print(f"lab {lab}: {e}", file=sys.stderr, flush=True)
        return 3
    except OSError as e:
        if _cliutil.stdout_failed(e):
            raise
        progress.silence()                # a directory or file the lab needs failed the host
        where = f"{e.filename}: " if e.filename else ""
        print(f"lab {lab}: {where}{e.strerror or e}", file=sys.stderr, flush=True)
        return 3


def _program() -> int:
    """``python -m pykvm.lab`` as a program: stdout closed, full or gone is one line on stderr
    and status 8 (141 for a reader that went away), never success and never a traceback; a
    stderr that cannot be written only loses the progress lines."""
    return _cliutil.run_program(main, PROG, EXIT_OUTPUT, 2)


if __name__ == "__main__":
    sys.exit(_program())
