"""Host-side: run each lab (``python -m pykvm.lab <lab>``) and check what its inner pytest reported.

Each lab boots a Debian kernel in QEMU and runs pytest there on real (in-lab) KVM; the results come
back as ``build/lab/<lab>.xml``.  These tests fail on any inner failure/error, on a lab that cannot be
built or booted, and when an expected inner test did not run.  They skip only when the host cannot
possibly build a lab: no Debian mirror reachable and nothing cached.

A lab takes minutes, so its progress lines (one per stage: downloads, base image, payload, each QEMU
boot's firmware / kernel / KVM / pytest stages and counts) go to the terminal as they come, past
pytest's output capture, instead of minutes of silence.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "lab"
CACHE = Path(os.environ.get("PYKVM_LAB_CACHE", "~/.cache/pykvm/lab")).expanduser()

pytestmark = pytest.mark.lab_boot

# inner tests that must have run (and passed) in each lab, per run name
SMOKE = ["test_dev_kvm_api_version", "test_create_vm", "test_arch", "test_guest_python", "test_kvm_module_loaded"]
RISCV = ["test_reg_list_fully_decoded", "test_new_isa_extensions_on_this_cpu_model",
         "test_disable_before_first_run", "test_change_after_first_run_is_busy",
         "test_min_cpu_type_is_exactly_rv64imafdc", "test_system_suspend_waits_and_resumes",
         "test_system_suspend_ends_early_on_wake", "test_dbcn_console_reaches_host", "test_dbcn_console_is_served_in_c",
         "test_srst_shutdown_is_a_system_event", "test_failing_guest_assertion_has_file_and_line",
         "test_zabha_in_the_guest", "test_caps_json_has_riscv_section",
         "test_extension_kvm_cannot_disable_is_not_allowed",
         "test_pykvm_run_boots_the_default_riscv_guest", "test_regs_command_lists_named_registers",
         # a Linux guest (tests/riscv/test_linux.py): /init, SBI suspend/resume, SRST, cpu types
         "test_linux_boots_to_init_suspends_resumes_and_powers_off",
         # snapshots restored in another process (tests/riscv/test_snapshot_riscv.py)
         "test_restored_in_another_process_the_guest_continues_identically",
         "test_one_reg_state_reads_back_as_saved", "test_a_corrupted_snapshot_is_refused",
         # Machine.checkpoint()/reset() on RISC-V (tests/riscv/test_snapshot_riscv.py)
         "test_reset_to_a_checkpoint_taken_mid_run_repeats_exactly"]
# device models with a Linux guest: the first CPU model's boot only (LabSpec.once_tests)
RISCV_ONCE = [
         # --cpu-type min with Linux (tests/riscv/test_linux.py)
         "test_linux_with_cpu_type_min_has_only_the_base_isa",
         # virtio-mmio with Linux (tests/riscv/test_virtio_riscv.py): blk root, rng, console
         "test_virtio_blk_root_mounted_from_vda", "test_virtio_blk_data_survives_reboot",
         "test_virtio_rng_hwrng_readable", "test_virtio_without_aia_is_one_line",
         "test_virtio_console_serial_interactive",
         # virtio-net with a Linux guest (tests/riscv/test_linux_net_riscv.py): passt and tap
         "test_virtio_net_user_mode_fetches_a_host_page_riscv",
         "test_virtio_net_tap_in_a_namespace_ping_and_http_riscv",
         # virtio-fs with a Linux guest (tests/riscv/test_linux_share_riscv.py)
         "test_virtio_fs_share_rw_ro_and_no_escape",
         # vsock and the control verbs (tests/riscv/test_linux_vsock_control_riscv.py)
         "test_linux_vsock_host_connects_to_guest_echo_riscv",
         "test_linux_vsock_guest_connects_to_host_riscv",
         "test_linux_control_list_pause_resume_stat_dump_stop_riscv",
         # pykvm sandbox (tests/riscv/test_linux_sandbox_riscv.py)
         "test_sandbox_runs_the_command_in_the_riscv_guest_over_an_overlay",
         # the gdb stub with the lab's riscv64 gdb (tests/riscv/test_gdb_riscv.py)
         "test_gdb_version_runs_in_the_lab", "test_gdb_breaks_steps_reads_writes_and_continues",
         "test_gdb_target_without_a_debugger_takes_its_own_ebreaks",
         "test_raw_client_on_a_unix_socket_registers_and_garbage",
         "test_ctrl_c_stops_a_guest_waiting_in_wfi",
         # a Linux guest snapshotted at its shell (tests/riscv/test_snapshot_riscv.py)
         "test_linux_at_its_shell_continues_in_another_process",
         # pause holds the guest's time still (tests/riscv/test_pause_riscv.py)
         "test_the_guests_time_stands_still_while_paused"]
# the nested-SVM suite (tests/nested/test_svm_tlb.py, docs/nested.md)
SVM_SUITE = ["test_tlb_control_honoured_on_next_vmrun", "test_invlpga_invalidates_that_asids_translation",
             "test_invlpga_after_l2_rewrites_its_own_pte",
             "test_l2_guests_multiplexed_on_one_vcpu", "test_vcpus_with_same_l2_asids_moved_between_cpus",
             "test_overcommitted_cpus_keep_l2_translations", "test_overcommit_under_memory_pressure",
             "test_nested_state_restore_keeps_l2_asid_behaviour", "test_flushes_per_round_trip"]
NESTED = ["test_caps_nested_verdict", "test_machine_cpuid_passes_svm_through",
          "test_set_nested_state_size_below_header", "test_set_nested_state_bad_format",
          "test_set_nested_state_guest_mode_needs_svme", "test_set_nested_state_header_only_gif",
          "test_l2_port_io_reaches_host_and_l1_sees_vmmcall_hlt",
          "test_l2_io_exit_has_guest_mode_flag_l1_exit_has_not",
          "test_nested_state_at_l2_io_exit_restores_into_fresh_vm",
          "test_asid_change_l2_sees_l1_writes", "test_round_trip_rate",
          "test_linux_bzimage_boots_to_init_and_powers_off",     # tests/nested/test_linux.py
          # virtio-net with a Linux guest (tests/nested/test_linux_net.py): passt and tap
          "test_virtio_net_user_mode_fetches_a_host_page",
          "test_virtio_net_tap_in_a_namespace_ping_and_http",
          # virtio-fs with a Linux guest (tests/nested/test_linux_share.py)
          "test_virtio_fs_share_rw_ro_and_no_escape",
          # vsock and the control verbs (tests/nested/test_linux_vsock_control.py)
          "test_linux_vsock_host_connects_to_guest_echo",
          "test_linux_vsock_guest_connects_to_host",
          "test_linux_control_list_pause_resume_stat_dump_stop",
          # pykvm sandbox (tests/nested/test_linux_sandbox.py)
          "test_sandbox_runs_the_command_in_the_guest_over_an_overlay",
          "test_sandbox_rw_writes_reach_the_host"]
# in the nested lab's main boot only (not in nested-rebuilt, which runs two files): an L1 guest
# snapshotted with its nested state while L2 runs (tests/nested/test_snapshot_nested.py)
NESTED_ONLY = ["test_l1_with_l2_running_restores_in_another_process",
               # the gdb stub's hardware-only x86 paths with bookworm's gdb on real (nested) SVM
               # (tests/nested/test_gdb_nested.py): planted and guest int3, hbreak and watch, each
               # asserting the path that ran (QEMU 7.2's SVM: no #BP intercept, DR0-DR3 inert,
               # watch emulated on SVM single-step)
               "test_gdb_13_runs_in_the_nested_lab", "test_planted_int3_reaches_kvm_or_the_guest",
               "test_hbreak_follows_the_instruction_breakpoint_probe",
               "test_watch_follows_the_data_breakpoint_probe",
               "test_the_guests_own_int3_ends_its_run_as_without_gdb"]
EXPECTED = {"riscv": {"riscv-rv64": SMOKE + RISCV + RISCV_ONCE, "riscv-max": SMOKE + RISCV,
                      # the boot that carries the lab's QEMU (pykvm/lab/build.py, qemu_tests)
                      "riscv-rv64-qemu": ["test_virtio_blk_throughput_against_qemu_on_riscv",
                                          # tests/riscv/test_net_fs_bench_riscv.py
                                          "test_virtio_net_and_fs_throughput_against_qemu_on_riscv"]},
            "nested": {"nested": SMOKE + NESTED + NESTED_ONLY,
                       # two L1 CPUs on one TCG thread (LabSpec.two_cpu_tests)
                       "nested-smp2": SVM_SUITE,
                       "nested-qemu": ["test_virtio_blk_throughput_against_qemu",
                                       # tests/nested/test_net_fs_bench_nested.py
                                       "test_virtio_net_and_fs_throughput_against_qemu"]}}
# KVM modules rebuilt from Debian's source (python -m pykvm.lab.kmod), unmodified, loaded with
# --modules and run under a two-value module-parameter matrix: the SVM tests must pass in each
# combination, as with Debian's own modules
REBUILT_DIR, REBUILT_OUT = OUT / "kvm-rebuilt", OUT / "rebuilt"
REBUILT_TESTS = ["tests/nested/test_nested.py", "tests/nested/test_svm_tlb.py"]
REBUILT_PARAM = "kvm_amd.npt=0,1"
REBUILT_COMBOS = ["kvm_amd.npt=0", "kvm_amd.npt=1"]
EXPECTED["nested-rebuilt"] = {"nested": [n for n in NESTED if not n.startswith(
                                  ("test_linux", "test_virtio", "test_sandbox"))],
                              "nested-smp2": SVM_SUITE}
# what each entry runs, in order (python -m ...), and the JUnit file its checks read
COMMANDS = {"riscv": [["pykvm.lab", "riscv"]], "nested": [["pykvm.lab", "nested"]],
            "nested-rebuilt": [["pykvm.lab.kmod", "--out", str(REBUILT_DIR)],
                               ["pykvm.lab", "nested", "--out", str(REBUILT_OUT), "--modules",
                                str(REBUILT_DIR), "--param", REBUILT_PARAM, *REBUILT_TESTS]]}
XML = {"riscv": OUT / "riscv.xml", "nested": OUT / "nested.xml",
       "nested-rebuilt": REBUILT_OUT / "nested.xml"}
SUMMARIES: list = []          # (lab, line) for the terminal summary (see conftest.py)


def _can_build() -> str | None:
    """None if a lab can be attempted, else why not."""
    sys.path.insert(0, str(ROOT))
    from pykvm.lab.debian import LabError, debian_mirror

    if (CACHE / "base").is_dir() and any((CACHE / "base").iterdir()):
        return None
    try:
        mirror = debian_mirror()
    except LabError as e:
        return f"no Debian mirror configured and no lab cache in {CACHE}: {e}"
    try:
        urllib.request.urlopen(f"{mirror}/dists/bookworm/Release", timeout=15).close()
    except OSError as e:
        return f"Debian mirror {mirror} unreachable ({e}) and no lab cache in {CACHE}"
    return None


def _cases(xml: Path) -> list[tuple[str, str, str]]:
    """(run, test name, outcome) for every inner testcase."""
    out = []
    for suite in ET.parse(xml).getroot().iter("testsuite"):
        run = suite.get("hostname", "")
        for tc in suite.iter("testcase"):
            name = tc.get("name", "")
            if name.endswith(f"[{run}]"):  # several runs (CPU models) merged into one file
                name = name[: -len(f"[{run}]")]
            outcome = "passed"
            for kind in ("failure", "error", "skipped"):
                el = tc.find(kind)
                if el is not None:
                    outcome = f"{kind}: {el.get('message') or ''}"
                    break
            out.append((run, f"{tc.get('classname')}::{name}", outcome))
    return out


def _terminal(config):
    """A function that writes one line to the terminal now, whatever pytest captures."""
    tr = config.pluginmanager.getplugin("terminalreporter")
    cap = config.pluginmanager.getplugin("capturemanager")

    def say(line: str) -> None:
        if tr is None:  # e.g. -p no:terminal
            print(line, file=sys.__stderr__, flush=True)
            return
        off = getattr(cap, "global_and_fixture_disabled", None)
        with off() if off else contextlib.nullcontext():
            tr.write_line(line)
            tr.flush()

    return say


def _background() -> None:
    """In the lab's child before exec: nice 10, so that the lab (QEMU's TCG threads) takes the
    CPU the rest of the suite leaves idle instead of stretching its timing-sensitive tests
    (the fuzzers' hang and CPU limits)."""
    os.nice(10)


class LabRun:
    """A lab entry's commands (``python -m pykvm.lab <lab>``, or a chain such as rebuilding the
    KVM modules and then a lab run that loads them) running in the background, one after the
    other, from the start: their output lines are kept as they come, and :meth:`follow` passes them
    (those so far, then the rest as they come) to a ``say`` and returns (status, output): the first
    non-zero status, after which the chain stops. Each command runs in its own process group: after
    ``timeout`` seconds for the whole chain, or on :meth:`stop`, it gets SIGINT (a lab then stops
    QEMU and cleans up), and SIGKILL if it has not ended 30 s later. The entry's JUnit file of an
    earlier run is removed first."""

    # the whole chain's limit: above the riscv lab's slowest run that finished (1613 s at half
    # speed, 2026-12-07, its rv64 boot then stopped by the 1200 s it had) plus that boot's
    # longer guard; the CI job's own limit is 90 minutes
    def __init__(self, lab: str, timeout: float = 3000):
        self.lab, self.timeout = lab, timeout
        if XML[lab].exists():
            XML[lab].unlink()
        self.lines: list[str] = []
        self.done = False
        self.returncode: int | None = None
        self.cond = threading.Condition()
        self.expired = threading.Event()
        self.stopping = False
        self.p: subprocess.Popen | None = None
        self.timer = threading.Timer(timeout, self._expire)
        self.timer.daemon = True
        self.timer.start()
        threading.Thread(target=self._chain, name=f"lab-{lab}", daemon=True).start()

    def _chain(self) -> None:
        rc = 0
        for args in COMMANDS[self.lab]:
            with self.cond:
                if self.stopping:
                    break
                # each boot's own limit (pykvm/lab/build.py: LabSpec.timeout, qemu_timeout)
                self.p = p = subprocess.Popen(
                    [sys.executable, "-m", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    start_new_session=True, preexec_fn=_background,
                    env={**os.environ, "PYKVM_LAB_PROGRESS": "plain"})
                self.lines.append(f"$ python -m {' '.join(args)}")
                self.cond.notify_all()
            for line in p.stdout:  # type: ignore[union-attr]
                with self.cond:
                    self.lines.append(line.rstrip("\n"))
                    self.cond.notify_all()
            rc = p.wait()
            if rc != 0:
                break
        with self.cond:
            self.returncode = rc
            self.done = True
            self.cond.notify_all()

    def _finished(self) -> bool:
        return self.done

    def _expire(self) -> None:
        self.expired.set()
        self._interrupt()

    def _interrupt(self) -> "subprocess.Popen | None":
        """No more commands; SIGINT to the running one's process group. Returns that process."""
        with self.cond:
            self.stopping = True
            p = self.p
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGINT)
        return p

    def follow(self, say) -> tuple[int, str]:
        shown = 0
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda n=shown: self.done or len(self.lines) > n)
                    new, finished = self.lines[shown:], self.done
                for line in new:
                    say(f"  {self.lab} | {line}")
                shown += len(new)
                if finished and shown == len(self.lines):
                    break
        finally:
            self.stop()
        lines = list(self.lines)
        if self.expired.is_set():
            lines.append(f"(test: lab {self.lab} stopped after {self.timeout:.0f} s)")
        return self.returncode if self.returncode is not None else -1, "\n".join(lines)

    def stop(self) -> None:
        """Stop the chain if it still runs (SIGINT, then SIGKILL 30 s later). Idempotent."""
        self.timer.cancel()
        p = self._interrupt()
        if p is not None and p.poll() is None:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        with self.cond:                     # the reader ends with the process
            self.cond.wait_for(self._finished, timeout=35)


# labs started when collection ended (tests/lab/conftest.py), so that they run beside the rest of
# the suite, whose lab tests then come last and follow them
STARTED: dict[str, LabRun] = {}


def start_labs(labs) -> None:
    """Start each of ``labs`` in the background now, unless a lab cannot be built here."""
    if _can_build() is not None:
        return
    for lab in labs:
        if lab not in STARTED:
            STARTED[lab] = LabRun(lab)


def stop_labs() -> None:
    for run in STARTED.values():
        run.stop()


def _run_lab(lab: str, say) -> tuple[int, str]:
    """The lab's (status, output): the run started at collection's end, else one started now."""
    run = STARTED.get(lab) or STARTED.setdefault(lab, LabRun(lab))
    return run.follow(say)


@pytest.mark.parametrize("lab", ["riscv", "nested", "nested-rebuilt"])
def test_lab(lab, pytestconfig):
    why = _can_build()
    if why:
        pytest.skip(why)
    xml = XML[lab]
    say = _terminal(pytestconfig)
    say(f"lab {lab}: " + " && ".join(f"python -m {' '.join(c)}" for c in COMMANDS[lab]) +
        " (progress as it comes)")
    returncode, output = _run_lab(lab, say)
    tail = "\n".join(output.strip().splitlines()[-25:])
    assert xml.exists(), f"lab {lab} wrote no {xml} (exit {returncode}):\n{tail}"
    cases = _cases(xml)
    table = "\n".join(f"  [{run}] {name}: {outcome[:200]}" for run, name, outcome in cases)
    print(f"inner tests of lab {lab}:\n{table}")
    for suite in ET.parse(xml).getroot().iter("testsuite"):      # figures the inner tests recorded
        props = {p.get("name"): p.get("value") for p in suite.iter("property")}
        combo = props.get("lab_combination")                    # a matrix boot's combination
        where = suite.get("hostname", "") + (f"[{combo}]" if combo else "")
        for prop in suite.iter("property"):
            if not (prop.get("name") or "").startswith("lab_"):     # the matrix's own labels
                SUMMARIES.append((lab, f"{where}: {prop.get('name')} = {prop.get('value')}"))
    for run in sorted({c[0] for c in cases}):
        mine = [c for c in cases if c[0] == run]
        counts = {k: sum(1 for c in mine if c[2].startswith(k)) for k in
                  ("passed", "failure", "error", "skipped")}
        SUMMARIES.append((lab, f"{run}: {counts['passed']} passed, {counts['failure']} failed, "
                               f"{counts['error']} errors, {counts['skipped']} skipped "
                               f"(inner pytest; JUnit {xml})"))
    bad = [c for c in cases if c[2].startswith(("failure", "error"))]
    if bad:     # the failures last, whole (to 3000 characters): what a log's tail shows first
        failed = "\n".join(f"  [{run}] {name}: {outcome[:3000]}" for run, name, outcome in bad)
        pytest.fail(f"lab {lab}: {len(bad)} inner failures/errors:\n{table}\n{tail}\n"
                    f"lab {lab}, the inner failures/errors:\n{failed}", pytrace=False)
    for run, names in EXPECTED[lab].items():
        for n in names:
            hit = [c for c in cases if c[0] == run and
                   (c[1].endswith("::" + n) or f"::{n}[" in c[1])]       # parametrized too
            assert hit and all(c[2] == "passed" for c in hit), \
                f"lab {lab}: inner {n} did not pass in {run}:\n{table}"
            if lab == "nested-rebuilt":                # and in every combination of the matrix
                for combo in REBUILT_COMBOS:
                    assert any(c[1].endswith(f"[{combo}]") for c in hit), \
                        f"lab {lab}: inner {n} did not run with {combo}:\n{table}"
    assert returncode == 0, f"lab {lab} exited {returncode}:\n{tail}"
