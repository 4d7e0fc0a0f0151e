"""The ``pykvm`` command line: ``run``, ``caps``, ``regs``, ``guests``, ``bench``."""
import argparse
import json
import os
import sys

from . import __version__

EXIT_USAGE = 2


def _size(text: str) -> int:
    """'64M', '1G', '4096', '0x100000' → bytes."""
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = 1
    if t and t[-1] in "KMG":
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[t[-1]]
        t = t[:-1]
    try:
        n = int(t, 0) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 64M, 1G)") from None
    if n <= 0 or n % 4096:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 4 KiB: {text!r}")
    return n


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"pykvm: {msg}", file=sys.stderr)
    return code


def cmd_caps(args) -> int:
    from .kvm import Kvm
    with Kvm(args.device) as kvm:
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


def cmd_run(args) -> int:
    from .errors import PykvmError
    from .guests import GuestNotFound
    from .machine import Machine
    guest = args.guest
    if guest and not os.path.exists(guest) and os.sep in guest:
        return _fail(f"no such file: {guest}")
    stream = None if args.json else (lambda b: (sys.stdout.buffer.write(b),
                                                sys.stdout.buffer.flush()))
    opts = {}
    if args.irqchip:
        opts["irqchip"] = opts["pit"] = True
    try:
        m = Machine(guest, mem_size=args.mem, vcpus=args.vcpus, cmdline=args.cmdline,
                    on_console=stream, native=not args.python_loop, **opts)
    except (GuestNotFound, ValueError, PykvmError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except OSError as e:
        return _fail(f"{guest}: {e.strerror}")
    with m:
        if args.trace:
            m.trace = lambda line: print(f"pykvm: {line}", file=sys.stderr)
        r = m.run(timeout=args.timeout)
    if args.json:
        print(json.dumps(r.as_dict(), indent=2))
    else:
        sys.stdout.flush()
        if r.exit == "timeout":
            print(f"pykvm: guest did not finish within {args.timeout} s; stopped", file=sys.stderr)
        elif r.exit_code and r.detail:
            print(f"pykvm: {r.detail}", file=sys.stderr)
        if args.trace:
            print(f"pykvm: exits {r.exits}, {r.seconds:.3f} s", file=sys.stderr)
    return r.exit_code


def cmd_regs(args) -> int:
    from .kvm import Kvm
    from .arch import current
    with Kvm(args.device) as kvm, kvm.create_vm() as vm:
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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pykvm", description="A virtual machine monitor library over /dev/kvm.")
    p.add_argument("--version", action="version", version=f"pykvm {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    r = sub.add_parser("run", help="boot a guest (default: the built-in greeting guest)",
                       description="Boot GUEST (an ELF64, a multiboot ELF32, a flat .bin, or the "
                       "name of a built-in guest) and stream its console to stdout. Exit status: "
                       "0 when the guest is done, (V<<1)|1 when it writes V to isa-debug-exit "
                       "port 0xf4 (as QEMU), 1 on a guest failure, 124 on timeout, 2 on bad input.")
    r.add_argument("guest", nargs="?", help="image path or built-in guest name")
    r.add_argument("--mem", type=_size, default=64 << 20, help="guest RAM (default 64M)")
    r.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    r.add_argument("--timeout", type=float, default=10.0, help="seconds before the guest is "
                   "stopped (exit 124; default 10)")
    r.add_argument("--cmdline", default="", help="kernel command line (multiboot)")
    r.add_argument("--trace", action="store_true", help="print every exit and report that reaches "
                   "Python, then the exit counts and timing, to stderr")
    r.add_argument("--json", action="store_true", help="print one JSON object with exit, "
                   "exit_code, console, exits, seconds")
    r.add_argument("--irqchip", action="store_true", help="create the in-kernel irqchip and PIT")
    r.add_argument("--python-loop", action="store_true", help="run the exit loop in Python "
                   "instead of the C helper")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("caps", help="what this KVM offers")
    c.add_argument("--json", action="store_true", help="JSON output")
    c.add_argument("--device", default=None, help="KVM device (default /dev/kvm)")
    c.set_defaults(func=cmd_caps)

    g = sub.add_parser("regs", help="list a fresh vCPU's registers (name, id, size, value)")
    g.add_argument("--json", action="store_true")
    g.add_argument("--device", default=None)
    g.set_defaults(func=cmd_regs)

    gl = sub.add_parser("guests", help="list (or --build) the built-in guests")
    gl.add_argument("--build", action="store_true")
    gl.set_defaults(func=cmd_guests)

    b = sub.add_parser("bench", help="benchmarks: C run loop vs Python loop, VM lifecycle")
    b.add_argument("--json", action="store_true")
    b.add_argument("--exits", type=int, default=20000, help="I/O exits per measurement")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.cmd:
        parser.print_help()
        return EXIT_USAGE
    from .errors import PykvmError
    try:
        return args.func(args)
    except PykvmError as e:
        return _fail(str(e), 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
