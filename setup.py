"""Build hooks.

* cffi compiles the C run loop (csrc/) into pykvm._native and the raw-C contender of
  ``pykvm bench`` (csrc/rawbench.c) into pykvm._rawbench, a module of its own.
* build_py builds the built-in guests from guests/ with the host toolchain
  (``make -C guests``) into ``pykvm/guests_bin/<x86|riscv>/`` and copies the guest runtime
  (header, start-up code, helpers, linker scripts) into ``pykvm/guest_runtime/``, so a wheel, and
  a wheel built from the sdist, can run its guests and build users' own
  (``pykvm guest build``); it copies tests/selftests and tests/x86 into
  ``pykvm/kselftest_src/`` for ``pykvm kselftest-install``. RISC-V guests are included when
  riscv64-linux-gnu-gcc is on PATH (or the host is riscv64). ``PYKVM_BUILD_GUESTS=0`` builds a
  wheel without guests.

Editable installs (``pip install -e .``) skip both: a checkout finds its runtime in guests/ and
builds its guests into build/guests (see pykvm/guests.py and .ci/setup).
"""
import os
import platform
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
GUESTS = os.path.join(HERE, "guests")
# Keep in step with pykvm/guestbuild.py RUNTIME_PARTS (tests/unit/test_guestbuild.py checks).
RUNTIME_PARTS = ("include", "common", "x86/rt16", "x86/rt32", "x86/rt64", "x86/svm", "riscv/rt")
# single files of the runtime: its README, and the x86 helpers guests include by name (the PC's
# ports and PCI, the virtio drivers)
RUNTIME_FILES = ("README.md", "x86/pc.h", "x86/pvclock.h", "x86/virtio.h")
# test directories a wheel carries for `pykvm kselftest-install` (pykvm/testing/kselftest.py
# COLLECTIONS; tests/hw/test_kselftest_install.py checks)
KSELFTEST_PARTS = ("selftests", "x86")


def _say(msg):
    print(f"pykvm build: {msg}", flush=True)


class build_py(_build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        self._copy_kselftests(os.path.join(self.build_lib, "pykvm", "kselftest_src"))
        if os.environ.get("PYKVM_BUILD_GUESTS", "1") == "0":
            _say("PYKVM_BUILD_GUESTS=0: no built-in guests and no guest runtime in this build")
            return
        if not os.path.isfile(os.path.join(GUESTS, "Makefile")):
            raise SystemExit(f"pykvm build: {GUESTS}/Makefile is missing (an incomplete sdist?)")
        pkg = os.path.join(self.build_lib, "pykvm")
        self._copy_runtime(os.path.join(pkg, "guest_runtime"))
        self._build_guests(os.path.join(pkg, "guests_bin"))

    def _copy_runtime(self, dst):
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        for part in RUNTIME_PARTS:
            shutil.copytree(os.path.join(GUESTS, part), os.path.join(dst, part),
                            ignore=shutil.ignore_patterns("*.o", "*.d", "__pycache__"))
        for name in RUNTIME_FILES:
            os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
            shutil.copy2(os.path.join(GUESTS, name), os.path.join(dst, name))

    def _copy_kselftests(self, dst):
        # the test files `pykvm kselftest-install` installs (pykvm/testing/kselftest.py)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        for part in KSELFTEST_PARTS:
            if not os.path.isdir(os.path.join(HERE, "tests", part)):
                raise SystemExit(f"pykvm build: tests/{part} is missing (an incomplete sdist?)")
            shutil.copytree(os.path.join(HERE, "tests", part), os.path.join(dst, part),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.o"))

    def _build_guests(self, dst):
        tmp = os.path.join(self.get_finalized_command("build").build_temp, "guests")
        host = platform.machine()
        cmd = ["make", "-s", "-C", GUESTS, f"OUT={os.path.abspath(tmp)}", f"-j{os.cpu_count() or 1}"]
        if host == "riscv64":
            cc = "riscv64-linux-gnu-gcc" if shutil.which("riscv64-linux-gnu-gcc") else "gcc"
            cmd += ["riscv-guests", f"RISCV_CC={cc}"]
        elif host not in ("x86_64", "amd64"):
            _say(f"no built-in guests for a {host} host (pykvm runs x86_64 and riscv64 guests)")
            return
        elif not shutil.which("riscv64-linux-gnu-gcc"):
            _say("riscv64-linux-gnu-gcc not found: this wheel carries no RISC-V guests "
                 "(install gcc-riscv64-linux-gnu to include them)")
        for tool in ("make", "gcc", "ld", "objcopy"):
            if not shutil.which(tool):
                raise SystemExit(f"pykvm build: building the built-in guests needs {tool!r} on "
                                 "PATH (Debian/Ubuntu: apt-get install make gcc binutils); "
                                 "PYKVM_BUILD_GUESTS=0 builds a wheel without them")
        _say(" ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"pykvm build: building the guests failed:\n{r.stdout}{r.stderr}")
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        n = 0
        for sub in ("x86", "riscv"):
            src = os.path.join(tmp, sub)
            if not os.path.isdir(src):
                continue
            os.makedirs(os.path.join(dst, sub))
            for f in sorted(os.listdir(src)):
                if f.endswith((".elf", ".bin")):
                    shutil.copy2(os.path.join(src, f), os.path.join(dst, sub, f))
                    n += 1
                    # its source beside it: `pykvm guests` shows its leading comment
                    c = os.path.join(GUESTS, sub, f.rsplit(".", 1)[0] + ".c")
                    if os.path.isfile(c) and not os.path.exists(os.path.join(dst, sub,
                                                                             os.path.basename(c))):
                        shutil.copy2(c, os.path.join(dst, sub, os.path.basename(c)))
        _say(f"{n} built-in guest images in {dst}")


setup(cffi_modules=["csrc/build_native.py:ffibuilder", "csrc/build_rawbench.py:ffibuilder"],
      cmdclass={"build_py": build_py})
