"""``python -m pykvm.lab {riscv,nested}``: build a lab image, boot it in QEMU, run pytest inside.

Exit status: the inner pytest's status; 3 when the lab could not be prepared or booted (or /init
failed), 4 on timeout, 5 when no results came back.  The one-line reason is printed last.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .build import CHECKOUT, Options, run_lab


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pykvm.lab",
        description="Run pykvm's inner test suites on real KVM inside QEMU: 'riscv' (a RISC-V hart with "
        "the H extension, Debian sid kernel) or 'nested' (x86_64 with nested SVM under TCG, Debian "
        "bookworm cloud kernel). Results go to <out>/<lab>.xml (JUnit) and <out>/manifest.json.",
    )
    p.add_argument("lab", choices=["riscv", "nested"])
    p.add_argument("tests", nargs="*", help="inner test paths relative to the checkout (default: riscv: "
                   "tests/riscv tests/lab/inner_smoke; nested: tests/nested tests/lab/inner_smoke; absent ones are skipped)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("PYKVM_LAB_CACHE", "~/.cache/pykvm/lab")),
                   help="download/unpack cache (default ~/.cache/pykvm/lab, or $PYKVM_LAB_CACHE)")
    p.add_argument("--out", type=Path, default=CHECKOUT / "build" / "lab", help="output dir (default <checkout>/build/lab)")
    p.add_argument("--keep", action="store_true", help="keep the staging trees of the run in <out>/<lab>/")
    p.add_argument("--timeout", type=float, help="seconds per QEMU boot (default 600)")
    p.add_argument("--cpu", action="append", help="riscv CPU model (rv64 or max; repeatable; default both)")
    p.add_argument("-k", dest="k", metavar="EXPR", help="passed to the inner pytest as -k EXPR")
    p.add_argument("--shell", action="store_true", help="boot to an interactive busybox shell instead of running tests")
    p.add_argument("--refresh", action="store_true", help="re-fetch the Debian indexes even if cached ones are fresh")
    p.add_argument("--kernel-suite", default="sid", help="Debian suite for the riscv kernel (default sid; forky also works)")
    a = p.parse_intermixed_args(argv)
    cpus = None
    if a.cpu:
        cpus = [c for arg in a.cpu for c in arg.split(",") if c]
        if a.lab != "riscv":
            p.error("--cpu applies to the riscv lab only")
    opts = Options(cache=a.cache.expanduser(), out=a.out.expanduser().resolve(), keep=a.keep, timeout=a.timeout,
                   cpus=cpus, k=a.k, tests=a.tests or None, shell=a.shell, refresh=a.refresh,
                   kernel_suite=a.kernel_suite)
    return run_lab(a.lab, opts)


if __name__ == "__main__":
    sys.exit(main())
