"""kvm-unit-tests for riscv64 under pykvm and under QEMU + OpenSBI: what to run and how to count.

The tests are upstream's (https://gitlab.com/kvm-unit-tests/kvm-unit-tests), built outside this
checkout: ``./configure --arch=riscv64 --cross-prefix=riscv64-linux-gnu-`` and ``make`` give
``riscv/*.flat``, Linux-Image-header kernels that read their environment from an initrd and print
through the ns16550a the device tree names. Nothing of theirs is kept here.

* Inside the RISC-V lab, ``tests/riscv/test_kut.py`` boots them with ``pykvm run`` (no Python
  glue); the lab copies the build in when ``PYKVM_KUT_RISCV_DIR`` names it (see
  ``pykvm/lab/build.py`` EXTRA_TREES).
* On the host, ``python tests/riscv/kut.py qemu`` runs the same build under the lab's QEMU with
  OpenSBI (TCG, no KVM) and writes the counts to ``$PYKVM_KUT_RISCV_DIR/pykvm-kut-qemu.json``,
  which the lab carries in with the build: the inner test then insists that pykvm passes at
  least as many checks in each compared group.

Both runs get the same environment file, command line, hart count and RAM size (:data:`RUNS`).
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter

# The environment file both VMMs hand over as the initrd (kvm-unit-tests reads it as environ):
# FOO/BAR/BAZ for selftest's environ check. (Not INVALID_ADDR_AUTO: with it, OpenSBI 1.6 never
# returns from the DBCN write of an address past RAM, and the QEMU run hangs there.)
ENV = "FOO=foo\nBAR=bar\nBAZ=baz\n"
SMP = 2
MEM = "256M"

# (name, .flat file, command line): riscv/unittests.cfg's selftest and sbi entries
RUNS = [
    ("selftest", "selftest.flat", "foo bar baz"),
    ("sbi", "sbi.flat", ""),
]

# The groups compared: SBI extensions KVM serves in full in the kernel (base, ipi) or leaves
# to the VMM (dbcn, susp), and selftest itself.
COMPARED = {"selftest": ("selftest",), "sbi": ("base", "ipi", "dbcn", "susp")}

BASELINE = "pykvm-kut-qemu.json"
_LINE = re.compile(r"^(PASS|FAIL|XPASS|XFAIL|KFAIL|SKIP): (.*)$")


def kut_dir(checkout: str | None = None) -> str | None:
    """The kvm-unit-tests build: ``$PYKVM_KUT_RISCV_DIR``, else ``<checkout>/build/kut-riscv``
    (where the lab puts it); None when neither has ``riscv/selftest.flat``."""
    cands = [os.environ.get("PYKVM_KUT_RISCV_DIR")]
    if checkout:
        cands.append(os.path.join(checkout, "build", "kut-riscv"))
    for d in cands:
        if d and os.path.isfile(os.path.join(d, "riscv", "selftest.flat")):
            return d
    return None


def group_of(test: str, prefix: str) -> str:
    """"sbi: base: probe_ext: ..." -> "base"; "selftest: exceptions" -> "selftest"."""
    parts = [p.strip() for p in prefix.split(": ")]
    if test == "sbi" and len(parts) > 1 and parts[0] == "sbi":
        return parts[1]
    return parts[0]


def count(test: str, output: str) -> dict:
    """{group: {"PASS": n, "FAIL": n, "SKIP": n, ...}} from kvm-unit-tests' report lines
    (KFAIL: a failure the test itself calls known), plus "_failures": the FAIL/XPASS lines and
    "_exit": the EXIT: STATUS value, if printed (None when the run never got that far)."""
    groups: dict = {}
    fails = []
    status = None
    for raw in output.splitlines():
        line = raw.strip("\r")
        m = _LINE.match(line)
        if m:
            kind, rest = m.groups()
            groups.setdefault(group_of(test, rest), Counter())[kind] += 1
            if kind in ("FAIL", "XPASS"):
                fails.append(line)
            continue
        m = re.match(r"^EXIT: STATUS=(\d+)", line)
        if m:
            status = int(m.group(1))
    out = {g: dict(c) for g, c in sorted(groups.items())}
    out["_failures"] = fails
    out["_exit"] = status
    return out


def write_env(path: str) -> str:
    with open(path, "w") as f:
        f.write(ENV)
    return path


# -- the host side: QEMU + OpenSBI ---------------------------------------------------------------

def run_qemu(kut: str, cpu: str, work: str, timeout: float = 600.0) -> dict:
    """Run :data:`RUNS` under the RISC-V lab's QEMU (``-machine virt -cpu <cpu> -bios`` OpenSBI,
    TCG) and return {name: counts}."""
    import subprocess
    from pathlib import Path

    from pykvm.lab.debian import Archive
    from pykvm.lab.qemu import trixie_riscv_qemu

    cache = Path(os.environ.get("PYKVM_LAB_CACHE", "~/.cache/pykvm/lab")).expanduser()
    qemu = trixie_riscv_qemu(Archive(cache))
    env_file = write_env(os.path.join(work, "kut.env"))
    results = {"_qemu": qemu.version, "_firmware": qemu.firmware}
    for name, flat, args in RUNS:
        argv = list(qemu.argv_prefix) + (["-L", qemu.share] if qemu.share else [])
        argv += ["-machine", "virt", "-cpu", "rv64,h=true" if cpu == "rv64" else cpu,
                 "-bios", qemu.firmware or "default", "-smp", str(SMP), "-m", MEM,
                 "-nodefaults", "-nographic", "-serial", "stdio", "-no-reboot",
                 "-kernel", os.path.join(kut, "riscv", flat), "-initrd", env_file,
                 "-append", args]
        log = os.path.join(work, f"qemu-{cpu}-{name}.log")
        with open(log, "w") as f:
            try:
                rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                    env={**os.environ, **qemu.env}).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        with open(log, errors="replace") as f:
            results[name] = count(name, f.read())
        results[name]["_status"] = rc
    return results


def main(argv=None) -> int:
    import argparse
    import tempfile

    p = argparse.ArgumentParser(prog="python tests/riscv/kut.py",
                                description="Run kvm-unit-tests riscv under QEMU + OpenSBI "
                                "(the lab's QEMU, TCG) and write the baseline pykvm is "
                                "compared against inside the RISC-V lab.")
    p.add_argument("what", choices=["qemu"])
    p.add_argument("--kut", default=os.environ.get("PYKVM_KUT_RISCV_DIR"),
                   help="the kvm-unit-tests build dir (default $PYKVM_KUT_RISCV_DIR)")
    p.add_argument("--cpu", action="append", help="QEMU CPU model (rv64, max; default both)")
    p.add_argument("--logs", default=None, help="keep the serial logs here")
    a = p.parse_args(argv)
    if not a.kut or not os.path.isfile(os.path.join(a.kut, "riscv", "selftest.flat")):
        p.error("no kvm-unit-tests riscv build: pass --kut DIR or set PYKVM_KUT_RISCV_DIR")
    out = {}
    with tempfile.TemporaryDirectory() as td:
        work = a.logs or td
        os.makedirs(work, exist_ok=True)
        for cpu in a.cpu or ["rv64", "max"]:
            out[cpu] = run_qemu(a.kut, cpu, work)
            for name, _flat, _args in RUNS:
                res = out[cpu][name]
                groups = {g: v for g, v in res.items() if not g.startswith("_")}
                print(f"qemu -cpu {cpu} {name}: status {res['_status']}, exit {res['_exit']}, "
                      f"{groups}")
                for line in res["_failures"]:
                    print(f"    {line}")
    path = os.path.join(a.kut, BASELINE)
    with open(path, "w") as f:
        json.dump({"env": ENV, "smp": SMP, "mem": MEM, "runs": RUNS, "results": out}, f,
                  indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))
    sys.exit(main())
