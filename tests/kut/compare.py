#!/usr/bin/env python3
"""Run upstream kvm-unit-tests (x86_64) under QEMU ``-accel kvm`` and under ``pykvm run`` and
tabulate PASS/FAIL/SKIP counts and wall times side by side.

    python tests/kut/compare.py /path/to/kvm-unit-tests            # all x86_64 tests
    python tests/kut/compare.py KUT -k apic -k smptest              # names containing these
    python tests/kut/compare.py KUT --only pykvm --json out.json
    python tests/kut/compare.py KUT --markdown                      # a table for the docs

KUT is a kvm-unit-tests tree that has been configured and built for x86_64 (``./configure &&
make``); it is never part of this repository. The tests and their parameters come from its
``x86/unittests.cfg``, as its own ``run_tests.sh`` reads them:

* QEMU runs as kvm-unit-tests' ``x86/run`` starts it (``-nodefaults``, pc-testdev,
  isa-debug-exit at 0xf4, pci-testdev, ``-kernel X.flat -smp N -append ARGS -initrd ENV``), with
  the test's ``qemu_params`` less any ``-cpu`` option (``-cpu host``/``max`` abort on a host whose
  KVM is served by kvm_pvm; QEMU's default CPU model is used instead).
* pykvm runs ``pykvm run X.flat --vcpus N --mem M --cmdline ARGS --initrd ENV --timeout T``,
  where ``M`` is QEMU's ``-m`` (128 MiB when the test gives none, QEMU's default), plus
  ``--pc-device edu`` / ``--pc-device intel-iommu`` where QEMU gets those ``-device``s (see
  :func:`pykvm_options`).

Both get the same environment file (what ``run_tests.sh`` writes: TARGET, QEMU_ACCEL, the QEMU
and kernel versions). A test's verdict follows kvm-unit-tests: exit status 1 (isa-debug-exit
value 0) is PASS, 77 (value 38) SKIP, 124 a timeout, anything else FAIL; tests whose ``arch``,
``accel`` or ``check`` conditions this host does not meet are SKIP without running, under both.
The PASS/FAIL/SKIP/XFAIL counts are the ``PASS:``/``FAIL:``/... lines the test printed.

QEMU results can be cached (``--qemu-cache FILE``): they depend only on the test binary, its
arguments and the QEMU binary, and QEMU spends ~3 s per test in SeaBIOS.
"""
import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_TIMEOUT = 90.0              # run_tests.sh's default
QEMU_DEFAULT_MEM = 128 << 20

_RESULT_LINE = re.compile(r"^(PASS|FAIL|SKIP|XFAIL|XPASS|KFAIL): ", re.M)
_SUMMARY = re.compile(r"^SUMMARY: (\d+) tests(.*)$", re.M)


@dataclass
class Test:
    name: str
    file: str
    smp: int = 1
    test_args: str = ""
    qemu_params: str = ""
    arch: str = ""
    timeout: float = DEFAULT_TIMEOUT
    groups: List[str] = field(default_factory=list)
    accel: str = ""
    check: List[str] = field(default_factory=list)

    def mem(self) -> int:
        """QEMU's -m in bytes (128 MiB by default)."""
        toks = shlex.split(self.qemu_params)
        for i, t in enumerate(toks):
            if t == "-m" and i + 1 < len(toks):
                v = toks[i + 1].split(",")[0]
                mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
                if v[-1:].lower() in mult:
                    return int(v[:-1]) * mult[v[-1].lower()]
                return int(v) << 20
        return QEMU_DEFAULT_MEM

    def qemu_extra(self) -> List[str]:
        """qemu_params without -cpu (and its value)."""
        toks = shlex.split(self.qemu_params)
        out, skip = [], False
        for t in toks:
            if skip:
                skip = False
                continue
            if t == "-cpu":
                skip = True
                continue
            out.append(t)
        return out

    def cpu_model(self) -> str:
        toks = shlex.split(self.qemu_params)
        for i, t in enumerate(toks):
            if t == "-cpu" and i + 1 < len(toks):
                return toks[i + 1]
        return ""


@dataclass
class Result:
    test: str
    runner: str                      # "qemu" or "pykvm"
    verdict: str                     # PASS FAIL SKIP TIMEOUT
    status: Optional[int]
    seconds: float
    counts: Dict[str, int] = field(default_factory=dict)
    summary: str = ""
    reason: str = ""
    tail: str = ""

    @property
    def npass(self) -> int:
        return self.counts.get("PASS", 0)


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    return v


def parse_unittests_cfg(path: str) -> List[Test]:
    """The tests of a kvm-unit-tests ``unittests.cfg`` (an INI-like file, '#' comments)."""
    tests: List[Test] = []
    cur: Optional[dict] = None
    with open(path) as f:
        for raw in f:
            line = raw.split("#", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
            if not line.strip():
                continue
            m = re.match(r"^\[(.+)\]$", line.strip())
            if m:
                cur = {"name": m.group(1)}
                tests.append(cur)
                continue
            if cur is None or "=" not in line:
                continue
            k, v = line.split("=", 1)
            cur[k.strip()] = _unquote(v)
    out = []
    for d in tests:
        if "file" not in d:
            continue
        out.append(Test(
            name=d["name"], file=d["file"], smp=int(d.get("smp", "1") or 1),
            test_args=d.get("test_args", d.get("extra_params", "")),
            qemu_params=d.get("qemu_params", ""), arch=d.get("arch", ""),
            timeout=_seconds(d.get("timeout", "")) or DEFAULT_TIMEOUT,
            groups=d.get("groups", "").split(), accel=d.get("accel", ""),
            check=d.get("check", "").split()))
    return out


def _seconds(text: str) -> Optional[float]:
    text = text.strip()
    if not text:
        return None
    mult = {"s": 1, "m": 60, "h": 3600}.get(text[-1], None)
    if mult:
        return float(text[:-1]) * mult
    return float(text)


def skip_reason(t: Test, kut: str) -> str:
    """Why run_tests.sh would not run ``t`` on this host ("" if it would)."""
    if t.arch and t.arch != "x86_64":
        return f"{t.arch} only"
    if t.accel and t.accel != "kvm":
        return f"{t.accel} only"
    if "nodefault" in t.groups:
        return "nodefault group (manual run only)"
    for c in t.check:
        p, _, want = c.partition("=")
        try:
            with open(p) as f:
                got = f.read().strip()
        except OSError:
            return f"{p} not equal to {want}"
        if got != want:
            return f"{p} not equal to {want}"
    if not os.path.isfile(os.path.join(kut, "x86", t.file)):
        return f"test file {t.file} not built"
    return ""


def expand_args(text: str) -> str:
    """test_args may hold backticks (e.g. `date +%s`): expand them as run_tests.sh's eval does."""
    if "`" not in text and "$(" not in text:
        return text
    return subprocess.run(["bash", "-c", f"printf %s {text}"], capture_output=True,
                          text=True).stdout


def write_env(path: str, qemu: str) -> None:
    """The environment file run_tests.sh hands to every test (as -initrd)."""
    lines = ["TARGET=qemu", "QEMU_ACCEL=kvm"]
    try:
        vs = subprocess.run([qemu, "-h"], capture_output=True, text=True).stdout.splitlines()[0]
        lines.append(f"QEMU_VERSION_STRING={vs}")
        m = re.search(r"version (\d+)\.(\d+)\.(\d+)", vs)
        if m:
            lines += [f"QEMU_MAJOR={m.group(1)}", f"QEMU_MINOR={m.group(2)}",
                      f"QEMU_MICRO={m.group(3)}"]
    except (OSError, IndexError):
        pass
    rel = os.uname().release
    lines.append(f"KERNEL_VERSION_STRING={rel}")
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", rel)
    if m:
        lines += [f"KERNEL_VERSION={m.group(1)}", f"KERNEL_PATCHLEVEL={m.group(2)}",
                  f"KERNEL_SUBLEVEL={m.group(3) or ''}", "KERNEL_EXTRAVERSION="]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def classify(t: Test, runner: str, status: Optional[int], seconds: float, out: str,
             timed_out: bool) -> Result:
    counts: Dict[str, int] = {}
    for m in _RESULT_LINE.finditer(out):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    sm = _SUMMARY.findall(out)
    summary = ("SUMMARY: %s tests%s" % sm[-1]) if sm else ""
    if timed_out or status == 124:
        verdict = "TIMEOUT"
    elif status == 1:
        verdict = "PASS"
    elif status == 77:
        verdict = "SKIP"
    else:
        verdict = "FAIL"
    tail = "\n".join(out.strip().splitlines()[-6:])
    return Result(t.name, runner, verdict, status, round(seconds, 3), counts, summary, "", tail)


def _run(cmd: List[str], timeout: float) -> tuple:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout + 5)
        out, status, timed_out = p.stdout, p.returncode, False
    except subprocess.TimeoutExpired as e:
        out, status, timed_out = e.stdout or b"", None, True
    return status, time.monotonic() - t0, out.decode("utf-8", "replace"), timed_out


def qemu_command(t: Test, kut: str, env: str, qemu: str) -> List[str]:
    return (["timeout", "--foreground", f"{t.timeout:g}", qemu, "--no-reboot", "-nodefaults",
             "-global", "kvm-pit.lost_tick_policy=discard",
             "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
             "-display", "none", "-serial", "stdio", "-device", "pci-testdev",
             "-machine", "accel=kvm", "-kernel", os.path.join(kut, "x86", t.file),
             "-smp", str(t.smp)] + t.qemu_extra() +
            ["-append", expand_args(t.test_args), "-initrd", env])


PYKVM_DEVICES = ("edu", "intel-iommu")


def pykvm_options(t: Test) -> List[str]:
    """pykvm run options for the test's qemu_params: ``-m`` → ``--mem`` (QEMU's 128 MiB when
    absent); ``-device edu`` / ``-device intel-iommu,...`` → ``--pc-device``. The rest has no
    pykvm counterpart and is left out: ``-cpu`` (dropped for QEMU too), ``-M q35,...`` (pykvm's
    PC with those devices stands in for q35), ``-machine pit=off`` (pykvm keeps the PIT),
    ``-overcommit``, ``-enable-kvm``, other ``-device``s (the tests that need them are skipped
    by their ``check`` lines or fail under QEMU here too)."""
    out = ["--mem", f"{t.mem() >> 20}M"]
    toks = shlex.split(t.qemu_params)
    for i, tok in enumerate(toks):
        if tok == "-device" and i + 1 < len(toks):
            name = toks[i + 1].split(",")[0]
            if name in PYKVM_DEVICES:
                out += ["--pc-device", name]
    return out


def pykvm_command(t: Test, kut: str, env: str, pykvm: List[str]) -> List[str]:
    return pykvm + ["run", os.path.join(kut, "x86", t.file), "--vcpus", str(t.smp)] + \
        pykvm_options(t) + ["--cmdline", expand_args(t.test_args), "--initrd", env,
                            "--timeout", f"{t.timeout:g}"]


def _qemu_key(t: Test, kut: str, qemu: str) -> str:
    h = hashlib.sha256()
    with open(os.path.join(kut, "x86", t.file), "rb") as f:
        h.update(f.read())
    h.update(json.dumps([t.name, t.smp, t.test_args, t.qemu_extra(), t.timeout]).encode())
    q = shutil.which(qemu) or qemu
    st = os.stat(q)
    h.update(f"{q}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def run_one(t: Test, runner: str, kut: str, env: str, qemu: str, pykvm: List[str],
            cache: Optional[dict]) -> Result:
    why = skip_reason(t, kut)
    if why:
        return Result(t.name, runner, "SKIP", None, 0.0, {}, "", why)
    if runner == "qemu":
        key = _qemu_key(t, kut, qemu)
        if cache is not None and key in cache:
            return Result(**cache[key])
        status, secs, out, to = _run(qemu_command(t, kut, env, qemu), t.timeout)
        r = classify(t, runner, status, secs, out, to)
        if cache is not None:
            cache[key] = asdict(r)
        return r
    status, secs, out, to = _run(pykvm_command(t, kut, env, pykvm), t.timeout)
    return classify(t, runner, status, secs, out, to)


def _fmt_counts(r: Optional[Result]) -> str:
    if r is None:
        return "-"
    if r.reason:
        return "-"
    c = r.counts
    s = f"{c.get('PASS', 0)}/{c.get('FAIL', 0)}/{c.get('SKIP', 0)}"
    if c.get("XFAIL"):
        s += f" x{c['XFAIL']}"
    return s


def table(tests: List[Test], results: Dict[str, Dict[str, Result]], markdown: bool) -> str:
    hdr = ["test", "smp", "QEMU", "P/F/S", "time", "pykvm", "P/F/S", "time", "same"]
    rows = []
    for t in tests:
        q = results.get("qemu", {}).get(t.name)
        p = results.get("pykvm", {}).get(t.name)

        def v(r):
            return "-" if r is None else r.verdict

        def secs(r):
            return "-" if r is None or r.reason else f"{r.seconds:.2f}"
        same = ""
        if q and p:
            same = "yes" if (q.verdict == p.verdict and q.counts.get("PASS", 0) ==
                             p.counts.get("PASS", 0) and q.counts.get("FAIL", 0) ==
                             p.counts.get("FAIL", 0)) else "NO"
        rows.append([t.name, str(t.smp), v(q), _fmt_counts(q), secs(q), v(p), _fmt_counts(p),
                     secs(p), same])
    if markdown:
        lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(hdr, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*hdr)] + [fmt.format(*r) for r in rows])


def check_parity(tests: List[Test], results: Dict[str, Dict[str, Result]]) -> List[str]:
    """Problems with the must-have: every test QEMU passes passes under pykvm with the same
    PASS count, in less wall time."""
    bad = []
    for t in tests:
        q = results["qemu"].get(t.name)
        p = results["pykvm"].get(t.name)
        if q is None or q.verdict != "PASS":
            continue
        if p is None or p.verdict != "PASS":
            bad.append(f"{t.name}: QEMU PASS, pykvm {p.verdict if p else 'not run'}"
                       + (f" ({p.tail.splitlines()[-1]})" if p and p.tail else ""))
        elif p.npass != q.npass:
            bad.append(f"{t.name}: PASS count {p.npass} under pykvm, {q.npass} under QEMU")
        elif p.seconds >= q.seconds:
            bad.append(f"{t.name}: pykvm took {p.seconds:.2f} s, QEMU {q.seconds:.2f} s")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kut", help="a built kvm-unit-tests tree (x86_64)")
    ap.add_argument("-k", action="append", default=[], metavar="SUBSTR",
                    help="only tests whose name contains SUBSTR (repeatable)")
    ap.add_argument("--only", choices=("qemu", "pykvm"), help="run one side only")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--pykvm", default=None, help="pykvm command (default: this checkout's "
                    ".venv/bin/pykvm, else `python -m pykvm`)")
    ap.add_argument("--qemu-cache", default=None, metavar="FILE",
                    help="reuse/keep QEMU results in FILE (JSON)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write all results as JSON")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each result's tail")
    args = ap.parse_args(argv)

    kut = os.path.abspath(args.kut)
    cfg = os.path.join(kut, "x86", "unittests.cfg")
    if not os.path.isfile(cfg):
        print(f"compare: {cfg} not found (a kvm-unit-tests source tree?)", file=sys.stderr)
        return 2
    tests = parse_unittests_cfg(cfg)
    if args.k:
        tests = [t for t in tests if any(k in t.name for k in args.k)]
    pykvm = shlex.split(args.pykvm) if args.pykvm else None
    if pykvm is None:
        venv = os.path.join(CHECKOUT, ".venv", "bin", "pykvm")
        pykvm = [venv] if os.path.exists(venv) else [sys.executable, "-m", "pykvm"]
    cache = None
    if args.qemu_cache:
        try:
            with open(args.qemu_cache) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    runners = [args.only] if args.only else ["qemu", "pykvm"]
    results: Dict[str, Dict[str, Result]] = {r: {} for r in runners}
    with tempfile.TemporaryDirectory(prefix="pykvm-kut-") as tmp:
        env = os.path.join(tmp, "env")
        write_env(env, args.qemu)
        for t in tests:
            for runner in runners:
                r = run_one(t, runner, kut, env, args.qemu, pykvm, cache)
                results[runner][t.name] = r
                print(f"{t.name:<32} {runner:<6} {r.verdict:<8} {_fmt_counts(r):<10} "
                      f"{r.seconds:7.2f}s {r.reason}", file=sys.stderr, flush=True)
                if args.verbose and r.tail:
                    print("    " + r.tail.replace("\n", "\n    "), file=sys.stderr)
            if cache is not None:
                with open(args.qemu_cache, "w") as f:
                    json.dump(cache, f, indent=1)
    print(table(tests, results, args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({r: {k: asdict(v) for k, v in d.items()} for r, d in results.items()},
                      f, indent=1)
    if len(runners) == 2:
        bad = check_parity(tests, results)
        qp = [t.name for t in tests if results["qemu"][t.name].verdict == "PASS"]
        print(f"\nQEMU passes {len(qp)} tests; pykvm matches {len(qp) - len(bad)} of them.")
        for b in bad:
            print("  " + b)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
