"""``python -m pykvm.lab {riscv,nested}``: build a lab image, boot it in QEMU, run pytest inside.

Exit status: the inner pytest's status; 3 when the lab could not be prepared or booted (or /init
failed) or its results (JUnit XML, manifest) could not be written, 4 on timeout, 5 when no
results came back; 130 / 143 / 129 when SIGINT / SIGTERM / SIGHUP stopped it (QEMU and every
other child stopped, temporary files removed, one line on stderr). The one-line reason is
printed last.
"""

from __future__ import annotations

import sys

from . import proc

if __name__ == "__main__":
    # first thing, so that a Ctrl-C from here on ends the lab cleanly (no traceback)
    proc.install_signal_handlers()

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from ..outfile import ReportPathError  # noqa: E402
from . import progress  # noqa: E402
from .build import CHECKOUT, Options, run_lab  # noqa: E402


def _parse(argv: list[str] | None) -> tuple[str, Options]:
    p = argparse.ArgumentParser(
        prog="python -m pykvm.lab",
        description="Run pykvm's inner test suites on real KVM inside QEMU: 'riscv' (a RISC-V hart with "
        "the H extension, Debian sid kernel) or 'nested' (x86_64 with nested SVM under TCG, Debian "
        "bookworm cloud kernel). Results go to <out>/<lab>.xml (JUnit) and <out>/manifest.json. "
        "Progress goes to stderr: bars and a live status line on a terminal, plain lines elsewhere "
        "(PYKVM_LAB_PROGRESS=tty|plain overrides). Ctrl-C stops QEMU and cleans up (exit 130).",
    )
    p.add_argument("lab", choices=["riscv", "nested"])
    p.add_argument("tests", nargs="*", help="inner test paths relative to the checkout (default: riscv: "
                   "tests/riscv tests/lab/inner_smoke; nested: tests/nested tests/lab/inner_smoke; absent ones are skipped)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("PYKVM_LAB_CACHE", "~/.cache/pykvm/lab")),
                   help="download/unpack cache (default ~/.cache/pykvm/lab, or $PYKVM_LAB_CACHE); "
                   "labs may share one at the same time")
    p.add_argument("--out", type=Path, default=CHECKOUT / "build" / "lab", help="output dir (default <checkout>/build/lab)")
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


if __name__ == "__main__":
    sys.exit(main())
