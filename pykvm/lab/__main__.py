"""``python -m pykvm.lab {riscv,nested}``: build a lab image, boot it in QEMU, run pytest inside.

Exit status: the inner pytest's status; 2 bad arguments (including an --out or --cache that
is not, and cannot become, a directory); 3 when the lab could not be prepared or booted (or
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
        "bookworm cloud kernel). Results go to <out>/<lab>.xml (JUnit) and <out>/manifest.json. "
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
    p.add_argument("--timeout", type=float, help="seconds per QEMU boot (default 600)")
    p.add_argument("--cpu", action="append", help="riscv CPU model (rv64 or max; repeatable; default both)")
    p.add_argument("-k", dest="k", metavar="EXPR", help="passed to the inner pytest as -k EXPR")
    p.add_argument("--shell", action="store_true", help="boot to an interactive busybox shell instead of running tests")
    p.add_argument("--refresh", action="store_true", help="re-fetch the Debian indexes even if cached ones are fresh")
    p.add_argument("--kernel-suite", default="sid", help="Debian suite for the riscv kernel (default sid; forky also works)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="echo QEMU's serial console to stderr instead of the live status line")
    a = p.parse_intermixed_args(argv)
    cpus = None
    if a.cpu:
        cpus = [c for arg in a.cpu for c in arg.split(",") if c]
        if a.lab != "riscv":
            p.error("--cpu applies to the riscv lab only")
    return a.lab, Options(cache=a.cache.expanduser(), out=a.out.expanduser().resolve(), keep=a.keep,
                          timeout=a.timeout, cpus=cpus, k=a.k, tests=a.tests or None, shell=a.shell,
                          refresh=a.refresh, kernel_suite=a.kernel_suite, verbose=a.verbose)


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
