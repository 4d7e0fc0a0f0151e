"""The command line of ``python -m pykvm.fuzz``: its options (:func:`build_parser`),
:func:`main` (exit statuses in docs/fuzzing.md "Exit status") and :func:`program`, ``main`` as a
process whose stdout may fail.
"""
import argparse
import errno
import json
import math
import os
import sys
from typing import List, Optional

from .. import _cliutil
from .._host import HOST_ARCH
from ..errors import PykvmError
from ..kvm import Kvm
from ..outfile import ReportPathError, check_report_path
from . import device_generator, device_runner, generator, virtio_generator
from .replay import replay
from .runner import worker_main
from .supervisor import (DEFAULT_OUT, EXIT_ENVIRONMENT, EXIT_FINDINGS, EXIT_INTERRUPTED, EXIT_OK,
                         EXIT_USAGE, CHECK_INTERVAL, FD_SLACK, HANG_GRACE, PROG, RSS_SLACK_MB,
                         WARMUP, Supervisor, print_summary)

_invocation = {"json": False}     # whether this command line asked for --json


def _json_requested(argv) -> bool:
    args = list(argv)
    if "--" in args:
        args = args[:args.index("--")]
    return "--json" in args and not any(a in ("-h", "--help") for a in args)


def _fail(code: int, line: str) -> int:
    """A run that ended without a summary: ``line`` on stderr and, with --json, one JSON object
    on stdout (``exit``, ``exit_code``, ``detail``). Returns ``code``."""
    if _invocation["json"]:
        name = {EXIT_USAGE: "bad_input", EXIT_ENVIRONMENT: "host_error",
                EXIT_INTERRUPTED: "interrupted"}.get(code, "error")
        try:
            print(json.dumps({"exit": name, "exit_code": code, "detail": line}, indent=1))
        except (OSError, ValueError):        # stdout failed: told by the program's exit
            pass
    _cliutil.err(line)
    return code


# errnos that mean the host, not the command line, failed a path (a full disk, no memory ...)
_HOST_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
                errno.EROFS)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SystemExit(_fail(EXIT_USAGE, f"{self.prog}: error: {message}"))


def _positive_int(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return n


def _seed(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return n


def _jobs(text: str) -> int:
    n = _positive_int(text)
    if n > 64:
        raise argparse.ArgumentTypeError(f"at most 64 jobs: {text!r}")
    return n


def _vcpus(text: str) -> int:
    n = _positive_int(text)
    if n > 16:
        raise argparse.ArgumentTypeError(f"at most 16 vCPUs: {text!r}")
    return n


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(v) or v <= 0 or v > 60:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds in (0, 60]: {text!r}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return v


def _modes(text: str) -> List[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("no modes given (use real,protected,long)")
    if all(p in virtio_generator.MODES for p in parts):       # --virtio targets
        return [m for m in virtio_generator.MODES if m in parts]
    bad = [p for p in parts if p not in generator.MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode {bad[0]!r} "
                                         f"(choose from {','.join(generator.MODES)})")
    return [m for m in generator.MODES if m in parts]          # canonical order: cases depend on it


def _inject_spec(text: str) -> str:
    kind, sep, at = text.partition("@")
    if not sep or kind not in ("crash", "hang", "raise", "leakfd", "leakmem", "vmmerror", "cpu"):
        raise argparse.ArgumentTypeError(f"bad injection {text!r} (KIND@INDEX)")
    try:
        int(at)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad injection {text!r} (KIND@INDEX)") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Run random guests (random bytes and random valid x86 instruction streams, "
                    "random registers, flags and entry points, 1-N vCPUs) in real, protected "
                    "and long mode on /dev/kvm, each in a fresh VM under a deadline, and count "
                    "how they end. Worker crashes, hangs, unexpected Python exceptions and "
                    "fd/RSS growth are findings, saved as reproducers for --replay.",
        epilog="Device mode (--devices): each case is a PC machine with a random subset of the "
               "optional devices edu and intel-iommu whose 1-4 vCPUs (long or protected mode) "
               "drive every device concurrently: random port and MMIO accesses of every width "
               "and alignment, fw_cfg, PCI configuration (BARs, MSI), VT-d (tables, queues, "
               "interrupt remapping, faults), edu DMA and interrupts, RTC, ACPI PM, pc-testdev, "
               "the 16550 and resets, with tables, queues and DMA buffers at random addresses. "
               "There a guest that ends the machine with the VMM-error status (vmm_error) or "
               "costs the host more than 2 ms of CPU per access on average (cpu) is a finding "
               "too. Exit status: 0 no findings, 1 findings, 2 bad arguments, 8 /dev/kvm or the "
               "host unusable (stdout closed or full, a reproducer that could not be saved), "
               "141 stdout's reader gone, 130 interrupted (the summary so far is printed). See "
               "docs/fuzzing.md. Virtio mode (--virtio): each case is a hostile driver of one "
               "virtio device (rng, blk on a temporary image, blk-ro, console) behind "
               "virtio-mmio or virtio-pci, replayed on the host against the real model: "
               "registers and configuration space of every width, PCI configuration with its "
               "PCI_CFG window and MSI-X, broken initialisations, rings laid out in guest RAM "
               "and mutated (loops, indices past the table, bad indirect tables, lengths near "
               "2^32, buffers outside RAM, avail index jumps), then notified; --modes picks "
               f"targets from {','.join(virtio_generator.MODES)}. There an invariant the "
               "device broke (invariant), an operation over 5 s (cpu) or host memory or fds "
               "kept (leak) are findings too.",
    )
    p.add_argument("--devices", action="store_true",
                   help="device mode: fuzz the PC machine's devices instead of the CPU (see "
                        "below); --modes then picks from protected,long")
    p.add_argument("--virtio", action="store_true",
                   help="virtio mode: fuzz the virtio transports and devices (see below); "
                        "--modes then picks targets such as mmio-rng,pci-blk")
    p.add_argument("--runs", type=_positive_int, default=1000, metavar="N",
                   help="number of cases to run (default %(default)s)")
    p.add_argument("--seed", type=_seed, default=0, metavar="S",
                   help="run seed: case I of seed S is always the same guest (default %(default)s)")
    p.add_argument("--jobs", type=_jobs, default=min(os.cpu_count() or 1, 4), metavar="J",
                   help="worker processes (default: CPUs, at most 4: %(default)s here)")
    p.add_argument("--deadline", type=_seconds, default=None, metavar="SECONDS",
                   help=f"how long each guest may run (default {generator.DEFAULT_DEADLINE}, "
                        f"{device_generator.DEFAULT_DEADLINE} with --devices); a case still "
                        "running 2 s past its deadline is a hang (up to 10 s on a loaded host)")
    p.add_argument("--modes", type=_modes, default=None, metavar="LIST",
                   help="comma-separated CPU modes to draw from (default "
                        f"{','.join(generator.MODES)}; {','.join(device_generator.MODES)} "
                        "with --devices)")
    p.add_argument("--max-vcpus", type=_vcpus, default=4, metavar="N",
                   help="most vCPUs in one guest, each run in its own thread (default %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="where reproducers of findings are written (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--replay", metavar="FILE",
                   help="run a reproducer (or a saved case file) again, supervised, instead of "
                        "fuzzing; exit 1 if it still produces a finding")
    p.add_argument("--quiet", action="store_true", help="no progress lines or finding notices on stderr")
    # Test and tuning hooks, not part of the documented interface.
    S = argparse.SUPPRESS
    p.add_argument("--_worker", action="store_true", help=S)
    p.add_argument("--_inject", action="append", type=_inject_spec, default=[], help=S)
    p.add_argument("--_warmup", type=_positive_int, default=WARMUP, help=S)
    p.add_argument("--_fd-slack", dest="_fd_slack", type=_positive_int, default=FD_SLACK, help=S)
    p.add_argument("--_rss-slack-mb", dest="_rss_slack_mb", type=_nonneg_float,
                   default=RSS_SLACK_MB, help=S)
    p.add_argument("--_check-interval", dest="_check_interval", type=_nonneg_float,
                   default=CHECK_INTERVAL, help=S)
    p.add_argument("--_grace", type=_nonneg_float, default=HANG_GRACE, help=S)
    p.add_argument("--_start", type=_seed, default=0, help=S)
    return p


def _check_kvm() -> Optional[str]:
    """Why /dev/kvm cannot be used (one line), or None when it can."""
    try:
        Kvm().close()
    except PykvmError as e:
        return str(e)
    return None


def _check_out_dir(path: str) -> "tuple[int, str] | None":
    """Refuse, before any case runs, a findings directory reproducers can never be written to:
    (status, one line), or None when ``path`` is (or can be made) a writable directory.
    A file, device or FIFO where the directory should be is bad input (2); a host that cannot
    create it (a full or read-only file system) is a host failure (8)."""
    where = f"{PROG}: error: --out {path}"
    try:
        if os.path.lexists(path):
            if not os.path.isdir(path):
                return EXIT_USAGE, f"{where}: not a directory"
        else:
            check_report_path(path, "reproducers")      # its nearest parent: a directory
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            return EXIT_USAGE, f"{where}: {os.strerror(errno.EACCES)}"
    except ReportPathError as e:
        return (EXIT_ENVIRONMENT if e.errno in _HOST_ERRNOS else EXIT_USAGE), f"{PROG}: error: {e}"
    except OSError as e:
        return ((EXIT_ENVIRONMENT if e.errno in _HOST_ERRNOS else EXIT_USAGE),
                f"{where}: {e.strerror or e}")
    return None


def main(argv=None) -> int:
    """``python -m pykvm.fuzz``; returns the exit status (docs/fuzzing.md "Exit status"):
    0 no findings, 1 findings, 2 bad arguments, 8 /dev/kvm or the host unusable (including a
    stdout or findings directory that cannot take the output), 130 interrupted. Every failure
    is one line on stderr and, with --json, one JSON object on stdout."""
    _invocation["json"] = _json_requested(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._worker:
        return worker_main(args._inject)
    if args.devices and not device_runner.supported():
        return _fail(EXIT_USAGE, f"{PROG}: error: --devices drives the x86 PC machine's "
                     f"devices; this host is {HOST_ARCH}")
    if args.virtio and args.devices:
        parser.error("--virtio and --devices are different modes: pick one")
    if args.deadline is None:
        args.deadline = (virtio_generator.DEFAULT_DEADLINE if args.virtio else
                         device_generator.DEFAULT_DEADLINE if args.devices
                         else generator.DEFAULT_DEADLINE)
    if args.modes is None:
        args.modes = list(virtio_generator.MODES if args.virtio else
                          device_generator.MODES if args.devices else generator.MODES)
    elif args.virtio:
        bad = [m for m in args.modes if m not in virtio_generator.MODES]
        if bad:
            parser.error("argument --modes: virtio mode runs the targets "
                         f"{','.join(virtio_generator.MODES)}, not {bad[0]!r}")
    elif any(m in virtio_generator.MODES for m in args.modes):
        parser.error(f"argument --modes: {args.modes[0]!r} is a --virtio target")
    elif args.devices:
        bad = [m for m in args.modes if m not in device_generator.MODES]
        if bad:
            parser.error("argument --modes: device mode runs in "
                         f"{','.join(device_generator.MODES)}, not {bad[0]!r}")
    try:
        if args.replay:
            if not os.path.isfile(args.replay):
                return _fail(EXIT_USAGE, f"{PROG}: error: no such file: {args.replay}")
            try:
                return replay(args.replay, as_json=args.json, grace=args._grace, out_dir=args.out,
                              quiet=args.quiet)
            except (ValueError, KeyError, TypeError) as e:
                return _fail(EXIT_USAGE, f"{PROG}: error: {args.replay} is not a reproducer: {e}")
        bad_out = _check_out_dir(args.out)
        if bad_out:
            return _fail(*bad_out)
        err = _check_kvm()
        if err:
            return _fail(EXIT_ENVIRONMENT, f"{PROG}: {err}")
        sup = Supervisor(runs=args.runs, seed=args.seed, jobs=args.jobs, deadline=args.deadline,
                         modes=args.modes, max_vcpus=args.max_vcpus, out_dir=args.out,
                         quiet=args.quiet, inject=args._inject, start=args._start,
                         warmup=args._warmup, fd_slack=args._fd_slack,
                         rss_slack_mb=args._rss_slack_mb, check_interval=args._check_interval,
                         grace=args._grace, devices=args.devices, virtio=args.virtio)
        try:
            sup.run()
        except RuntimeError as e:
            return _fail(EXIT_ENVIRONMENT, f"{PROG}: {e}")
        s = sup.summary()
        if args.json:
            print(json.dumps(s, indent=1))
        else:
            print_summary(s)
        sys.stdout.flush()
        if s["interrupted"]:
            return EXIT_INTERRUPTED
        if sup.save_error is not None:       # findings whose reproducers were lost: said once
            return EXIT_ENVIRONMENT
        return EXIT_FINDINGS if s["findings"] else EXIT_OK
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, f"{PROG}: interrupted")


def program() -> int:
    """``python -m pykvm.fuzz`` as a program: stdout that cannot take the output (closed, full,
    a reader gone) is one line on stderr and status 8 (141 for a closed pipe), never success and
    never a traceback; stderr that cannot be written only loses its messages."""
    if "--_worker" in sys.argv[1:]:              # a worker: its stdout is the protocol pipe
        return main()

    def host_failure(e) -> int:                  # the host failed us (fds, processes, disk)
        if isinstance(e, MemoryError):
            return _fail(EXIT_ENVIRONMENT, f"{PROG}: out of memory")
        where = f"{e.filename}: " if e.filename else ""
        return _fail(EXIT_ENVIRONMENT, f"{PROG}: {where}{e.strerror or e}")
    return _cliutil.run_program(main, PROG, EXIT_ENVIRONMENT, EXIT_USAGE, host_failure)
