"""The ``pykvm`` command line: ``run``, ``caps``, ``regs``, ``guests``, ``bench``."""
import signal
import sys


def _json_requested(args) -> bool:
    """Whether an argument list asks a command that takes ``--json`` for JSON (self-contained:
    the early signal handler uses it before the rest of this module exists)."""
    args = list(args)
    if "--" in args:
        args = args[:args.index("--")]
    if "--json" not in args:
        return False
    for a in args:
        if a in ("-h", "--help", "--version"):
            return False
        if not a.startswith("-"):
            return a in ("run", "caps", "regs", "bench", "list", "stat", "debug")
    return False


def _early_signal(signum, frame):
    # Until main() installs its handlers (a few milliseconds), a signal ends the process the way
    # main() would: one line (and with --json the one JSON object), status 128 + signal, no
    # traceback.
    name = signal.Signals(signum).name
    code = 128 + signum
    try:
        if _json_requested(sys.argv[1:]):
            import json
            obj = {"exit": "interrupted", "exit_code": code, "console": "", "exits": {},
                   "seconds": 0.0, "detail": f"interrupted by {name}"}
            data = (json.dumps(obj, indent=2) + "\n").encode()
            import os
            while data:
                data = data[os.write(1, data):]
    except (OSError, ValueError):      # stdout closed or full: the status says it
        pass
    try:
        sys.stderr.write(f"pykvm: interrupted by {name}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):     # stderr closed or full: the status says it
        pass
    import os
    os._exit(code)


def _started_as_program() -> bool:
    """True when this process is the ``pykvm`` command (console script or ``python -m
    pykvm``), not a program that merely imports pykvm.cli."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return (getattr(spec, "name", "") in ("pykvm.__main__", "pykvm.cli")
            or sys.argv[0].rsplit("/", 1)[-1] == "pykvm")


# signals whose default action ends the process: each ends a command with one line, its
# status 128 + the signal's number, and the terminal restored (SIGINT 130, SIGTERM 143,
# SIGHUP 129 when the terminal goes away, SIGQUIT 131, SIGUSR1/2)
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                  signal.SIGUSR2)

if _started_as_program():
    try:
        for _s in ENDING_SIGNALS:
            signal.signal(_s, _early_signal)
    except ValueError:                 # imported outside the main thread
        pass

import argparse  # noqa: E402
import errno  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402

from . import __version__  # noqa: E402
from . import _cliutil  # noqa: E402
from ._host import HOST_ARCH  # noqa: E402
from ._cliutil import err as _err, output as _output  # noqa: E402
from ._cliutil import stdout_failed as _stdout_failed  # noqa: E402
from .outfile import check_report_path  # noqa: E402


class _Json:
    """``json``, imported when a command first prints JSON (most runs never do)."""

    def dumps(self, *args, **kw):
        import json
        return json.dumps(*args, **kw)


json = _Json()

EXIT_USAGE = 2
EXIT_VMM = 8               # pykvm.status.VMM_ERROR (not imported: most commands never need it)
JSON_COMMANDS = ("run", "caps", "regs", "bench", "list", "stat", "debug")  # take --json
MAX_MEM = 1 << 40          # 1 TiB: far beyond any test guest, well inside the host's address space
MAX_VCPUS = 1024
MAX_TIMEOUT = 10 ** 7      # seconds (about 115 days)
MAX_CMDLINE = 1 << 16


def _quote(value, path: bool = False) -> str:
    """A user's value as an error line quotes it: repr-escaped, at most
    :data:`pykvm._cliutil.QUOTE_LIMIT` characters then "..." (:func:`pykvm._cliutil.quote`);
    a file's ``path`` up to :data:`pykvm._cliutil.BARE_LIMIT`, so that an ordinary path
    (a test's temporary directory) is named whole."""
    return _cliutil.quote(value, _cliutil.BARE_LIMIT if path else _cliutil.QUOTE_LIMIT)


def _ascii_number(text: str) -> bool:
    """Whether ``text`` is written in ASCII: Python's int() and float() also take other
    scripts' digits (``６４``, ``٢``), which no option of pykvm (nor QEMU's) accepts."""
    return text.isascii()


def _size(text: str) -> int:
    """'64M', '1G', '4096', '0x100000' → bytes (a positive multiple of 4 KiB, at most 1 TiB)."""
    if not _ascii_number(text):
        raise argparse.ArgumentTypeError(f"not a size: {_quote(text)} (ASCII digits, e.g. 64M, "
                                         "1G)")
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
        raise argparse.ArgumentTypeError(f"not a size: {_quote(text)} (use e.g. 64M, 1G)") from None
    if n <= 0 or n % 4096:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 4 KiB: {_quote(text)}")
    if n > MAX_MEM:
        raise argparse.ArgumentTypeError(f"{_quote(text)} is more than the 1T pykvm accepts")
    return n


def _int_range(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            if not _ascii_number(text):
                raise ValueError(text)
            n = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {_quote(text)}") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{_quote(text)} is out of range ({lo}..{hi})")
        return n
    parse.__name__ = "integer"
    return parse


def _seconds(text: str) -> float:
    """A finite number of seconds in [0, MAX_TIMEOUT]; 0 means no deadline."""
    try:
        if not _ascii_number(text):
            raise ValueError(text)
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {_quote(text)}") from None
    if not math.isfinite(v) or v < 0 or v > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"{_quote(text)} is not a number of seconds between 0 and {MAX_TIMEOUT}")
    return v


def _cmdline(text: str) -> str:
    if len(text.encode("utf-8", "surrogateescape")) > MAX_CMDLINE or "\0" in text:
        raise argparse.ArgumentTypeError(f"command line must be under {MAX_CMDLINE} bytes "
                                         "without NUL characters")
    return text


def _file_list(text: str) -> tuple:
    """'a,b args,,x,c' → ('a', 'b args,x', 'c'): QEMU's -initrd list (",," is a comma inside an
    entry; "" is no file), where each entry is a file name optionally followed by arguments
    (multiboot module strings); each file must exist."""
    from .boot import initrd_module_path, split_initrd_option
    items = tuple(split_initrd_option(text))
    for item in items:
        path = initrd_module_path(item)
        if not os.path.isfile(path):
            raise argparse.ArgumentTypeError(f"{_quote(path, path=True)} is not a regular file")
    return items


MAX_PARAMS = 16            # uint64_t pykvm_params[16] (docs/guest-abi.md; pykvm.boot.elf.PARAMS_SIZE)
CPUID_REGS = ("eax", "ebx", "ecx", "edx")


def _u(text: str, bits: int, what: str) -> int:
    """``text`` as an unsigned integer of ``bits`` bits (decimal, 0x hex, 0o, 0b); raises
    ArgumentTypeError naming ``what``."""
    try:
        if not _ascii_number(text):
            raise ValueError(text)
        n = int(text.strip(), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: not an integer: {_quote(text)}") from None
    if not 0 <= n < 1 << bits:
        raise argparse.ArgumentTypeError(
            f"{what}: {_quote(text)} is out of range (0..{(1 << bits) - 1:#x})")
    return n


def _param_list(text: str) -> tuple:
    """'1,0x80000001' → (1, 0x80000001): values for the guest's ``pykvm_params[]`` (unsigned
    64-bit integers, decimal or 0x hex; at most :data:`MAX_PARAMS`)."""
    out = tuple(_u(item, 64, "guest parameter") for item in text.split(","))
    if len(out) > MAX_PARAMS:
        raise argparse.ArgumentTypeError(f"{len(out)} values; the guest's pykvm_params[] "
                                         f"holds {MAX_PARAMS}")
    return out


class _Params(argparse.Action):
    """--param N[,N...], repeatable: the lists join, in order, up to MAX_PARAMS values."""

    def __call__(self, parser, namespace, values, option_string=None):
        have = tuple(getattr(namespace, self.dest, None) or ()) + tuple(values)
        if len(have) > MAX_PARAMS:
            parser.error(f"argument {option_string}: {len(have)} values in all; the guest's "
                         f"pykvm_params[] holds {MAX_PARAMS}")
        setattr(namespace, self.dest, have)


def _cpuid_spec(text: str) -> tuple:
    """'0x80000001:edx=0x20100800' or '7.0:ebx=0' → (leaf, sub-leaf, register, value): one
    CPUID register's whole value (32 bits) for ``pykvm run --cpuid``."""
    import re
    m = re.fullmatch(r"\s*([^.:=]+)(?:\.([^:=]+))?:\s*([A-Za-z]+)\s*=(.+)", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{_quote(text)} is not LEAF[.SUB]:REG=VALUE "
                                         "(e.g. 0x80000001:edx=0x28100800)")
    reg = m.group(3).lower()
    if reg not in CPUID_REGS:
        raise argparse.ArgumentTypeError(f"{_quote(text)}: the register must be eax, ebx, ecx or "
                                         f"edx, not {_quote(m.group(3))}")
    return (_u(m.group(1), 32, "CPUID leaf"), _u(m.group(2) or "0", 32, "CPUID sub-leaf"),
            reg, _u(m.group(4), 32, f"CPUID {reg}"))


def _feature_list(text: str) -> tuple:
    """'+rdtscp,-avx' (QEMU's ``-cpu host,+rdtscp,-avx``; also ``name=on|off`` and a bare
    ``name`` for on; a leading ``host`` item is allowed) → (('rdtscp', True), ('avx', False)).
    On an x86 host each name is checked against
    :data:`pykvm.arch.x86.regs.CPUID_FEATURES`."""
    items = [i.strip() for i in text.split(",")]
    if items and items[0].lower() == "host":
        items = items[1:]
    if not items:
        raise argparse.ArgumentTypeError(f"{_quote(text)} names no CPU feature (e.g. +rdtscp,-avx)")
    out = []
    for item in items:
        name, on = item, True
        if item[:1] in ("+", "-"):
            name, on = item[1:], item[0] == "+"
        elif "=" in item:
            name, value = item.split("=", 1)
            if value.lower() not in ("on", "off"):
                raise argparse.ArgumentTypeError(f"{_quote(item)}: a feature is =on or =off")
            on = value.lower() == "on"
        if not name.strip() or not all(c.isalnum() or c in "_-." for c in name):
            raise argparse.ArgumentTypeError(f"{_quote(item)} is not +FEATURE, -FEATURE or "
                                             "FEATURE=on|off (e.g. +rdtscp,-avx)")
        if HOST_ARCH != "riscv64":             # a RISC-V host refuses the option as a whole
            from .arch.x86.regs import cpuid_feature_bit
            try:
                cpuid_feature_bit(name)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        out.append((name.strip(), on))
    return tuple(out)


def _cpuid_for_run(args) -> list:
    """KVM_GET_SUPPORTED_CPUID's entries with the hypervisor bit (CPUID.1:ECX[31], as the
    machine sets it by default), then every ``--cpu-features`` item and every ``--cpuid``, each
    option in the order given and --cpuid last: the entries every vCPU gets (the machine still
    patches in each vCPU's APIC id). Raises KvmError/OSError if KVM cannot be asked."""
    from .kvm import Kvm
    from .arch.x86.regs import (CPUID_1_ECX_HYPERVISOR, CpuidEntry, cpuid_lookup, cpuid_set,
                                cpuid_with_feature)
    with Kvm() as kvm:
        es = list(kvm.supported_cpuid())
    leaf1 = cpuid_lookup(es, 1)
    if leaf1 is not None:
        es = cpuid_set(es, 1, 0, ecx=leaf1.ecx | CPUID_1_ECX_HYPERVISOR)
    for features in args.cpu_features:
        for name, on in features:
            es = cpuid_with_feature(es, name, on)
    for leaf, sub, reg, value in args.cpuid:
        if sub and cpuid_lookup(es, leaf, sub) is None:
            # a new sub-leaf: KVM_CPUID_FLAG_SIGNIFCANT_INDEX, or KVM would ignore its index
            es.append(CpuidEntry(leaf, sub, 1, 0, 0, 0, 0))
        es = cpuid_set(es, leaf, sub, **{reg: value})
    return es


_invocation = {"argv": None}      # the argument list main() was given (None: sys.argv[1:])


def _wants_json(argv=None) -> bool:
    """True if the command line asks a command that takes ``--json`` (JSON_COMMANDS) for JSON.
    Looked at before or without argparse, so that even a bad option, an early signal or a
    failure before the command starts is answered with one object."""
    if argv is None:
        argv = _invocation["argv"]
    return _json_requested(sys.argv[1:] if argv is None else argv)


def _emit_json(obj) -> None:
    """Print the command's one JSON object on stdout. From the moment it is called the outcome
    is decided: a SIGINT/SIGTERM that lands while (or after) the object is written ends nothing
    and is not reported again, so every outcome prints exactly one object and the status is the
    object's ``exit_code``."""
    _sig.committed = True
    text = json.dumps(obj, indent=2)
    print(text)


def _print_json_outcome(exit_name: str, code: int, detail: str) -> None:
    """The one JSON object of a command that ended without a result of its own (bad input, a
    host or KVM failure, a signal): the shape of ``pykvm run --json``'s object, for every
    command that takes --json."""
    _emit_json({"exit": exit_name, "exit_code": code, "console": "", "exits": {},
                "seconds": 0.0, "detail": detail})


def _report(exit_name: str, code: int, detail: str, as_json: bool) -> int:
    """Report an outcome that is not a command's own result: the JSON object on stdout with
    --json, and always one line on stderr. Returns ``code``."""
    detail = _shorten(detail)
    if as_json:
        _print_json_outcome(exit_name, code, detail)
    _err(f"pykvm: {detail}")
    return code


def _shorten(line: str) -> str:
    """``line`` with each long value of this command line quoted short
    (:func:`pykvm._cliutil.shorten_values`), whoever made the message."""
    argv = _invocation["argv"]
    return _cliutil.shorten_values(line, sys.argv[1:] if argv is None else argv)


class _Unused:
    """Takes the arguments of a command this invocation does not run (nobody parses them)."""

    def __getattr__(self, name):
        return lambda *args, **kw: self


class _Once(argparse.Action):
    """An option that may be given once: a second one is a usage error (status 2), not a
    silent override (e.g. ``--vsock``: a machine has one vsock device)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} may be given once (a machine has one such device)")
        setattr(namespace, self.dest, values)


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
    # argparse makes a help formatter for every add_argument() (to check the metavar), and a
    # formatter asks the terminal's width (importing shutil: ~3 ms of every start). Only help
    # and usage text needs the width; building the parser uses a fixed one.
    _for_output = False

    def _get_formatter(self):
        if self._for_output:
            return super()._get_formatter()
        return self.formatter_class(prog=self.prog, width=80)

    def format_help(self):
        self._for_output = True
        try:
            return super().format_help()
        finally:
            self._for_output = False

    def format_usage(self):
        self._for_output = True
        try:
            return super().format_usage()
        finally:
            self._for_output = False

    def error(self, message):
        line = _shorten(f"{self.prog}: error: {message}")
        if _wants_json():
            _print_json_outcome("bad_input", EXIT_USAGE, line)
        _err(line)
        raise SystemExit(EXIT_USAGE)


def _fail(msg: str, code: int = EXIT_USAGE) -> int:
    _err(f"pykvm: {_shorten(msg)}")
    return code


# -- host-side failures ---------------------------------------------------------------------
# errnos that mean the host ran out of something (not bad input, not the guest's doing)
HOST_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN)


def _human_bytes(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _limits(*names: str) -> str:
    """The finite soft limits among ``names`` (RLIMIT_* names), e.g. "RLIMIT_AS=96 MiB"."""
    import resource
    out = []
    for name in names:
        try:
            soft, _ = resource.getrlimit(getattr(resource, name))
        except (AttributeError, OSError, ValueError):
            continue
        if soft == resource.RLIM_INFINITY:
            continue
        counted = name in ("RLIMIT_NOFILE", "RLIMIT_NPROC")      # a count, not bytes
        out.append(f"{name}={soft if counted else _human_bytes(soft)}")
    return ", ".join(out)


def _file_max() -> str:
    try:
        with open("/proc/sys/fs/file-max") as f:
            return f"fs.file-max={f.read().strip()}"
    except OSError:
        return ""


def _causes(e: BaseException):
    """``e`` and the exceptions it was raised from or while handling, outermost first."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        # "raise ... from None" says the error being handled is no cause (e.g. a disk lock
        # refused with EAGAIN is the image being in use, not the host out of threads)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def _resource_of(e: BaseException) -> "str | None":
    """What ran out on the host, as "<resource> (<limit>)", when ``e`` (or what caused it) is a
    host-resource failure: an OSError with EMFILE/ENFILE/ENOMEM/EAGAIN, a MemoryError, or
    Python's "can't start new thread"; None otherwise."""
    for x in _causes(e):
        if isinstance(x, OSError) and x.errno in HOST_ERRNOS:
            if x.errno == errno.EMFILE:
                what, lim = "too many open files", _limits("RLIMIT_NOFILE")
            elif x.errno == errno.ENFILE:
                what, lim = "the system's table of open files is full", _file_max()
            elif x.errno == errno.ENOMEM:
                what, lim = "out of memory", _limits("RLIMIT_AS", "RLIMIT_DATA",
                                                     "RLIMIT_MEMLOCK")
            else:
                what = "cannot create another thread or process (resource temporarily unavailable)"
                lim = _limits("RLIMIT_NPROC", "RLIMIT_AS")
            return what + (f" ({lim})" if lim else "")
        if isinstance(x, MemoryError):
            lim = _limits("RLIMIT_AS", "RLIMIT_DATA")
            return "out of memory" + (f" ({lim})" if lim else "")
        if isinstance(x, RuntimeError) and "can't start new thread" in str(x):
            lim = _limits("RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_STACK")
            return "cannot start a thread" + (f" ({lim})" if lim else "")
    return None


def _host_failure(e: BaseException) -> "str | None":
    """One line for a host-side failure (see :func:`_resource_of`) naming the resource and its
    limit, e.g. "host limit: too many open files (RLIMIT_NOFILE=5) opening /dev/kvm"; None when
    ``e`` is something else."""
    resource = _resource_of(e)
    if resource is None:
        return None
    from .errors import PykvmError
    own = _one_line(e)
    if "host limit" in own:                       # the raiser already said it
        return own
    line = f"host limit: {resource}"
    if isinstance(e, PykvmError):
        line += f": {own}"                        # pykvm's own message says what it was doing
    elif isinstance(e, OSError) and e.filename is not None:
        line += f" opening {e.filename}"
    return line


def _classify(e: Exception) -> "tuple[str, int, str]":
    """(exit name, status, one line) for an exception that ended a command: a host-resource
    failure or any pykvm error is a VMM error (8); bad input a command did not catch itself
    (an unknown built-in guest, an image that will not build) is 2; anything else is an
    internal VMM error (8) named by its type and place, never a traceback (set
    $PYKVM_TRACEBACK=1 to get one)."""
    host = _host_failure(e)
    if host is not None:
        return "vmm_error", EXIT_VMM, host
    from .errors import PykvmError
    guests = sys.modules.get("pykvm.guests")
    gbuild = sys.modules.get("pykvm.guestbuild")
    if (guests is not None and isinstance(e, guests.GuestNotFound)) or \
            (gbuild is not None and isinstance(e, gbuild.GuestBuildError)):
        return "bad_input", EXIT_USAGE, _one_line(e)
    if isinstance(e, PykvmError):
        return "vmm_error", EXIT_VMM, _one_line(e)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename is not None else ""
        return "vmm_error", EXIT_VMM, f"{where}{e.strerror or _one_line(e)}"
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    at = ""
    if tb is not None:
        at = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
    return "vmm_error", EXIT_VMM, f"internal error: {type(e).__name__}: {_one_line(e)}{at}"


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
    committed = False         # the one JSON object is being (or was) printed: signals end nothing
    reported = False          # the command has already reported it
    in_hook = False           # the unraisable hook is running (see _quiet_unraisable)
    said = False              # "pykvm: interrupted by ..." is written


def _quiet_unraisable(hook):
    """An unraisablehook that drops our own _Signalled (raised by a signal that happened to land
    inside a finalizer or weakref callback, where Python cannot propagate it); main() still sees
    the signal through _sig.signum."""
    def unraisable(info):
        _sig.in_hook = True
        try:
            if isinstance(info.exc_value, _Signalled):
                return
            hook(info)
        finally:
            _sig.in_hook = False
    return unraisable


_sig = _SignalState()


def _on_signal(signum, frame):
    if _sig.committed or _sig.reported or _sig.in_hook:
        # the outcome stands (its JSON object is out or going out, or the signal was already
        # reported), or Python is reporting an earlier signal's exception that landed in a
        # finalizer: raising here would show as a traceback instead of changing the outcome
        return
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
    for s in ENDING_SIGNALS:
        signal.signal(s, _on_signal)


def cmd_caps(args) -> int:
    from .kvm import Kvm
    from .testing.kselftest import host_tags
    with Kvm() as kvm:
        info = kvm.info()
    info["tags"] = host_tags(info)          # what a scheduler matches hosts on (kselftest.md)
    if args.json:
        _emit_json(info)
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
    print(f"tags: {' '.join(info['tags'])}")
    return 0


def cmd_kselftest_install(args) -> int:
    """``pykvm kselftest-install DIR``: see :mod:`pykvm.testing.kselftest`."""
    from .testing.kselftest import KselftestError, install
    try:
        entries = install(args.dir, args.collection or (), args.tests or ())
    except KselftestError as e:
        return _fail(str(e))
    print(f"{len(entries)} tests in {os.path.abspath(args.dir)}: "
          f"{os.path.join(os.path.abspath(args.dir), 'run_kselftest.sh')} -l lists them")
    return 0


def _output_failure() -> int:
    """The status for a failed stdout: 141 for a closed pipe, else one line and 8."""
    return _cliutil.output_failure("pykvm", EXIT_VMM)


def _python_loop():
    """The reference Python run loop (``--python-loop``), loaded only when asked for."""
    from .testing.reference_loop import ReferenceLoop
    return ReferenceLoop


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
            if _output["error"] is None:
                _output["error"] = e
            m = _sig.machine
            if m is not None:
                m._kick_all()
    return write


def _stdin_fd() -> "int | None":
    """0 if standard input is open (any kind of file), else None. Asked before the machine
    opens anything, so that a closed fd 0 cannot later name one of the VM's own files."""
    try:
        os.fstat(0)
    except OSError:
        return None
    return 0


def _console_target(m, args):
    """(feed, flush) for the run's console input: ``feed(bytes) -> bytes accepted`` takes
    keystrokes and piped input, ``flush()`` shows the guest's output written so far. The serial
    console (the default): :meth:`Machine.send_console` and :meth:`Machine.flush_console`;
    with ``--console virtio`` the virtio console's ``feed`` (its output goes out as the device
    transmits; the serial port's is still flushed). (None, None) when there is no console to
    feed."""
    try:
        m.flush_console()
        flush = m.flush_console
    except ValueError:                       # no serial console on this machine
        flush = None
    if args.console == "virtio" and m.virtio_console is not None:
        return m.virtio_console.feed, flush
    if flush is None:
        return None, None
    return m.send_console, flush


def _console_session(m, args, input_fd, interactive, on_quit):
    """Raw mode on the terminal (when interactive) and the console thread
    (:class:`pykvm._terminal.ConsolePump`) for one run; (terminal or None, pump or None).
    A pump the host cannot start (no fds or threads left) leaves the run without input."""
    from ._terminal import ConsolePump, RawTerminal
    feed, flush = _console_target(m, args)
    if feed is None:
        return None, None
    term = RawTerminal(input_fd).__enter__() if interactive and input_fd is not None else None
    try:
        pump = ConsolePump(input_fd, feed, escapes=interactive, on_quit=on_quit,
                           flush=flush).start()
    except (OSError, RuntimeError):
        pump = None
    return term, pump


def _snapshot_spec(spec: str):
    """``--snapshot-at`` SPEC as ("time", seconds) for ``2.5s`` / ``2.5``, or ("console", bytes)
    for ``console:TEXT``; ValueError with the reason for anything else."""
    shown = repr(spec) if len(spec) <= 60 else repr(spec[:60]) + "..."
    if spec.startswith("console:"):
        text = os.fsencode(spec[len("console:"):])   # the bytes given, as the console has them
        if not text:
            raise ValueError("--snapshot-at console:TEXT needs some TEXT")
        if len(text) > 4096:
            raise ValueError(f"--snapshot-at {shown}: TEXT is {len(text)} bytes; at most 4096")
        return "console", text
    num = spec[:-1] if spec.endswith("s") else spec
    try:
        if not _ascii_number(num):             # float() takes any script's digits
            raise ValueError(num)
        secs = float(num)
    except ValueError:
        raise ValueError(f"--snapshot-at {shown} is neither SECONDS (e.g. 2.5s) nor "
                         "console:TEXT") from None
    if not math.isfinite(secs) or not 0 <= secs <= MAX_TIMEOUT:
        raise ValueError(f"--snapshot-at {shown}: seconds must be a number from 0 to "
                         f"{MAX_TIMEOUT}")
    return "time", secs


class _SnapshotTrigger:
    """Takes ``--snapshot PATH`` once ``--snapshot-at`` SPEC happens during a run (a time after
    the run's start, or TEXT seen on the console), then stops the run. ``written``: the
    snapshot's size in bytes once taken; ``error``: the one line of a failed snapshot.

    For ``console:TEXT`` the vCPUs are held (Machine.hold, without waiting) by the thread that
    passes the text on, at once: the snapshot is of the guest as it stood when TEXT appeared
    (for a guest's report print, right after the print; for a UART, at its next flush), not
    of wherever the guest had run on to by the time the snapshot thread woke."""

    def __init__(self, m, spec, path: str):
        from .runloop import ConsoleWatch
        self.m, self.path = m, path
        self.kind, self.what = spec
        self.written = None
        self.error = None
        self._watch = ConsoleWatch(self.what, then=self._hold) \
            if self.kind == "console" else None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._main, name="pykvm-snapshot", daemon=True)

    def feed(self, data: bytes) -> None:
        """Console bytes (the machine's on_console): TEXT may straddle two pieces."""
        if self._watch is not None:
            self._watch(data)

    def start(self) -> None:
        self._thread.start()

    def _hold(self) -> None:
        """ConsoleWatch's ``then``, in the thread that passed TEXT (a vCPU's): hold the
        vCPUs where they are; the snapshot thread takes them as they are held."""
        try:
            self.m.hold(self, timeout=None)
        except Exception:  # noqa: BLE001 — the machine closed meanwhile: nothing to hold
            pass

    def _main(self) -> None:
        if self.kind == "time":
            if self._done.wait(self.what):
                return
        else:
            assert self._watch is not None
            while not self._watch.wait(0.05):
                if self._done.is_set():
                    return
        try:
            self.written = self.m.snapshot(self.path)
        except Exception as e:  # noqa: BLE001 — reported as the run's outcome
            self.error = _one_line(e)
        try:
            self.m.stop("snapshot taken" if self.error is None else "snapshot failed")
        except Exception:  # noqa: BLE001 — the machine closed meanwhile
            pass
        self.m.release(self)                  # after the stop: the guest does not run on

    def finish(self) -> None:
        """After the run: the trigger thread ends (a run that ended first takes nothing)."""
        self._done.set()
        if self._thread.ident is not None:
            self._thread.join()


def _gdb_options(p, first: str) -> None:
    """``--gdb`` and ``--gdb-wait`` on parser ``p`` (pykvm run and pykvm restore); ``first``:
    where --gdb-wait holds the guest."""
    p.add_argument("--gdb", default=None, metavar="tcp::PORT|tcp:HOST:PORT|unix:PATH",
                   help="serve GDB's remote protocol there (QEMU's -gdb; tcp::PORT listens on "
                   "localhost): gdb's 'target remote :PORT' attaches, one thread per vCPU "
                   "(docs/gdb.md); no run deadline unless --timeout is given")
    p.add_argument("--gdb-wait", action="store_true",
                   help=f"with --gdb: hold the guest before {first} until gdb attaches and "
                   "continues (QEMU's -S)")


def _names_a_file(guest: str) -> bool:
    """Whether ``pykvm run GUEST`` takes ``guest`` as a file, not a built-in guest's name: a
    path (with a ``/``), an image or source suffix (.elf .bin .c .S), or a file that exists
    under that name (``Image``, ``vmlinux``: as QEMU's -kernel, a path naming a file wins)."""
    return (os.sep in guest or guest.endswith((".elf", ".bin", ".c", ".S"))
            or os.path.isfile(guest))


def cmd_restore(args) -> int:
    """``pykvm restore PATH``: build the machine a snapshot recorded and run it on, as
    ``pykvm run`` runs a guest (console, exit status, --json)."""
    defaults = dict(guest=None, name=None, control=False, param=None,
                    python_loop=False, irqchip=False, pc_device=None, disk=None, rng=False,
                    net=None, vsock=None, share=None, console="serial", cpu_type=None,
                    suspend_seconds=None, cpuid=None, cpu_features=None, mem=None, vcpus=None,
                    cmdline="", initrd=(), machine="auto")
    for k, v in defaults.items():
        if not hasattr(args, k):
            setattr(args, k, v)
    return cmd_run(args)


def cmd_run(args) -> int:
    from . import status
    from .errors import GuestMemoryError, HostMemoryError, PykvmError, SnapshotError
    from .boot import LoadError
    from .snapfile import check_target as check_snapshot_target
    from .devices.virtio import BackendUnavailable
    from .machine import Machine

    def outcome(exit_name: str, code: int, detail: str) -> int:
        """Report a run that ended before or outside Machine.run (one line, or one JSON)."""
        return _report(exit_name, code, detail, args.json)

    guest = args.guest
    if guest == "":                           # not the default guest: a name left out by mistake
        return outcome("bad_input", status.BAD_INPUT, "the guest is an empty name: give an "
                       "image path or a built-in guest's name (`pykvm guests`)")
    if guest is not None and _names_a_file(guest) and not os.path.exists(guest):
        return outcome("bad_input", status.BAD_INPUT, f"no such file: {_quote(guest, path=True)}")
    input_fd = None if args.no_input else _stdin_fd()
    interactive = input_fd is not None and not args.json and os.isatty(input_fd)
    if args.gdb_wait and args.gdb is None:
        return outcome("bad_input", status.BAD_INPUT, "--gdb-wait needs --gdb")
    snap_spec = None
    if (args.snapshot_at is None) != (args.snapshot is None):
        return outcome("bad_input", status.BAD_INPUT, "--snapshot-at and --snapshot go together")
    if args.snapshot_at is not None:
        try:
            snap_spec = _snapshot_spec(args.snapshot_at)
        except ValueError as e:
            return outcome("bad_input", status.BAD_INPUT, str(e))
    if args.snapshot is not None:             # refused now, not after the guest ran
        try:
            check_snapshot_target(args.snapshot)
        except SnapshotError as e:
            return outcome("bad_input", status.BAD_INPUT, _one_line(e))
    restore_path = getattr(args, "restore", None)
    if restore_path is not None and not os.path.lexists(restore_path):
        return outcome("bad_input", status.BAD_INPUT, f"no such snapshot file: {restore_path}")
    if args.timeout is None:                  # a person at the console decides when it ends
        args.timeout = 0.0 if interactive or args.gdb is not None else 10.0
    stream = None if args.json else _console_stream()
    opts = {}
    if args.irqchip:
        opts["irqchip"] = opts["pit"] = True
    if args.pc_device:
        opts["devices"] = tuple(args.pc_device)
    if args.disk:
        opts["disks"] = list(args.disk)
    if args.rng:
        opts["rng"] = True
    if args.net:
        opts["nets"] = list(args.net)
    if args.vsock is not None:
        opts["vsock"] = args.vsock
    if args.share:
        opts["shares"] = list(args.share)
    if args.console != "serial":
        opts["console"] = args.console
    riscv_opts = {"cpu_type": args.cpu_type, "suspend_seconds": args.suspend_seconds}
    riscv_opts = {k: v for k, v in riscv_opts.items() if v is not None}
    if riscv_opts:
        if HOST_ARCH != "riscv64":
            flag = "--" + next(iter(riscv_opts)).replace("_", "-")
            return outcome("bad_input", status.BAD_INPUT, f"{flag} applies to RISC-V guests")
        opts.update(riscv_opts)
    if (args.cpuid or args.cpu_features) and HOST_ARCH == "riscv64":
        flag = "--cpuid" if args.cpuid else "--cpu-features"
        return outcome("bad_input", status.BAD_INPUT, f"{flag} applies to x86 guests")
    try:
        if args.cpuid or args.cpu_features:
            opts["cpuid"] = _cpuid_for_run(args)
        if restore_path is not None:
            m = Machine.restore(restore_path, on_console=stream,
                                loop=_python_loop() if args.python_loop else None)
        else:
            m = Machine(guest, mem_size=args.mem, vcpus=args.vcpus, cmdline=args.cmdline,
                        initrd=args.initrd, machine=args.machine, on_console=stream,
                        loop=_python_loop() if args.python_loop else None, **opts)
    except Exception as e:  # noqa: BLE001 — every failure is classified into an outcome below
        if isinstance(e, SnapshotError):        # a missing, corrupted or foreign snapshot
            return outcome("bad_input", status.BAD_INPUT, _one_line(e))
        host = _host_failure(e)             # the host ran out of fds, memory or threads
        if host is not None:
            return outcome("vmm_error", status.VMM_ERROR, host)
        if isinstance(e, BackendUnavailable):   # passt/virtiofsd/tap: the host's side failed
            return outcome("vmm_error", status.VMM_ERROR, _one_line(e))
        if isinstance(e, (LoadError, GuestMemoryError, ValueError)):
            # a bad image, or options this machine cannot honour (e.g. more vCPUs than its
            # tables can describe): refused up front, naming the limit
            return outcome("bad_input", status.BAD_INPUT, _one_line(e))
        if isinstance(e, HostMemoryError):
            return outcome("vmm_error", status.VMM_ERROR, _one_line(e))
        if isinstance(e, OSError) and not isinstance(e, PykvmError):
            # the image could not be read (no permission, a directory, I/O error ...)
            name = e.filename if e.filename is not None else (guest or "the guest image")
            return outcome("bad_input", status.BAD_INPUT, f"{name}: {e.strerror or e}")
        return outcome(*_classify(e))
    if args.param:
        try:
            m.set_params(*args.param)
        except PykvmError as e:               # the image has no pykvm_params[]
            m.close()
            return outcome("bad_input", status.BAD_INPUT, f"--param: {_one_line(e)}")
    snap = None
    if snap_spec is not None:                 # --snapshot-at: watch the console or the clock
        snap = _SnapshotTrigger(m, snap_spec, args.snapshot)
        m.on_console = (lambda d, f=stream, t=snap: (f(d) if f else None, t.feed(d))[0])
        snap.start()
    trace_lost = []                           # --trace lines stderr did not take

    def trace(line: str) -> None:
        if not trace_lost and not _err(f"pykvm: {line}"):
            trace_lost.append(line)
            m._kick_all()                      # asked-for output is lost: stop the run
    quit_key = []                             # Ctrl-A x was typed at the console

    def on_quit() -> None:
        quit_key.append(True)
        m._kick_all()
    term = pump = control = gdb = None
    try:
        if args.gdb is not None:
            from .gdbstub import server as gdbstub
            try:
                gdb = gdbstub.serve(m, args.gdb, wait=args.gdb_wait, log=gdbstub.stderr_log)
            except ValueError as e:            # a bad address
                return outcome("bad_input", status.BAD_INPUT, f"--gdb: {_one_line(e)}")
            except OSError as e:               # the port is taken, the path not a socket
                return outcome("bad_input", status.BAD_INPUT,
                               f"--gdb: cannot listen on {args.gdb}: {e.strerror or e}")
            _err(f"pykvm: gdb server listening on {gdb.address}")
        if args.name is not None or args.control:
            from .control import ControlError, ControlServer
            try:
                control = ControlServer(m, args.name)
            except ControlError as e:          # a live VM of that name, an unsafe directory
                return outcome("bad_input", status.BAD_INPUT, str(e))
            except OSError as e:
                return outcome(*_classify(e))
            if args.trace:
                _err(f"pykvm: control socket {control.path}")
        if args.trace:
            m.trace = trace
        _sig.machine = m
        if _sig.signum is not None:           # a signal landed between start-up and here
            m._kick_all()
        try:
            term, pump = _console_session(m, args, input_fd, interactive, on_quit)
            if gdb is not None:
                r = gdb.run(timeout=args.timeout or None)
            else:
                r = m.run(timeout=args.timeout or None)
        finally:
            _sig.machine = None
            if pump is not None:
                pump.stop()
            if term is not None:
                term.restore()                # before any line of ours reaches the terminal
    finally:
        if snap is not None:
            snap.finish()
        if gdb is not None:
            gdb.close()                       # detaches a client, before the machine goes
        if control is not None:
            control.close()                   # the socket goes before the machine
        m.close()
    if snap is not None:
        sys.stdout.flush()
        if snap.error is not None:
            return outcome("snapshot_error", status.BAD_INPUT
                           if "cannot snapshot" in snap.error else status.VMM_ERROR,
                           snap.error)
        if snap.written is not None:
            _err(f"pykvm: snapshot written to {args.snapshot} ({snap.written} bytes)")
            if args.json:
                d = r.as_dict()
                d.update(exit="snapshot", exit_code=status.OK, snapshot=args.snapshot,
                         detail=f"snapshot written to {args.snapshot}")
                _emit_json(d)
            return status.OK
        _err(f"pykvm: the run ended before --snapshot-at {args.snapshot_at}; no snapshot "
             "written")
        if r.exit_code == status.OK:          # the guest finished first: the snapshot failed
            if args.json:
                d = r.as_dict()
                d.update(exit_code=status.GUEST_FAILURE,             # exit: the run's own
                         detail=f"the guest finished before --snapshot-at {args.snapshot_at}; "
                                "no snapshot written")
                _emit_json(d)
            return status.GUEST_FAILURE
    if _output["error"] is not None:
        return _output_failure()
    if trace_lost:
        # the trace the user asked for could not be written to stderr (closed or full)
        _err("pykvm: cannot write the --trace output to stderr")
        if args.json:
            d = r.as_dict()
            d.update(exit="vmm_error", exit_code=EXIT_VMM,
                     detail="cannot write the --trace output to stderr")
            _emit_json(d)
        return EXIT_VMM
    if _sig.signum is not None:
        _sig.reported = True
        code = _signal_status(_sig.signum)
        detail = f"interrupted by {_signal_name(_sig.signum)}"
        if args.json:
            d = r.as_dict()
            d.update(exit="interrupted", exit_code=code, detail=detail)
            _emit_json(d)
        else:
            sys.stdout.flush()
        _err(f"pykvm: {detail}")
        _sig.said = True
        return code
    if quit_key:                              # stopped at the console: as a Ctrl-C would
        detail = "stopped at the console (Ctrl-A x)"
        if args.json:
            d = r.as_dict()
            d.update(exit="interrupted", exit_code=status.SIGINT, detail=detail)
            _emit_json(d)
        else:
            sys.stdout.flush()
        _err(f"pykvm: {detail}")
        return status.SIGINT
    broken = m.device_errors()               # a backend that died (passt) says why, once
    if args.json:
        d = r.as_dict()
        d["devices"] = m.device_counters()
        if broken:
            d["device_errors"] = broken
        _emit_json(d)
        sys.stdout.flush()                   # a failure to write it is the run's outcome
        if r.exit_code and r.detail:         # as for every failure: one line on stderr too
            _err(f"pykvm: {r.detail}")
    else:
        sys.stdout.flush()
        if r.exit == "timeout":
            _err(f"pykvm: guest did not finish within {args.timeout} s; stopped")
        elif (r.exit_code or r.exit == "stopped") and r.detail:
            _err(f"pykvm: {r.detail}")
        for name, why in broken.items():
            _err(f"pykvm: {name}: {why}")
        if r.console_dropped and args.trace:
            _err(f"pykvm: {r.console_dropped} console bytes not retained")
        if args.trace:
            for name, counts in m.device_counters().items():
                if counts:                       # a device that counts nothing says nothing
                    _err(f"pykvm: {name} " + " ".join(f"{k}={v}" for k, v in counts.items()))
        if args.trace and not _err(f"pykvm: exits {r.exits}, {r.seconds:.3f} s"):
            return EXIT_VMM                  # the trace's last line was lost (stderr full)
    return r.exit_code


def cmd_regs(args) -> int:
    from .kvm import Kvm
    from .arch import current
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        rows = current.describe_registers(vcpu)
    msr_base = None                           # x86: the ONE_REG id of MSR 0

    def msr_of(reg_id):
        """The MSR index an x86 MSR row's ONE_REG id names, else None."""
        if msr_base is None or reg_id is None or reg_id & ~0xFFFFFFFF != msr_base:
            return None
        return reg_id & 0xFFFFFFFF
    if HOST_ARCH != "riscv64":
        from .arch.x86.msrs import msr_label, msr_name
        from .arch.x86.regs import msr_reg_id
        msr_base = msr_reg_id(0)
    if args.json:
        out = []
        for n, i, s, v in rows:
            d = {"name": n, "id": hex(i) if i is not None else None, "size": s,
                 "value": hex(v) if isinstance(v, int) else v}
            if msr_base is not None:          # x86: every row says whether it is an MSR
                idx = msr_of(i)
                d["msr"] = hex(idx) if idx is not None else None
                d["msr_name"] = msr_name(idx) if idx is not None else None
            out.append(d)
        _emit_json(out)
        return 0
    print(f"{'REGISTER':<40} {'ONE_REG ID':<20} {'SIZE':>4}  VALUE")
    for n, i, s, v in rows:
        ident = f"{i:#018x}" if i is not None else "-"
        val = f"{v:#x}" if isinstance(v, int) else str(v)
        idx = msr_of(i)
        if idx is not None:
            n = msr_label(idx)                # "msr 0x10 IA32_TIME_STAMP_COUNTER"
        print(f"{n:<40} {ident:<20} {s:>4}  {val}")
    return 0


def cmd_guests(args) -> int:
    from . import guests
    if args.build:
        guests.build(force=True)
    names = guests.available()
    width = max((len(n) for n in names), default=0)
    for name in names:
        print(f"{name:<{width}}  {guests.about(name)}".rstrip())
    return 0


def cmd_bench(args) -> int:
    """``pykvm bench``: every option's prerequisites (--plot: a path that can be written and
    matplotlib) are checked before anything is measured, a failure one line and 2."""
    if args.plot is not None:
        try:
            check_report_path(args.plot, "the plot")    # refused before minutes of measuring
        except OSError as e:
            return _report("bad_input", EXIT_USAGE, f"--plot: {e}", args.json)
        try:
            import matplotlib  # noqa: F401  (only whether it imports: bench.plot draws)
        except ImportError:
            return _report("bad_input", EXIT_USAGE, "--plot needs matplotlib (pip install "
                           "'pykvm-vmm[bench]'); nothing was measured", args.json)
    from .bench import main as bench_main
    return bench_main(args)


def cmd_guest_build(args) -> int:
    """``pykvm guest build FILE``: compile a guest of your own (one .c or .S file) with the
    packaged guest runtime; print the image's path. 2 on bad input, a source that does not
    compile included (pykvm's statuses are even; the compiler's own message follows the line)."""
    import shlex
    from .guestbuild import MODES, SOURCE_SUFFIXES, GuestBuildError, build, host_arch
    if not args.source.endswith(SOURCE_SUFFIXES):
        return _fail(f"{_quote(args.source, path=True)}: a guest source is a .c or .S file")
    if not os.path.isfile(args.source):
        return _fail(f"no such file: {_quote(args.source, path=True)}")
    arch = args.arch or host_arch()
    if arch not in MODES:
        return _fail(f"no guest runtime for {arch}; use --arch {' or --arch '.join(MODES)}")
    if args.mode and args.mode not in MODES[arch]:
        return _fail(f"{arch} guests have mode {', '.join(MODES[arch])}, not {_quote(args.mode)}")
    if args.output is not None:
        from .guestbuild import check_output
        try:          # not the source itself, not a missing directory, no directory/socket/disk
            check_output(args.source, args.output, arch=arch, mode=args.mode)
        except (OSError, GuestBuildError) as e:
            return _fail(str(e))
    try:
        image = build(args.source, arch=arch, mode=args.mode, out=args.output,
                      cflags=shlex.split(args.cflags or ""))
    except GuestBuildError as e:
        _err(f"pykvm: {e}")
        return EXIT_USAGE
    except OSError as e:
        host = _host_failure(e)
        if host is not None:
            return _fail(host, EXIT_VMM)
        from .outfile import ReportPathError
        if isinstance(e, ReportPathError):   # the checked output could not be written (a full,
            return _fail(str(e), EXIT_VMM)   # read-only or forbidden place): output lost, 8
        why = f"cannot write {args.output or 'the image'}: {e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS,
                       errno.EACCES, errno.EPERM):
            return _fail(why, EXIT_VMM)      # the host refused the write, not the command line
        return _fail(why)
    print(image)
    return 0


# -- control of a running VM (pykvm.control) --------------------------------------------------
def _vm_name(text: str) -> str:
    from .control import ControlError, check_name
    try:
        return check_name(text)
    except ControlError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _control_fail(e, as_json: bool) -> int:
    """A control request that failed: 2 for a bad name, no such VM, a stale socket, an unsafe
    directory or a request the VM refused; 8 when the VM failed to do what it was asked."""
    code = EXIT_VMM if getattr(e, "code", "") in ("failed", "timeout", "closed") else EXIT_USAGE
    return _report("bad_input" if code == EXIT_USAGE else "vmm_error", code, str(e), as_json)


def _hex_fields(d: dict, names) -> str:
    return " ".join(f"{n}={d[n]:#x}" for n in names if isinstance(d.get(n), int))


def cmd_list(args) -> int:
    """``pykvm list``: every VM with a control socket, asked for its state."""
    from .control import ControlError, list_vms
    try:
        vms = list_vms()
    except ControlError as e:
        return _control_fail(e, args.json)
    if args.json:
        _emit_json([{k: v for k, v in d.items() if k not in ("ok", "cmd")} for d in vms])
        return 0
    print(f"{'NAME':<24} {'PID':>8}  {'STATE':<8} {'VCPUS':>5}  GUEST")
    for d in vms:
        if not d.get("ok"):
            print(f"{d['name']:<24} {'-':>8}  {'error':<8} {'-':>5}  {d.get('error', '')}")
            continue
        print(f"{d['name']:<24} {d.get('pid', '-'):>8}  {d.get('state', '?'):<8} "
              f"{d.get('vcpus', '-'):>5}  {d.get('guest', '')}")
    return 0


def cmd_control(args) -> int:
    """``pykvm pause|resume|stop|stat|debug NAME``: one request to the VM's control socket."""
    from .control import Client, ControlError
    as_json = getattr(args, "json", False)
    verb = {"debug": "dump"}.get(args.cmd, args.cmd)
    if args.cmd == "debug" and not args.dump:
        return _report("bad_input", EXIT_USAGE, "debug: nothing to do (use --dump)", as_json)
    try:
        with Client(args.name) as c:
            resp = c.call(verb)
    except ControlError as e:
        return _control_fail(e, as_json)
    body = {k: v for k, v in resp.items() if k not in ("ok", "cmd")}
    if as_json:
        _emit_json(body)
        return 0
    if verb == "stat":
        print(f"{args.name}: {body.get('state')}")
        for title, stats in [("vm", body.get("vm") or {})] + [
                (f"vcpu{i}", st) for i, st in enumerate(body.get("vcpus") or [])]:
            print(f"{title}:")
            for k, v in stats.items():
                print(f"  {k:<36} {v}")
        exits = body.get("exits") or {}
        print("exits: " + (" ".join(f"{k}={v}" for k, v in exits.items()) or "none"))
        for dev, counts in (body.get("devices") or {}).items():
            print(f"{dev}: " + " ".join(f"{k}={v}" for k, v in counts.items()))
        return 0
    if verb == "dump":
        for v in body.get("vcpus") or []:
            print(f"vCPU {v['index']}:")
            regs = v.get("regs") or {}
            names = list(regs)
            for i in range(0, len(names), 4):
                print("  " + _hex_fields(regs, names[i:i + 4]))
            sregs = v.get("sregs") or {}
            for n, val in sregs.items():
                if isinstance(val, dict):
                    print(f"  {n:<4} " + _hex_fields(val, list(val)))
            crs = [n for n, val in sregs.items() if isinstance(val, int)]
            if crs:
                print("  " + _hex_fields(sregs, crs))
            if "mode" in v:
                print(f"  mode={v['mode']}")
        return 0
    print(f"{args.name}: {body.get('state')}")
    return 0


def cmd_sandbox(args) -> int:
    """``pykvm sandbox``: the command's exit status, or one line and 2 when the sandbox cannot
    be set up (see :mod:`pykvm.sandbox`)."""
    from . import sandbox
    from .boot import LoadError
    from .devices.virtio import BackendUnavailable
    argv = list(args.command)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        return _report("bad_input", EXIT_USAGE, "sandbox: no command given "
                       "(pykvm sandbox [OPTIONS] -- CMD [ARG...])", False)
    try:
        return sandbox.run(argv, kernel=args.kernel, root=args.root, modules=args.modules,
                           busybox=args.busybox, writable=args.rw, cwd=args.cwd,
                           mem_size=args.mem, vcpus=args.vcpus, timeout=args.timeout,
                           cmdline=args.append, note=lambda s: _err(f"pykvm: sandbox: {s}"))
    except sandbox.SandboxTimeout as e:
        return _report("timeout", 124, f"sandbox: {e}", False)      # pykvm.status.TIMEOUT
    except sandbox.SandboxError as e:
        return _report("bad_input", EXIT_USAGE, f"sandbox: {e}", False)
    except BackendUnavailable as e:          # virtiofsd missing, failing, not answering
        return _report("vmm_error", EXIT_VMM, f"sandbox: {_one_line(e)}", False)
    except (LoadError, ValueError) as e:     # a bad kernel image, --vcpus, a share refused
        if _host_failure(e) is not None:
            raise
        return _report("bad_input", EXIT_USAGE, f"sandbox: {_one_line(e)}", False)


def _sandbox_parser(sub) -> None:
    """``pykvm sandbox`` (lkvm sandbox / virtme-ng): a command in a Linux guest over a host
    directory."""
    sb = sub.add_parser(
        "sandbox", help="run a command in a Linux guest whose root is a host directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Boot a Linux guest whose root file system is a host directory (--root, "
        "default /) shared through virtio-fs (virtiofsd), read-only with a writable tmpfs "
        "overlay on top unless --rw; run CMD in it, print its output and exit with its "
        "status, then power the guest off (what `lkvm sandbox` and virtme-ng do).",
        epilog="needs: a Linux kernel with virtio-fs and overlayfs (built in or as modules in "
        "--modules), a static busybox (Debian: busybox-static) and virtiofsd (Debian: "
        "virtiofsd).\nexit status: CMD's; 2 the sandbox cannot be set up (one line saying "
        "why); 124 timeout; 125 the guest ended without reporting CMD's status.\n"
        "example: pykvm sandbox -- uname -r")
    sb.add_argument("--kernel", metavar="FILE", help="the Linux kernel image (default: "
                    "/boot/vmlinuz-$(uname -r), the host's running kernel)")
    sb.add_argument("--modules", metavar="DIR", help="the kernel's modules (default: "
                    "/lib/modules/<the kernel's release>; a flat directory of .ko files works)")
    sb.add_argument("--busybox", metavar="FILE", help="a statically linked busybox for the "
                    "guest's /init (default: busybox on PATH)")
    sb.add_argument("--root", default="/", metavar="DIR", help="the host directory that is the "
                    "guest's root (default: /)")
    sb.add_argument("--rw", action="store_true", help="share --root read-write, with no "
                    "overlay: CMD's writes reach the host")
    sb.add_argument("--cwd", metavar="DIR", help="CMD's working directory inside the root "
                    "(default: the current directory when it lies under --root, else /)")
    sb.add_argument("--mem", type=_size, default=512 << 20, metavar="SIZE",
                    help="guest RAM (default 512M)")
    sb.add_argument("--vcpus", type=_int_range(1, MAX_VCPUS), default=1, metavar="N", help="vCPUs (default 1)")
    sb.add_argument("--timeout", type=_seconds, default=600.0, metavar="SECONDS",
                    help="limit for the whole run (default 600)")
    sb.add_argument("--append", default="", metavar="PARAMS",
                    help="more kernel command-line parameters")
    sb.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                    help="the command and its arguments")
    sb.set_defaults(func=cmd_sandbox)


def _control_parsers(sub) -> None:
    """The verbs that talk to a running VM's control socket (kvmtool's words)."""
    where = ("The socket is <dir>/NAME.sock, dir being $PYKVM_CONTROL_DIR, else "
             "$XDG_RUNTIME_DIR/pykvm, else /tmp/pykvm-<uid>; see docs/control.md.")
    status_line = ("exit status: 0 done; 2 a bad name, no such VM, a stale socket or an "
                   "unsafe directory; 8 the VM failed to do it")
    ls = sub.add_parser("list", help="list the running VMs that have a control socket",
                        description="List the VMs started with `pykvm run --name NAME` (or "
                        "--control): name, pid, state (running, paused, idle), vCPUs, guest. "
                        + where, epilog=status_line)
    ls.add_argument("--json", action="store_true", help="print one JSON array")
    ls.set_defaults(func=cmd_list)
    verbs = (("pause", "pause a running VM: every vCPU held out of KVM_RUN"),
             ("resume", "let a paused VM run on"),
             ("stop", "stop a running VM (its pykvm run exits 0, saying so)"),
             ("stat", "KVM's binary stats of a VM and its vCPUs, exit counts, device counters"),
             ("debug", "debug a running VM: --dump prints every vCPU's registers"))
    for verb, text in verbs:
        v = sub.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ". "
                           + where, epilog=status_line)
        v.add_argument("name", type=_vm_name, metavar="NAME", help="the VM's name (pykvm list)")
        if verb == "debug":
            v.add_argument("--dump", action="store_true", help="print the registers of every "
                           "vCPU (the VM is paused for the reading, then resumed, unless it "
                           "was paused already)")
        if verb in ("stat", "debug"):
            v.add_argument("--json", action="store_true", help="print one JSON object")
        v.set_defaults(func=cmd_control)


def _device_path(text: str) -> str:
    if not text or "\0" in text:
        raise argparse.ArgumentTypeError(f"not a device path: {_quote(text, path=True)}")
    return text


def _device_option(parser) -> None:
    parser.add_argument("--device", type=_device_path, default=None, metavar="PATH",
                        help="the KVM device (default: $PYKVM_DEVICE, else /dev/kvm)")


def build_parser(only=None) -> argparse.ArgumentParser:
    """The ``pykvm`` parser; ``only``: build the arguments of that subcommand alone."""
    p = _Parser(prog="pykvm", description="A virtual machine monitor library over /dev/kvm.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="The KVM device is /dev/kvm unless --device PATH or $PYKVM_DEVICE says "
                "otherwise.\n\nexit status of every command: 0 success; 2 bad input (options, "
                "images, names); 8 VMM or host error\n(KVM device missing or inaccessible, an "
                "ioctl failed, a host limit on open files, memory or threads,\noutput that "
                "cannot be written); 130 SIGINT; 143 SIGTERM; 141 stdout's reader went away.\n"
                "`pykvm run` adds: odd (V<<1)|1 isa-debug-exit; 4 guest failure; 6 unhandled "
                "exit; 124 timeout.\nEvery failure is one line on stderr; with --json, also "
                "one JSON object on stdout.")
    p.add_argument("--version", action="version", version=f"pykvm {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser, action=_Commands)
    sub.only = only

    r = sub.add_parser("run", help="boot a guest (default: the built-in greeting guest)",
                       description="Boot GUEST (an ELF64, a multiboot ELF32, a RISC-V Linux "
                       "Image, a flat .bin, or the name of a built-in guest) and stream its "
                       "console to stdout.",
                       epilog="exit status: 0 guest done; odd (V<<1)|1 guest wrote V to "
                       "isa-debug-exit (ports 0xf4-0xf7, as QEMU); 2 bad input; 4 guest failure; "
                       "6 unhandled exit; 8 VMM/KVM error; 124 timeout; 130 SIGINT or Ctrl-A x "
                       "at the console; 143 SIGTERM (see pykvm.status). Console input: "
                       "standard input feeds the guest's serial console (x86 COM1, RISC-V "
                       "ns16550a). A terminal is put in raw mode for the run and restored "
                       "after it: keys go to the guest (Ctrl-C too); Ctrl-A x quits, Ctrl-A h "
                       "prints help, Ctrl-A Ctrl-A sends Ctrl-A. Other input (a pipe, a file) is "
                       "sent as it is until its end. --no-input turns this off.")
    r.add_argument("guest", nargs="?", help="image path or built-in guest name (default: hello, "
                   "the greeting guest; `pykvm guests` lists them); a name that is a file here "
                   "(Image, vmlinux) is that file")
    r.add_argument("--mem", type=_size, default=64 << 20, metavar="SIZE",
                   help="guest RAM, e.g. 64M, 2G (default 64M; mapped lazily; at most 1T, and 31G for "
                   "an x86 guest pykvm starts in long mode, whose boot page tables map 32 GiB "
                   "of addresses)")
    r.add_argument("--vcpus", "--smp", type=_int_range(1, MAX_VCPUS), default=1, metavar="N",
                   help="number of vCPUs (default 1; a machine refuses more than its tables "
                   "can describe)")
    r.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="seconds before the guest is stopped (exit 124; default 10, none "
                   "with an interactive console; 0 = no deadline)")
    r.add_argument("--no-input", action="store_true",
                   help="do not read standard input: the guest's console gets no input and "
                   "the terminal is left as it is (default: stdin feeds the serial console; "
                   "a terminal becomes interactive, Ctrl-A x quits, Ctrl-A h helps)")
    r.add_argument("--cmdline", type=_cmdline, default="", help="kernel command line "
                   "(multiboot; RISC-V: /chosen/bootargs)")
    r.add_argument("--initrd", type=_file_list, default=(), metavar="FILE[,FILE...]",
                   help="files for the guest, as QEMU's -initrd (x86 multiboot: one module "
                   "each; RISC-V: the initrd)")
    r.add_argument("--trace", action="store_true", help="print every exit and report that reaches "
                   "Python, then each virtio device's counters, the exit counts and timing, "
                   "to stderr")
    r.add_argument("--json", action="store_true", help="print one JSON object with exit, "
                   "exit_code, console, exits, seconds, devices (virtio device counters)")
    r.add_argument("--irqchip", action="store_true", help="create the in-kernel irqchip and PIT")
    r.add_argument("--machine", default="auto", metavar="NAME",
                   help="the machine, as QEMU's -machine: on x86 pc (in-kernel irqchip and PIT, "
                   "fw_cfg, PCI, ACPI with PM timer, CMOS RTC, S3, pc-testdev; vCPU 0 starts, "
                   "the others wait for INIT/SIPI) or bare (RAM and console ports; every vCPU "
                   "starts at the entry), on RISC-V virt; auto (default): pc for multiboot "
                   "kernels, Linux bzImages and --pc-device, bare for other x86 images, virt on "
                   "RISC-V")
    r.add_argument("--disk", "-d", action="append", default=[],
                   metavar="FILE[,ro][,serial=NAME]",
                   help="a virtio-blk disk backed by the raw image FILE (kvmtool's -d): ,ro "
                   "(or QEMU's readonly=on) opens it read-only, ,rw read-write (the default), "
                   ",serial=NAME sets the serial the guest reads (ASCII, up to 20 bytes); a comma "
                   "in FILE is written ,,; a writable image is locked against other users; "
                   "repeatable (x86: on the pc machine's PCI bus)")
    r.add_argument("--rng", action="store_true",
                   help="a virtio-rng device fed from the host's getrandom()")
    r.add_argument("--net", "-n", action="append", default=[],
                   metavar="user|tap[,ifname=NAME][,mac=MAC][,mtu=N][,link=up|down]",
                   help="a virtio-net interface (QEMU's -nic, kvmtool's -n): user = user-mode "
                   "networking through passt (no privileges; the guest gets the host's address "
                   "by DHCP and reaches host and outside TCP/UDP services), tap = the tap "
                   "device ifname=NAME, created when absent (needs CAP_NET_ADMIN) or attached "
                   "to; mac= the guest's MAC (default 52:54:00 and three random bytes), mtu= "
                   "68-65535 (default 1500), link=down starts with the link down; repeatable "
                   "(x86: on the pc machine's PCI bus)")
    r.add_argument("--vsock", default=None, action=_Once, metavar="cid=N,uds=PATH",
                   help="a virtio-vsock device (Firecracker's vsock; QEMU's guest-cid): the "
                   "guest's CID N (3 or more) and a Unix socket PATH the VMM listens on (a "
                   "stale socket file there is replaced, removed again at exit). A host "
                   "process connects to PATH and writes 'CONNECT <port>\\n', gets 'OK "
                   "<host port>\\n' once the guest accepts on that vsock port, then talks "
                   "to it; the guest's connections to host port P (CID 2) go to the Unix "
                   "socket PATH_P, where a host process listens")
    r.add_argument("--share", action="append", default=[],
                   metavar="DIR[,tag=TAG][,ro][,cache=MODE][,sandbox=MODE]",
                   help="a host directory in the guest through virtio-fs (QEMU's "
                   "vhost-user-fs with virtiofsd; kvmtool's 9p share), served by virtiofsd "
                   "(Debian package virtiofsd, trixie or later; or $PYKVM_VIRTIOFSD): the guest "
                   "mounts it with 'mount -t virtiofs TAG /mnt' (tag default hostshare); ,ro "
                   "shares it read-only; cache=auto|always|never|metadata and "
                   "sandbox=namespace|chroot|none are virtiofsd's (namespace, the default, keeps "
                   "symlinks and .. inside DIR; it needs root or user namespaces); a comma in DIR "
                   "is written ,,; all guest RAM becomes a shared memfd; repeatable")
    r.add_argument("--console", choices=("serial", "virtio"), default="serial",
                   help="the console the terminal or standard input talks to: the 16550 "
                   "serial port (default; Linux: console=ttyS0) or a virtio console "
                   "(Linux: console=hvc0); the serial port's output is shown either way")
    r.add_argument("--pc-device", action="append", default=[], metavar="NAME",
                   help="x86 pc machine: add a device by QEMU's -device name (edu: QEMU's "
                   "educational PCI device; intel-iommu: VT-d with DMA and interrupt "
                   "remapping); repeatable")
    r.add_argument("--param", action=_Params, type=_param_list, default=(),
                   metavar="N[,N...]",
                   help=f"values for the guest's pykvm_params[] array, in order from index 0 "
                   f"(unsigned 64-bit integers, decimal or 0x hex; at most {MAX_PARAMS} in "
                   "all); repeatable, the lists join; the image must have the symbol (guests "
                   "built with pykvm's runtime do)")
    r.add_argument("--cpuid", action="append", type=_cpuid_spec, default=[],
                   metavar="LEAF[.SUB]:REG=VALUE",
                   help="x86: set register REG (eax, ebx, ecx or edx) of CPUID leaf LEAF, "
                   "sub-leaf SUB (default 0), to the 32-bit VALUE in every vCPU, e.g. "
                   "0x80000001:edx=0x28100800 (a leaf KVM does not list is added); applied "
                   "after --cpu-features; repeatable")
    r.add_argument("--cpu-features", action="append", type=_feature_list, default=[],
                   metavar="[host,]+FEAT,-FEAT...",
                   help="x86: CPU features on (+FEAT or FEAT=on) or off (-FEAT or FEAT=off) "
                   "in every vCPU's CPUID, in QEMU's -cpu spelling, e.g. +rdtscp,-avx or "
                   "host,-avx (write --cpu-features=-avx when the list starts with a minus); "
                   "names as QEMU's (pykvm.arch.x86.regs.CPUID_FEATURES); repeatable; KVM "
                   "keeps refusing what the host cannot do")
    r.add_argument("--python-loop", action="store_true", help="run the exit loop in Python "
                   "instead of the C helper")
    r.add_argument("--cpu-type", default=None, metavar="TYPE",
                   help="RISC-V: the ISA extensions the guest gets: max (default), min "
                   "(rv64imafdc), plus ,ext / ,-ext items, e.g. min,zabha or max,-sstc")
    r.add_argument("--suspend-seconds", type=_seconds, default=None, metavar="SECONDS",
                   help="RISC-V: how long an SBI system suspend sleeps (default 0)")
    r.add_argument("--name", type=_vm_name, default=None, metavar="NAME",
                   help="name the VM and serve its control socket (pykvm list, pause, "
                   "resume, stop, stat, debug NAME; docs/control.md)")
    r.add_argument("--control", action="store_true",
                   help="serve the control socket under the name guest-<pid> (implied by "
                   "--name)")
    _gdb_options(r, "its first instruction")
    r.add_argument("--snapshot-at", default=None, metavar="SPEC",
                   help="with --snapshot: when to take it: SECONDS after the start (2.5s) or "
                   "console:TEXT (the guest held as TEXT appears on the console); the run "
                   "then stops with status 0 (docs/snapshots.md)")
    r.add_argument("--snapshot", default=None, metavar="PATH",
                   help="write a snapshot of the machine there at --snapshot-at; continue it "
                   "with pykvm restore PATH")
    _device_option(r)
    r.set_defaults(func=cmd_run)
    rs = sub.add_parser("restore", help="continue a guest from a snapshot (pykvm run "
                        "--snapshot)",
                        description="Build the machine the snapshot PATH recorded, load its "
                        "state and run the guest on from there, its console on stdout as "
                        "pykvm run streams it (docs/snapshots.md).",
                        epilog="exit status as pykvm run's; 2 for a missing, corrupted, "
                        "truncated or foreign snapshot (one line on stderr).")
    rs.add_argument("restore", metavar="PATH", help="the snapshot file")
    rs.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                    help="seconds before the run is stopped (default 10; 0: none)")
    rs.add_argument("--json", action="store_true", help="one JSON object with the outcome")
    rs.add_argument("--trace", action="store_true", help="print exits and events on stderr")
    rs.add_argument("--no-input", action="store_true",
                    help="do not feed standard input to the guest's console")
    _gdb_options(rs, "the snapshot's next instruction")
    rs.add_argument("--snapshot-at", default=None, metavar="SPEC",
                    help="as pykvm run's: snapshot the restored machine again")
    rs.add_argument("--snapshot", default=None, metavar="PATH", help="as pykvm run's")
    _device_option(rs)
    rs.set_defaults(func=cmd_restore)
    _control_parsers(sub)
    _sandbox_parser(sub)

    c = sub.add_parser("caps", help="what this KVM offers")
    c.add_argument("--json", action="store_true", help="JSON output")
    _device_option(c)
    c.set_defaults(func=cmd_caps)

    g = sub.add_parser("regs", help="list a fresh vCPU's registers (name, id, size, value)",
                       description="List a fresh vCPU's registers, one row each under a "
                       "header: name, ONE_REG id (- for none), size in bytes, value (or the "
                       "errno KVM answered). x86 MSR rows read 'msr INDEX NAME', the name from "
                       "the Intel SDM / AMD APM / KVM / Hyper-V tables "
                       "(pykvm.arch.x86.msrs) where it has one.")
    g.add_argument("--json", action="store_true", help="print one JSON array of objects with "
                   "name, id, size, value, and on x86 msr (the index, or null) and msr_name "
                   "(or null)")
    _device_option(g)
    g.set_defaults(func=cmd_regs)

    gl = sub.add_parser("guests", help="list (or --build) the built-in guests")
    gl.add_argument("--build", action="store_true",
                    help="build the built-in guests from the runtime first (needs gcc/binutils)")
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
    b.add_argument("--curves", action="store_true", help="measure how each cost grows with the "
                   "work instead (exits/s against vCPUs, VM create rate against VMs alive, "
                   "memory per VM, create time and memory against guest RAM size, "
                   "kvm-unit-tests against QEMU) with Firecracker's figures beside them; "
                   "--plot draws one panel per curve")
    b.add_argument("--exits", type=_int_range(1, 10 ** 8), default=0, metavar="N",
                   help="exits per exit-cost measurement (1..100000000; default 10000, "
                   "with --quick too: fewer let the loop's set-up weigh on each exit)")
    b.set_defaults(func=cmd_bench)

    ks = sub.add_parser("kselftest-install", help="write pykvm's tests as a kselftest install "
                        "(run_kselftest.sh, KTAP) for KernelCI, LAVA or a lab's CI",
                        description="Write DIR (new or empty, or an earlier install) as the "
                        "kernel's selftests install: run_kselftest.sh (the kernel's options: "
                        "-l, -t COLLECTION:TEST, -c, -s, -p, -o SECONDS; -j N tests at once; "
                        "TAP 13 output with heartbeats and a summary of failures), "
                        "kselftest-list.txt, and per "
                        "collection a settings file (timeout=) and one executable per pytest "
                        "file, run under pytest with pykvm's plugin by this Python (or "
                        "$PYKVM_PYTHON). Collections: pykvm_selftests (the ported KVM "
                        "selftests), pykvm_x86 (KVM uAPI checks). See docs/kselftest.md.",
                        epilog="exit status: 0 written; 2 bad input (one line); 8 a write "
                        "failed")
    ks.add_argument("dir", metavar="DIR", help="the directory to write")
    ks.add_argument("--collection", action="append", metavar="NAME",
                    help="install only this collection (repeatable; default: all)")
    ks.add_argument("--tests", nargs="+", metavar="PATTERN",
                    help="install only the tests whose name (test_sel_cpuid) or "
                    "collection:name matches a shell pattern (test_sel_*)")
    ks.set_defaults(func=cmd_kselftest_install)

    gu = sub.add_parser("guest", help="build a guest of your own (pykvm guest build FILE)")
    gua = gu.add_subparsers(dest="guest_cmd", metavar="ACTION", parser_class=_Parser)
    gua.required = True
    gb = gua.add_parser("build", help="compile FILE.c or FILE.S with pykvm's guest runtime",
                        description="Compile one guest source with the guest runtime pykvm "
                        "ships (pykvm_guest.h, start-up code, linker scripts) and print the "
                        "image's path. Images are cached by content in $PYKVM_CACHE/guests "
                        "(default ~/.cache/pykvm/guests): pykvm run $(pykvm guest build g.c)",
                        epilog="exit status (see pykvm.status): 0 built; 2 bad input: a bad "
                        "option or output path, a source that does not compile or link (the "
                        "compiler's message follows the line on stderr); 8 the image could not "
                        "be written (a full disk, a read-only or forbidden place)")
    gb.add_argument("source", metavar="FILE", help="the guest's .c or .S file")
    gb.add_argument("--arch", choices=("x86_64", "riscv64"), default=None,
                    help="target architecture (default: this host's)")
    gb.add_argument("--mode", choices=("long", "protected", "real", "supervisor"), default=None,
                    help="x86 boot mode: long (64-bit, guest_main), protected (multiboot "
                    "32-bit, guest_main32), real (flat .bin at 0x8000, guest_main16); default: "
                    "the entry point the source defines. RISC-V: supervisor")
    gb.add_argument("-o", "--output", metavar="OUT", default=None,
                    help="also copy the image to OUT and print that path (real mode: OUT.bin, "
                    "with OUT.elf beside it; an OUT ending in .bin is that name, one ending in "
                    ".elf is refused)")
    gb.add_argument("--cflags", default="", metavar="FLAGS",
                    help="extra compiler options for FILE, e.g. \"-DSTEPS=4 -Iinclude\"")
    gb.set_defaults(func=cmd_guest_build)
    return p


def main(argv=None) -> int:
    """Entry point of the ``pykvm`` command; returns the exit status (see pykvm.status).

    Started as the ``pykvm`` program (``argv`` None), it flushes its output and ends the process
    at once with that status instead of returning: the interpreter's own teardown of every
    loaded module costs more than some whole commands (VMs and fds are closed by then)."""
    program = argv is None and _started_as_program()
    # called in-process (tests, another program): the caller's signal handlers come back on
    # return; a SIGTERM handler of ours left behind would turn a later child's (e.g. one that
    # pyroute2 forks and ends with SIGTERM) termination into this module's exception
    saved = {} if program else {s: signal.getsignal(s) for s in ENDING_SIGNALS}
    try:
        code = _main(argv, program)
    except (_Signalled, KeyboardInterrupt) as e:      # a second signal while the first was told
        signum = e.signum if isinstance(e, _Signalled) else signal.SIGINT
        code = _signal_status(signum)
        _sig.committed = True
        if not _sig.said:             # it came before _main could say it: say it here
            try:
                _err(f"pykvm: interrupted by {_signal_name(signum)}")
            except (OSError, ValueError):
                pass
    finally:
        _sig.committed = True          # the outcome is decided: a signal from here on ends nothing
        for s, handler in saved.items():
            try:
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            except (ValueError, TypeError):           # not the main thread: left alone
                pass
    if program:
        code = _cliutil.finish_program(code, "pykvm", EXIT_VMM)
        os._exit(code)
    return code


def _main(argv=None, program=False) -> int:
    """:func:`main` up to the exit status.

    SIGINT and SIGTERM end any command with one line and status 130 / 143, whenever they
    arrive: during start-up they abort it, during a run they stop every vCPU first. Output
    that cannot be written (stdout closed, a full disk, an fd not open for writing) is one line
    on stderr and status 8 (141 for a reader that went away), never success. Any other failure
    is one line (and, with --json, one JSON object) with the status of its class: 2 bad input,
    8 a host-side or VMM failure (out of fds, memory or threads; KVM missing; an ioctl)."""
    _sig.signum = None
    _sig.reported = False
    _sig.committed = False
    _sig.said = False
    _invocation["argv"] = argv
    if program:
        code = _cliutil.start_program("pykvm", EXIT_VMM)   # stdout closed: one line, 8
        if code is not None:
            return code
    else:
        _cliutil.reset()
    if sys.stdout is None:                   # in-process, with no stdout: nothing to write
        sys.stdout = open(os.devnull, "w")
    try:
        try:
            _install_signal_handlers()
        except ValueError:                   # not the main thread: leave signals alone
            pass
        parser = build_parser(_command_of(sys.argv[1:] if argv is None else argv))
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:              # --help, --version, or a usage error (said)
            code = e.code if isinstance(e.code, int) else EXIT_USAGE
            sys.stdout.flush()
            return code
        if not args.cmd:
            parser.print_help()
            sys.stdout.flush()
            return EXIT_USAGE
        if getattr(args, "device", None):
            os.environ["PYKVM_DEVICE"] = args.device     # every Kvm() of this process
        try:
            code = args.func(args)
        except (_Signalled, KeyboardInterrupt):
            raise
        except SystemExit as e:               # a command gave up with a message or a status
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:                             # e.g. bench --plot without matplotlib
                code = _report("bad_input", EXIT_USAGE, str(e.code), _wants_json(argv))
        except OSError as e:
            if _stdout_failed(e):
                return _output_failure()
            if _sig.signum is not None:       # the signal's exception, wrapped by the code it hit
                raise _Signalled(_sig.signum) from e
            code = _report(*_classify(e), _wants_json(argv))
        except Exception as e:                # every failure is one line
            if _output["error"] is not None:  # stdout failed first: that is the outcome
                return _output_failure()
            if _sig.signum is not None:       # e.g. a RuntimeError around it from __set_name__
                raise _Signalled(_sig.signum) from e
            if os.environ.get("PYKVM_TRACEBACK"):
                import traceback
                traceback.print_exc()
            code = _report(*_classify(e), _wants_json(argv))
        if _sig.signum is not None and not _sig.reported:
            # a signal whose exception Python swallowed (it landed in a finalizer or callback)
            raise _Signalled(_sig.signum)
        sys.stdout.flush()                   # a failure to write is the command's outcome
        if _output["error"] is not None:
            return _output_failure()
        return code
    except (_Signalled, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, _Signalled) else signal.SIGINT
        detail = f"interrupted by {_signal_name(signum)}"
        committed, _sig.committed = _sig.committed, True      # a second signal ends nothing
        try:
            if _wants_json(argv) and not committed:
                _print_json_outcome("interrupted", _signal_status(signum), detail)
            _err(f"pykvm: {detail}")
            _sig.said = True
        except (_Signalled, OSError, ValueError):
            pass
        return _signal_status(signum)
    except OSError as e:                     # writing our own output failed
        if not _stdout_failed(e):
            return _report(*_classify(e), False)
        return _output_failure()


if __name__ == "__main__":
    sys.exit(main())
