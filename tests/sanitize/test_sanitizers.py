"""The C helper under AddressSanitizer and UndefinedBehaviorSanitizer.

csrc/build_sanitized.py compiles the current csrc/ afresh with ``-fsanitize=address,undefined``
into build/asan/ (the normal pykvm/_native.abi3.so is never touched) and gives the environment
that makes ``pykvm._native`` resolve to that build in every Python process started with it. Here:

* the toolchain and the runtime wiring catch a heap overflow and undefined behaviour in a
  small library of our own (so a clean run below means something);
* the sanitized helper itself reports a console buffer overflow that we provoke on purpose;
* the hardware-test files that drive the C helper's paths (C_SIDE; those about Python-side code
  are in PLAIN_ONLY) pass against the sanitized helper with no sanitizer report from any process, and
  the child run proves it used that build
  (tests/sanitize/sanitized_checks.py).
"""
import importlib.util
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD_TIMEOUT = 900
ERROR = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:")
SUMMARY = []          # shown at the end of the host run (tests/sanitize/conftest.py)
# The hardware-test files the sanitized rerun runs: each drives a path of the C helper
# (csrc/: the run loop and its kicks, the Python exit-handler call, the C 16550 and its input,
# the virtio-mmio interrupt helper, the virtio-blk data path, shared mappings) and together they
# reach every one of them, hostile guests and fuzzers included.
C_SIDE = ["tests/x86/test_core.py", "tests/x86/test_exit_fast_path.py",
          "tests/x86/test_dispatch.py", "tests/x86/test_run_again.py", "tests/x86/test_hostile.py",
          "tests/x86/test_robustness.py", "tests/x86/test_lifecycle_stress.py",
          "tests/x86/test_guest_faults.py", "tests/x86/test_emulation_failure.py",
          "tests/x86/test_host_limits.py", "tests/x86/test_shared_ram.py",
          "tests/x86/test_serial_input.py", "tests/x86/test_uart_loopback.py",
          "tests/x86/test_uart_widths.py", "tests/x86/test_uart_mmio.py",
          "tests/x86/test_uart_one_model.py", "tests/x86/test_virtio_mmio.py",
          "tests/x86/test_virtio_blk_fastpath.py", "tests/x86/test_virtio_pci_guest.py",
          "tests/x86/test_pc_devices.py", "tests/x86/test_framework.py",
          "tests/hw/test_fuzz.py", "tests/hw/test_fuzz_devices.py",
          "tests/hw/test_control_socket.py", "tests/hw/test_machine_options.py",
          "tests/hw/test_device_errors.py", "tests/hw/test_builtin_guests.py",
          "tests/hw/test_reset.py",     # csrc/rewind.c: the reset's copy-back and ioctls
          "tests/hw/test_pause_kvmclock.py"]   # the run loop's kicks around each pause
# The files left to the plain run: their subject is Python code (command-line parsing and its
# limits, image loaders, ioctl wrappers and their structs, the pc machine's device models, the
# guest build, the kselftest install). They reach the C helper only through the run loop and
# the exit-handler call that the files above drive too, and many start Python processes, which
# ASan makes several times slower. A new hardware-test file must be put in one of the two lists
# (test_every_hardware_test_file_is_placed).
PLAIN_ONLY = ["tests/hw/test_reset_fixture.py", "tests/hw/test_gdb.py", "tests/hw/test_snapshot.py",
              "tests/hw/test_snapshot_hostile2.py", "tests/hw/test_gdb_hostile2.py",
              "tests/hw/test_cli_limits.py", "tests/x86/test_cli_hostile.py",
              "tests/x86/test_cli_edges.py", "tests/x86/test_cli_run_options.py",
              "tests/x86/test_cli_console.py", "tests/hw/test_cli_trace_output.py",
              "tests/x86/test_image_loader_qemu_rules.py", "tests/x86/test_image_loader_qemu.py",
              "tests/x86/test_image_loader_hostile.py", "tests/x86/test_vcpu_state_ioctls.py",
              "tests/x86/test_clock_feature_msrs.py", "tests/x86/test_dirty_ring_gmem.py",
              "tests/x86/test_ioctl_table.py", "tests/hw/test_guest_build_output.py",
              "tests/hw/test_kselftest_install.py", "tests/hw/test_hold_races.py",
              "tests/x86/test_pc_acpi.py", "tests/x86/test_pc_boot.py",
              "tests/x86/test_pc_fwcfg_qemu.py", "tests/x86/test_pc_iommu.py",
              "tests/x86/test_pc_qemu_devices.py", "tests/x86/test_pc_rtc.py",
              "tests/x86/test_pc_startup.py", "tests/x86/test_pc_vtd_faults.py",
              "tests/x86/test_pc_vtd_queue.py", "tests/x86/test_uart_linux.py",
              "tests/x86/test_user_guests.py", "tests/x86/test_x86_guests.py",
              "tests/x86/test_guest_library.py", "tests/x86/test_virtio_console_guest.py",
              "tests/x86/test_virtio_net_guest.py", "tests/x86/test_virtio_vsock_guest.py"]


def _load_builder():
    spec = importlib.util.spec_from_file_location("pykvm_build_sanitized",
                                                  os.path.join(ROOT, "csrc", "build_sanitized.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


san = _load_builder()


def _errors(log_dir):
    """Report files with an error in them (ASan also writes warnings, e.g. for QEMU's
    swapcontext coroutines, which are not findings)."""
    return {k: v for k, v in san.reports(log_dir).items() if ERROR.search(v)}


def _fmt(reports):
    return "\n".join(f"==== {k}\n{v}" for k, v in reports.items())


@pytest.fixture(scope="module")
def sanitized_native():
    """The sanitized helper, compiled from the current csrc/ (once per test run)."""
    return san.build(san.DEFAULT_OUT)


SELFCHECK_C = r"""
#include <stdlib.h>
int oob_write(int n) { volatile char *p = malloc(n); p[n] = 1; free((void *)p); return n; }
int shift(int a, int b) { return a << b; }
"""


@pytest.mark.parametrize("call, expect", [
    ("oob_write(13)", r"ERROR: AddressSanitizer: heap-buffer-overflow.*WRITE of size 1.*\boob_write\b"),
    ("shift(1, 40)", r"runtime error: shift exponent 40 is too large"),
], ids=["asan-heap-overflow", "ubsan-shift"])
def test_toolchain_catches_bugs_in_a_python_loaded_library(tmp_path, call, expect):
    """Same flags, same LD_PRELOAD/options, same report files as the real run: a bug is found."""
    lib = tmp_path / "libselfcheck.so"
    src = tmp_path / "selfcheck.c"
    src.write_text(SELFCHECK_C)
    subprocess.run(["gcc", "-shared", "-fPIC"] + san.SANITIZE_CFLAGS + san.SANITIZE_LDFLAGS
                   + ["-o", str(lib), str(src)], check=True)
    logs = str(tmp_path / "reports")
    code = f"import ctypes; l = ctypes.CDLL({str(lib)!r}); print('survived', l.{call})"
    r = subprocess.run([sys.executable, "-c", code], env=san.runtime_env(None, logs),
                       capture_output=True, text=True, timeout=60)
    found = _errors(logs)
    assert r.returncode != 0 and "survived" not in r.stdout, (r.stdout, r.stderr)
    assert len(found) == 1, (r.stderr, san.reports(logs))
    assert re.search(expect, _fmt(found), re.S), _fmt(found)


PROVOKE = r"""
from pykvm import Kvm
from pykvm._native import ffi as nffi, lib as nlib
with Kvm() as kvm, kvm.create_vm() as vm:
    vm.add_memory(0, 2 << 20)
    # mov dx, 0x3f8; mov al, 'H'; 32 x out dx, al; hlt
    vm.memory.write(0x1000, bytes.fromhex("BAF803B048" + "EE" * 32 + "F4"))
    vcpu = vm.create_vcpu()
    s = vcpu.get_sregs(); s.cs.base = s.cs.selector = 0; vcpu.set_sregs(s)
    r = vcpu.get_regs(); r.rip, r.rflags = 0x1000, 2; vcpu.set_regs(r)
    buf = nffi.new("uint8_t[]", 4)                 # 4 bytes ...
    l = nffi.new("struct pykvm_loop *")
    l.vcpu_fd, l.run_size, l.run = vcpu.fd, vcpu.run_size, vcpu.run_addr
    l.console, l.console_cap = int(nffi.cast("uintptr_t", buf)), 64   # ... said to be 64
    l.serial_base = 0x3f8
    l.budget = -1                                  # no exit budget (0 would stop after one)
    print("survived", nlib.pykvm_loop_run(l), l.console_len)
"""


@pytest.mark.requires_kvm
def test_sanitized_helper_reports_an_overflow_we_provoke(sanitized_native, tmp_path):
    """The build the hardware tests use is instrumented where it matters: a console buffer that
    Python declares too large makes the C loop's console_put() write past it, and ASan says so."""
    logs = str(tmp_path / "reports")
    r = subprocess.run([sys.executable, "-c", PROVOKE], env=san.runtime_env(sanitized_native, logs),
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    found = _fmt(_errors(logs))
    assert "survived" not in r.stdout and r.returncode != 0, (r.stdout, r.stderr)
    assert re.search(r"ERROR: AddressSanitizer: heap-buffer-overflow.*WRITE.*console_put.*runloop\.c",
                     found, re.S), (r.stderr, found)


@pytest.mark.requires_kvm
@pytest.mark.timeout(CHILD_TIMEOUT + 300)   # the child's own limit, and the sanitized build
def test_hw_tests_pass_under_asan_and_ubsan(sanitized_native, tmp_path):
    """The C_SIDE hardware-test files against the sanitized helper: all pass, no process reports
    anything."""
    logs = san.DEFAULT_REPORTS
    for old in san.reports(logs):
        os.unlink(os.path.join(logs, old))
    junit = tmp_path / "child.xml"
    checks = os.path.join(ROOT, "tests", "sanitize", "sanitized_checks.py")
    cmd = [sys.executable, "-m", "pytest", *[os.path.join(ROOT, p) for p in C_SIDE], checks,
           "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={junit}",
           "--basetemp", str(tmp_path / "child"),
           # the one test this rerun leaves to the plain run: a process at a memory cgroup's
           # limit with the OOM killer off. ASan's allocator takes fresh pages where the plain
           # build reuses freed memory, so there the process itself may wait for ever
           "--deselect",
           "tests/x86/test_host_limits.py::test_guest_ram_the_host_cannot_back_is_a_vmm_error",
           # and the fuzzer's injected-findings test: it holds each case to the fuzzer's
           # per-case deadline, which ASan's several-fold slowdown on a loaded 2-core host
           # breaks now and then (a spurious "hang" finding); it exercises the Python
           # supervisor, not the C helper this rerun is for, and runs in the plain suite
           "--deselect",
           "tests/hw/test_fuzz_devices.py::test_each_injected_finding_kind_is_saved_and_replays"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=san.runtime_env(sanitized_native, logs), cwd=ROOT,
                       capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    print(f"sanitized child run: {took:.1f}s, exit {r.returncode}\n{out[-3000:]}")
    found = _errors(logs)
    last = (out.strip().splitlines() or ["(no output)"])[-1]
    SUMMARY.append(f"C-side hardware tests ({len(C_SIDE)} files) under ASan+UBSan: {last.strip('= ')} (child "
                   f"{took:.1f}s, exit {r.returncode}); sanitizer error reports: {len(found)}")
    assert not found, f"sanitizer reports:\n{_fmt(found)}"
    assert not ERROR.search(out), out[-6000:]
    assert r.returncode == 0, out[-6000:]

    cases = {(c.get("classname"), c.get("name")): c for c in ET.parse(junit).iter("testcase")}
    names = [f"{k[0]}::{k[1]}" for k in cases]
    assert not any("test_sanitizers" in n for n in names), "the child must not run this file"
    hw = [n for n in names if n.startswith(("tests.hw.", "tests.x86."))]
    assert len(hw) >= 20, names                   # it really ran the hardware tests
    for name in ("test_pykvm_uses_the_sanitized_helper", "test_python_subprocesses_use_it_too"):
        c = [v for k, v in cases.items() if k[1] == name]
        assert c and not list(c[0]), f"{name} did not pass in the child: {names}"


def test_every_hardware_test_file_is_placed():
    """Each tests/hw and tests/x86 file is in C_SIDE or PLAIN_ONLY (one of them), so a new
    file is a decision, not an omission."""
    found = sorted(f"tests/{d}/{n}" for d in ("hw", "x86")
                   for n in os.listdir(os.path.join(ROOT, "tests", d))
                   if n.startswith("test_") and n.endswith(".py"))
    placed = C_SIDE + PLAIN_ONLY
    assert len(placed) == len(set(placed)), "a file is listed twice"
    assert sorted(placed) == found, (set(found) - set(placed), set(placed) - set(found))
