"""The ``pykvm`` command line: ``run``, ``caps``, ``regs``, ``guests``, ``bench``."""
import signal
import sys


def _early_signal(signum, frame):
    # Until main() installs its handlers (a few milliseconds), a signal ends the process the way
    # main() would: one line, status 128 + signal, no traceback.
    sys.stderr.write(f"pykvm: interrupted by {signal.Signals(signum).name}\n")
    sys.stderr.flush()
    import os
    os._exit(128 + signum)


def _started_as_program() -> bool:
    """True when this process is the ``pykvm`` command (console script or ``python -m
    pykvm``), not a program that merely imports pykvm.cli."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return (getattr(spec, "name", "") in ("pykvm.__main__", "pykvm.cli")
            or sys.argv[0].rsplit("/", 1)[-1] == "pykvm")


if _started_as_program():
    try:
        for _s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(_s, _early_signal)
    except ValueError:                 # imported outside the main thread
        pass

import argparse  # noqa: E402
import errno  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

from . import __version__  # noqa: E402


class _Json:
    """``json``, imported when a command first prints JSON (most runs never do)."""

    def dumps(self, *args, **kw):
        import json
        return json.dumps(*args, **kw)


json = _Json()

EXIT_USAGE = 2
MAX_MEM = 1 << 40          # 1 TiB: far beyond any test guest, well inside the host's address space
MAX_VCPUS = 1024
MAX_TIMEOUT = 10 ** 7      # seconds (about 115 days)
MAX_CMDLINE = 1 << 16


def _size(text: str) -> int:
    """'64M', '1G', '4096', '0x100000' → bytes (a positive multiple of 4 KiB, at most 1 TiB)."""
    t = text.strip().upper()
    if t.endswith("IB"):
        t = t[:-2]
    elif t.endswith("B"):
        t = t[:-1]
    mult = 1
    if t and t[-1] in "KMGT":
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[t[-1]]
        t = t[:-1]
    try:
        n = int(t, 0) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 64M, 1G)") from None
    if n <= 0 or n % 4096:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 4 KiB: {text!r}")
    if n > MAX_MEM:
        raise argparse.ArgumentTypeError(f"{text!r} is more than the 1T pykvm accepts")
    return n


def _int_range(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            n = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range ({lo}..{hi})")
        return n
    parse.__name__ = "integer"
    return parse


def _seconds(text: str) -> float:
    """A finite number of seconds in [0, MAX_TIMEOUT]; 0 means no deadline."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(v) or v < 0 or v > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds between 0 and {MAX_TIMEOUT}")
    return v


def _cmdline(text: str) -> str:
    if len(text.encode("utf-8", "surrogateescape")) > MAX_CMDLINE or "\0" in text:
        raise argparse.ArgumentTypeError(f"command line must be under {MAX_CMDLINE} bytes "
                                         "without NUL characters")
    return text


def _file_list(text: str) -> tuple:
    """'a,b args,c' → ('a', 'b args', 'c'): QEMU's -initrd list, where each entry is a file name
    optionally followed by arguments (multiboot module strings); each file must exist."""
    items = tuple(p.strip() for p in text.split(",") if p.strip())
    if not items:
        raise argparse.ArgumentTypeError("needs at least one file")
    for item in items:
        path = item.split()[0]
        if not os.path.isfile(path):
            raise argparse.ArgumentTypeError(f"{path!r} is not a regular file")
    return items


def _wants_json(argv=None) -> bool:
    """True if the command line asks `pykvm run` for JSON (looked at before or without
    argparse, so that even a bad option or an early signal is answered with one object)."""
    args = sys.argv[1:] if argv is None else argv
    return "--json" in args and bool(args) and args[0] == "run"


def _print_json_outcome(exit_name: str, code: int, detail: str) -> None:
    import json
    print(json.dumps({"exit": exit_name, "exit_code": code, "console": "", "exits": {},
                      "seconds": 0.0, "detail": detail}, indent=2))


class _Unused:
    """Takes the arguments of a command this invocation does not run (nobody parses them)."""

    def __getattr__(self, name):
        return lambda *args, **kw: self


class _Commands(argparse._SubParsersAction):
    """The subcommands. With ``only`` set (the command on this command line), every other
    command is listed (name, help) but its parser is not built: building all of them costs
    more than some whole commands."""
    only = None

    def add_parser(self, name, **kwargs):
        if self.only is None or name == self.only:
            return super().add_parser(name, **kwargs)
        if "help" in kwargs:
            self._choices_actions.append(self._ChoicesPseudoAction(name, (), kwargs["help"]))
        self._name_parser_map[name] = _UNUSED
        return _UNUSED


_UNUSED = _Unused()


def _command_of(argv) -> "str | None":
    """The subcommand an argument list names (None when it asks for help or names none)."""
    for a in argv:
        if a in ("-h", "--help", "--version"):
            return None
        if not a.startswith("-"):
            return a
    return None


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        line = f"{self.prog}: error: {message}"
        if _wants_json():
            _print_json_outcome("bad_input", EXIT_USAGE, line)
        self.exit(EXIT_USAGE, line + "\n")


def _fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"pykvm: {msg}", file=sys.stderr)
    return code


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- signals --------------------------------------------------------------------------------
class _Signalled(BaseException):
    """Raised by the signal handler when no machine is running (start-up, output)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _SignalState:
    machine = None            # the Machine being run, if any: a signal kicks it
    signum = None             # the first SIGINT/SIGTERM received
    reported = False          # the command has already reported it


def _quiet_unraisable(hook):
    """An unraisablehook that drops our own _Signalled (raised by a signal that happened to land
    inside a finalizer or weakref callback, where Python cannot propagate it); main() still sees
    the signal through _sig.signum."""
    def unraisable(info):
        if isinstance(info.exc_value, _Signalled):
            return
        hook(info)
    return unraisable


_sig = _SignalState()


def _on_signal(signum, frame):
    if _sig.signum is None:
        _sig.signum = signum
    m = _sig.machine
    if m is not None:
        m._kick_all()         # lock-free: the run ends promptly and the CLI reports the signal
        return
    raise _Signalled(signum)


def _signal_status(signum: int) -> int:
    return 128 + signum


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _install_signal_handlers() -> None:
    if not getattr(sys.unraisablehook, "_pykvm", False):
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
        sys.unraisablehook._pykvm = True
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _on_signal)


def cmd_caps(args) -> int:
    from .kvm import Kvm
    with Kvm() as kvm:
        info = kvm.info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=False))
        return 0
    print(f"{info['path']}: KVM API {info['api_version']}, arch {info['arch']}, "
          f"vcpu mmap {info['vcpu_mmap_size']} bytes")
    on = {k: v for k, v in info["caps"].items() if v}
    print(f"capabilities offered: {len(on)} of {len(info['caps'])} known")
    for k, v in on.items():
        print(f"  KVM_CAP_{k:<32} {v}")
    for section in ("nested", "riscv"):
        if section in info:
            print(f"{section}:")
            for k, v in info[section].items():
                print(f"  {k}: {v}")
    return 0


class _OutputFailed(Exception):
    """stdout could not take the guest's console output (closed pipe, full disk...)."""


_output = {"error": None}     # the first OSError writing the console to stdout


def _console_stream():
    """on_console for `pykvm run`: write to stdout; if stdout fails (a reader that went away,
    a full disk), remember why, stop the machine and drop further output."""
    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        if _output["error"] is not None:
            return
        try:
            out.write(data)
            out.flush()
        except (OSError, ValueError) as e:
            _output["error"] = e
            m = _sig.machine
            if m is not None:
                m._kick_all()
    return write


def _output_failure() -> int:
    """The status for a failed stdout: 141 for a closed pipe (as SIGPIPE would give), else one
    line and 8. Further writes go to /dev/null so nothing fails again at exit."""
    e = _output["error"]
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    if isinstance(e, BrokenPipeError):
        return 141
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    try:
        print(f"pykvm: cannot write to stdout: {why}", file=sys.stderr)
    except (OSError, ValueError):
        pass
    return 8


def cmd_run(args) -> int:
    from . import status
    from .errors import GuestMemoryError, HostMemoryError, PykvmError
    from .loader import LoadError
    from .machine import Machine

    def outcome(exit_name: str, code: int, detail: str) -> int:
        """Report a run that ended before or outside Machine.run (one line, or one JSON)."""
        if args.json:
            print(json.dumps({"exit": exit_name, "exit_code": code, "console": "", "exits": {},
                              "seconds": 0.0, "detail": detail}, indent=2))
        print(f"pykvm: {detail}", file=sys.stderr)
        return code

    guest = args.guest
    if guest and not os.path.exists(guest) and os.sep in guest:
        return outcome("bad_input", status.BAD_INPUT, f"no such file: {guest}")
    stream = None if args.json else _console_stream()
    opts = {}
    if args.irqchip:
        opts["irqchip"] = opts["pit"] = True
    if args.machine is not None:
        from .arch import current as _cur
        if _cur.Platform.arch != "x86_64":
            return outcome("bad_input", status.BAD_INPUT, "--machine applies to x86 guests")
        opts["pc"] = args.machine == "pc"
    if args.pc_device:
        from .arch import current as _cur
        if _cur.Platform.arch != "x86_64":
            return outcome("bad_input", status.BAD_INPUT, "--pc-device applies to x86 guests")
        if args.machine == "bare":
            return outcome("bad_input", status.BAD_INPUT, "--pc-device needs the pc machine")
        opts["devices"] = tuple(args.pc_device)
    riscv_opts = {"cpu_type": args.cpu_type, "suspend_seconds": args.suspend_seconds}
    riscv_opts = {k: v for k, v in riscv_opts.items() if v is not None}
    if riscv_opts:
        from .arch import current
        if current.Platform.arch != "riscv64":
            flag = "--" + next(iter(riscv_opts)).replace("_", "-")
            return outcome("bad_input", status.BAD_INPUT, f"{flag} applies to RISC-V guests")
        opts.update(riscv_opts)
    try:
        m = Machine(guest, mem_size=args.mem, vcpus=args.vcpus, cmdline=args.cmdline,
                    initrd=args.initrd,
                    on_console=stream, native=not args.python_loop, **opts)
    except (LoadError, GuestMemoryError, ValueError) as e:
        return outcome("bad_input", status.BAD_INPUT, _one_line(e))
    except HostMemoryError as e:
        return outcome("vmm_error", status.VMM_ERROR, _one_line(e))
    except PykvmError as e:
        # GuestNotFound: pykvm.guests is imported only when a guest is named, not for a path
        guests = sys.modules.get("pykvm.guests")
        gbuild = sys.modules.get("pykvm.guestbuild")
        if (guests is not None and isinstance(e, guests.GuestNotFound)) or \
                (gbuild is not None and isinstance(e, gbuild.GuestBuildError)):
            return outcome("bad_input", status.BAD_INPUT, _one_line(e))
        return outcome("vmm_error", status.VMM_ERROR, _one_line(e))
    except OSError as e:
        return outcome("bad_input", status.BAD_INPUT, f"{guest}: {e.strerror or e}")
    try:
        if args.trace:
            m.trace = lambda line: print(f"pykvm: {line}", file=sys.stderr)
        _sig.machine = m
        if _sig.signum is not None:           # a signal landed between start-up and here
            m._kick_all()
        try:
            r = m.run(timeout=args.timeout or None)
        finally:
            _sig.machine = None
    finally:
        m.close()
    if _output["error"] is not None:
        return _output_failure()
    if _sig.signum is not None:
        _sig.reported = True
        code = _signal_status(_sig.signum)
        detail = f"interrupted by {_signal_name(_sig.signum)}"
        if args.json:
            d = r.as_dict()
            d.update(exit="interrupted", exit_code=code, detail=detail)
            print(json.dumps(d, indent=2))
        else:
            sys.stdout.flush()
        print(f"pykvm: {detail}", file=sys.stderr)
        return code
    if args.json:
        print(json.dumps(r.as_dict(), indent=2))
    else:
        sys.stdout.flush()
        if r.exit == "timeout":
            print(f"pykvm: guest did not finish within {args.timeout} s; stopped", file=sys.stderr)
        elif r.exit_code and r.detail:
            print(f"pykvm: {r.detail}", file=sys.stderr)
        if r.console_dropped and args.trace:
            print(f"pykvm: {r.console_dropped} console bytes not retained", file=sys.stderr)
        if args.trace:
            print(f"pykvm: exits {r.exits}, {r.seconds:.3f} s", file=sys.stderr)
    return r.exit_code


def cmd_regs(args) -> int:
    from .kvm import Kvm
    from .arch import current
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        rows = current.describe_registers(vcpu)
    if args.json:
        print(json.dumps([{"name": n, "id": hex(i) if i is not None else None, "size": s,
                           "value": hex(v) if isinstance(v, int) else v}
                          for n, i, s, v in rows], indent=2))
        return 0
    for n, i, s, v in rows:
        ident = f"{i:#018x}" if i is not None else "-"
        val = f"{v:#x}" if isinstance(v, int) else str(v)
        print(f"{n:<40} {ident:<20} {s:>3}  {val}")
    return 0


def cmd_guests(args) -> int:
    from . import guests
    if args.build:
        guests.build(force=True)
    for name in guests.available():
        print(name)
    return 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main
    return bench_main(args)


def cmd_guest_build(args) -> int:
    """``pykvm guest build FILE``: compile a guest of your own (one .c or .S file) with the
    packaged guest runtime; print the image's path. 1 when it does not compile (the compiler's
    own message goes to stderr), 2 on bad input."""
    import shlex
    from .guestbuild import MODES, SOURCE_SUFFIXES, GuestBuildError, build, host_arch
    if not args.source.endswith(SOURCE_SUFFIXES):
        return _fail(f"{args.source}: a guest source is a .c or .S file")
    if not os.path.isfile(args.source):
        return _fail(f"no such file: {args.source}")
    arch = args.arch or host_arch()
    if arch not in MODES:
        return _fail(f"no guest runtime for {arch}; use --arch {' or --arch '.join(MODES)}")
    if args.mode and args.mode not in MODES[arch]:
        return _fail(f"{arch} guests have mode {', '.join(MODES[arch])}, not {args.mode!r}")
    try:
        image = build(args.source, arch=arch, mode=args.mode, out=args.output,
                      cflags=shlex.split(args.cflags or ""))
    except GuestBuildError as e:
        print(f"pykvm: {e}", file=sys.stderr)
        return 1
    except OSError as e:                     # -o names a place we cannot write
        return _fail(f"cannot write {args.output or 'the image'}: {e.strerror or e}")
    print(image)
    return 0


def _device_option(parser) -> None:
    parser.add_argument("--device", default=None, metavar="PATH",
                        help="the KVM device (default: $PYKVM_DEVICE, else /dev/kvm)")


def build_parser(only=None) -> argparse.ArgumentParser:
    """The ``pykvm`` parser; ``only``: build the arguments of that subcommand alone."""
    p = _Parser(prog="pykvm", description="A virtual machine monitor library over /dev/kvm.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="The KVM device is /dev/kvm unless --device PATH or $PYKVM_DEVICE says "
                "otherwise.\n\nexit status of every command: 0 success; 2 bad input (options, "
                "images, names); 8 VMM or host error\n(KVM device missing or inaccessible, an "
                "ioctl failed); 130 SIGINT; 143 SIGTERM; 141 stdout closed.\n`pykvm run` adds: "
                "odd (V<<1)|1 isa-debug-exit; 4 guest failure; 6 unhandled exit; 124 timeout.")
    p.add_argument("--version", action="version", version=f"pykvm {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser, action=_Commands)
    sub.only = only

    r = sub.add_parser("run", help="boot a guest (default: the built-in greeting guest)",
                       description="Boot GUEST (an ELF64, a multiboot ELF32, a RISC-V Linux "
                       "Image, a flat .bin, or the name of a built-in guest) and stream its "
                       "console to stdout.",
                       epilog="exit status: 0 guest done; odd (V<<1)|1 guest wrote V to "
                       "isa-debug-exit (ports 0xf4-0xf7, as QEMU); 2 bad input; 4 guest failure; "
                       "6 unhandled exit; 8 VMM/KVM error; 124 timeout; 130 SIGINT; "
                       "143 SIGTERM (see pykvm.status)")
    r.add_argument("guest", nargs="?", help="image path or built-in guest name")
    r.add_argument("--mem", type=_size, default=64 << 20, metavar="SIZE",
                   help="guest RAM, e.g. 64M, 2G (default 64M; at most 1T; mapped lazily)")
    r.add_argument("--vcpus", type=_int_range(1, MAX_VCPUS), default=1, metavar="N",
                   help="number of vCPUs (default 1)")
    r.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="seconds before the guest is stopped (exit 124; default 10; "
                   "0 = no deadline)")
    r.add_argument("--cmdline", type=_cmdline, default="", help="kernel command line "
                   "(multiboot; RISC-V: /chosen/bootargs)")
    r.add_argument("--initrd", type=_file_list, default=(), metavar="FILE[,FILE...]",
                   help="files for the guest, as QEMU's -initrd (x86 multiboot: one module "
                   "each; RISC-V: the initrd)")
    r.add_argument("--trace", action="store_true", help="print every exit and report that reaches "
                   "Python, then the exit counts and timing, to stderr")
    r.add_argument("--json", action="store_true", help="print one JSON object with exit, "
                   "exit_code, console, exits, seconds")
    r.add_argument("--irqchip", action="store_true", help="create the in-kernel irqchip and PIT")
    r.add_argument("--machine", choices=("pc", "bare"), default=None,
                   help="x86: pc (in-kernel irqchip and PIT, fw_cfg, PCI, ACPI with PM timer, "
                   "CMOS RTC, S3, pc-testdev; vCPU 0 starts, the others wait for INIT/SIPI) or "
                   "bare (RAM and console ports; every vCPU starts at the entry); default: pc "
                   "for multiboot kernels and Linux bzImages, bare otherwise")
    r.add_argument("--pc-device", action="append", default=[], metavar="NAME",
                   choices=("edu", "intel-iommu"),
                   help="x86 PC: add a device, as QEMU's -device: edu (QEMU's educational PCI "
                   "device) or intel-iommu (VT-d with DMA and interrupt remapping); repeatable")
    r.add_argument("--python-loop", action="store_true", help="run the exit loop in Python "
                   "instead of the C helper")
    r.add_argument("--cpu-type", default=None, metavar="TYPE",
                   help="RISC-V: the ISA extensions the guest gets: max (default), min "
                   "(rv64imafdc), plus ,ext / ,-ext items, e.g. min,zabha or max,-sstc")
    r.add_argument("--suspend-seconds", type=_seconds, default=None, metavar="SECONDS",
                   help="RISC-V: how long an SBI system suspend sleeps (default 0)")
    _device_option(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("caps", help="what this KVM offers")
    c.add_argument("--json", action="store_true", help="JSON output")
    _device_option(c)
    c.set_defaults(func=cmd_caps)

    g = sub.add_parser("regs", help="list a fresh vCPU's registers (name, id, size, value)")
    g.add_argument("--json", action="store_true")
    _device_option(g)
    g.set_defaults(func=cmd_regs)

    gl = sub.add_parser("guests", help="list (or --build) the built-in guests")
    gl.add_argument("--build", action="store_true")
    gl.set_defaults(func=cmd_guests)

    b = sub.add_parser("bench", help="benchmarks against raw C, QEMU and the interpreter: exit "
                       "cost, VM lifecycle, memory, boot, scaling",
                       description="Measure pykvm against a raw-C KVM loop, QEMU (and kvmtool "
                       "where installed) and the bare interpreter, all in one run, and print "
                       "the ratios (see pykvm.bench).")
    _device_option(b)
    b.add_argument("--json", action="store_true", help="print one JSON object (top-level "
                   "'ratios', figures, 'notes')")
    b.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw the ratios with min-max whiskers (needs matplotlib: the 'bench' "
                   "extra)")
    b.add_argument("--quick", action="store_true", help="fewer rounds: done in under a minute")
    b.add_argument("--exits", type=_int_range(1, 10 ** 8), default=0, metavar="N",
                   help="exits per exit-cost measurement (1..100000000; default 2000 with "
                   "--quick, else 10000)")
    b.set_defaults(func=cmd_bench)

    gu = sub.add_parser("guest", help="build a guest of your own (pykvm guest build FILE)")
    gua = gu.add_subparsers(dest="guest_cmd", metavar="ACTION", parser_class=_Parser)
    gua.required = True
    gb = gua.add_parser("build", help="compile FILE.c or FILE.S with pykvm's guest runtime",
                        description="Compile one guest source with the guest runtime pykvm "
                        "ships (pykvm_guest.h, start-up code, linker scripts) and print the "
                        "image's path. Images are cached by content in $PYKVM_CACHE/guests "
                        "(default ~/.cache/pykvm/guests): pykvm run $(pykvm guest build g.c)",
                        epilog="exit status: 0 built; 1 the compiler or linker failed (its "
                        "message is on stderr); 2 bad input")
    gb.add_argument("source", metavar="FILE", help="the guest's .c or .S file")
    gb.add_argument("--arch", choices=("x86_64", "riscv64"), default=None,
                    help="target architecture (default: this host's)")
    gb.add_argument("--mode", choices=("long", "protected", "real", "supervisor"), default=None,
                    help="x86 boot mode: long (64-bit, guest_main), protected (multiboot "
                    "32-bit, guest_main32), real (flat .bin at 0x8000, guest_main16); default: "
                    "the entry point the source defines. RISC-V: supervisor")
    gb.add_argument("-o", "--output", metavar="OUT", default=None,
                    help="also copy the image to OUT (real mode: OUT.bin, with OUT.elf beside it)")
    gb.add_argument("--cflags", default="", metavar="FLAGS",
                    help="extra compiler options for FILE, e.g. \"-DSTEPS=4 -Iinclude\"")
    gb.set_defaults(func=cmd_guest_build)
    return p


def main(argv=None) -> int:
    """Entry point of the ``pykvm`` command; returns the exit status (see pykvm.status).

    Started as the ``pykvm`` program (``argv`` None), it flushes its output and ends the process
    at once with that status instead of returning: the interpreter's own teardown of every
    loaded module costs more than some whole commands (VMs and fds are closed by then)."""
    code = _main(argv)
    if argv is None and _started_as_program():
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            code = 141
        except (OSError, ValueError):
            pass
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os._exit(code)
    return code


def _main(argv=None) -> int:
    """:func:`main` up to the exit status.

    SIGINT and SIGTERM end any command with one line and status 130 / 143, whenever they
    arrive: during start-up they abort it, during a run they stop every vCPU first."""
    _sig.signum = None
    _sig.reported = False
    _output["error"] = None
    if sys.stdout is None:                   # started with stdout closed (>&-)
        sys.stdout = open(os.devnull, "w")
    try:
        try:
            _install_signal_handlers()
        except ValueError:                   # not the main thread: leave signals alone
            pass
        parser = build_parser(_command_of(sys.argv[1:] if argv is None else argv))
        args = parser.parse_args(argv)
        if not args.cmd:
            parser.print_help()
            return EXIT_USAGE
        from .errors import PykvmError
        if getattr(args, "device", None):
            os.environ["PYKVM_DEVICE"] = args.device     # every Kvm() of this process
        try:
            code = args.func(args)
        except PykvmError as e:
            code = _fail(_one_line(e), 8)
        if _sig.signum is not None and not _sig.reported:
            # a signal whose exception Python swallowed (it landed in a finalizer or callback)
            raise _Signalled(_sig.signum)
        return code
    except (_Signalled, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, _Signalled) else signal.SIGINT
        detail = f"interrupted by {_signal_name(signum)}"
        try:
            if _wants_json(argv):
                _print_json_outcome("interrupted", _signal_status(signum), detail)
            print(f"pykvm: {detail}", file=sys.stderr)
        except (_Signalled, OSError, ValueError):
            pass
        return _signal_status(signum)
    except OSError as e:                     # writing our own output failed
        if e.errno not in (errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EBADF):
            raise
        _output["error"] = e
        return _output_failure()


if __name__ == "__main__":
    sys.exit(main())
