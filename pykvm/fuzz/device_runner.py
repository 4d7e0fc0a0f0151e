"""Running one device case of ``python -m pykvm.fuzz --devices`` (:func:`run_case`): the PC
machine it describes, run under its deadline, and the verdict — its outcome, and a finding when
the guest ended the machine with the VMM-error status or cost the host more CPU than
:func:`cpu_bound` allows. The cases come from :mod:`pykvm.fuzz.device_generator`.
"""
import os
import resource
import struct
import time
import traceback
from typing import Dict

from .. import status
from .._host import HOST_ARCH
from ..arch.x86 import modes
from ..errors import PykvmError
from ..machine import Machine
from ..runloop import RunLoop
from ..testing.reference_loop import ReferenceLoop
from .device_generator import (CODE_BASE, CODE_STRIDE, DONE_ADDR, DONE_VALUE, EXC_VALUE,
                               HANDLER_ADDR, IDT_ADDR, WAKE_ADDR, WAKE_VALUE, assemble,
                               handler_bytes, idt_bytes)

# ---- the host-CPU bound ---------------------------------------------------------------------
# A case's VMM CPU time is the worker's user CPU time over Machine.run() minus the time it spent
# in guest mode (/proc/self/stat guest_time: on a VMX/SVM host guest time is counted as user
# time; under kvm_pvm guest execution is system time). The device models are Python: their work
# is user time. It must stay under
#   CPU_FIXED_S + CPU_PER_ACCESS_S * (exits + items of string instructions)
#     + CPU_TIMER_SHARE * min(run time, deadline + 50 ms)
# i.e. on average 2 ms of host CPU per guest access, plus a fixed 50 ms (thread start-up, the
# first exit of each kind) and half a core for device timers (an RTC at 8 kHz) while the guest
# may run. VMM work done in the kernel on the VMM's behalf (system calls, page faults of DMA)
# cannot be told from guest execution here; it is held to a second, looser bound: all CPU time
# (user + system) under the first bound plus one core per vCPU while the guest may run.
CPU_FIXED_S = 0.05
CPU_PER_ACCESS_S = 0.002
CPU_TIMER_SHARE = 0.5

# Reasons a device case ends that are not findings, as :func:`run_case` names them: the
# RunResult's exit ("debug_exit", "timeout", "SHUTDOWN", an unhandled exit ...), or "done"
# (vCPU 0 finished its operations), "guest_exception" (the guest took an exception),
# "s3_resumed", "reset", "poweroff", or a PykvmError class name raised setting the case up.


def supported() -> bool:
    """Whether this host runs device cases: they are x86 PC machines (the RISC-V platform's
    devices are exercised by the tests inside ``python -m pykvm.lab riscv``)."""
    return HOST_ARCH == "x86_64"


def _guest_ticks() -> int:
    """guest_time of this process (/proc/self/stat field 43, clock ticks)."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[40])
    except (OSError, ValueError, IndexError):
        return 0


def _cpu_times():
    """(user CPU seconds less the time in guest mode, user + system CPU seconds) of this
    process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime - _guest_ticks() / os.sysconf("SC_CLK_TCK"), ru.ru_utime + ru.ru_stime


def cpu_bound(exits: int, items: int, seconds: float, deadline: float) -> float:
    """The most VMM (user) CPU seconds a case may use (see :data:`CPU_PER_ACCESS_S`)."""
    return CPU_FIXED_S + CPU_PER_ACCESS_S * (exits + items) + \
        CPU_TIMER_SHARE * min(seconds, deadline + 0.05)


def total_cpu_bound(exits: int, items: int, seconds: float, deadline: float,
                    vcpus: int) -> float:
    """The most user + system CPU seconds a case may use: :func:`cpu_bound` plus one core per
    vCPU while the guest may run."""
    return cpu_bound(exits, items, seconds, deadline) + vcpus * min(seconds, deadline + 0.05)


def _error_detail(e: BaseException) -> str:
    """``e`` with its traceback, as a finding's detail."""
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


def run_case(kvm, case: dict, inject=()) -> dict:
    """Run device ``case`` on ``kvm`` (an open :class:`pykvm.Kvm`). Returns {"outcome", "stops"
    (exit counts), "cpu" (VMM CPU seconds), "cpu_bound", "exits", "seconds"} and, for a
    finding, "finding" = {"kind": "vmm_error" | "cpu", "detail"}. Exceptions that are not
    :class:`~pykvm.errors.PykvmError` propagate (the caller records them as findings).

    ``inject`` (test hooks): "vmmerror" makes an exit handler raise (the run must end as a VMM
    error), "cpu" makes the first port or MMIO exit burn 0.4 s of host CPU.

    ``case["native"]`` picks the run loop: pykvm's C loop (:class:`~pykvm.runloop.RunLoop`), else
    the Python reference loop (:class:`~pykvm.testing.reference_loop.ReferenceLoop`)."""
    res: Dict[str, object] = {"outcome": None, "stops": {}}
    image = assemble(case)
    nv = len(case["vcpus"])
    bits = 64 if case["mode"] == "long" else 32
    try:
        m = Machine(image, mem_size=case["ram"], vcpus=nv, kvm=kvm, machine="pc",
                    devices=tuple(case["devices"]), flat_addr=CODE_BASE, flat_mode=case["mode"],
                    loop=RunLoop if case["native"] else ReferenceLoop, console_limit=1 << 16)
    except PykvmError as e:
        res["outcome"] = type(e).__name__
        res["detail"] = str(e)[:200]
        return res
    try:
        mem = m.memory
        for gpa, data in case["blobs"]:
            mem.write(gpa, data)
        mem.write(HANDLER_ADDR, handler_bytes(bits))
        mem.write(DONE_ADDR, bytes(16))
        mem.write(WAKE_ADDR, bytes([0xB0, WAKE_VALUE, 0xE6, 0xF4, 0xFA, 0xF4, 0xEB, 0xFD]))
        if case["idt"]:
            mem.write(IDT_ADDR, idt_bytes(bits))
        lay = m.platform.boot_layout
        for i, v in enumerate(m.vcpus):
            if i:                            # APs start at their code, as if after INIT/SIPI
                if bits == 64:
                    modes.setup_long_mode(v, mem, CODE_BASE + i * CODE_STRIDE, vcpu_index=i,
                                         write_tables=False, layout=lay)
                else:
                    modes.setup_protected_mode(v, mem, CODE_BASE + i * CODE_STRIDE,
                                              vcpu_index=i, layout=lay)
                v.set_mp_state("RUNNABLE")
            if case["idt"]:
                s = v.get_sregs()
                s.idt.base, s.idt.limit = IDT_ADDR, (16 if bits == 64 else 8) * 256 - 1
                v.set_sregs(s)
        _set_waking_vector(m, case)
        if "vmmerror" in inject:
            def broken(machine, index, ex):
                raise RuntimeError("injected exit-handler failure")
            m.on("IO", broken)
            m.on("MMIO", broken)
        if "cpu" in inject:
            burnt = []

            def slow(machine, index, ex):
                if not burnt:                    # 0.4 s of host CPU for one guest access
                    burnt.append(1)
                    t = time.thread_time() + 0.4
                    while time.thread_time() < t:
                        sum(range(20000))        # user time, few system calls
                machine.platform.handle_exit(index, ex)
            m.on("IO", slow)
            m.on("MMIO", slow)
        (u0, a0), t0 = _cpu_times(), time.monotonic()
        r = m.run(timeout=case["deadline"])
        (u1, a1), seconds = _cpu_times(), time.monotonic() - t0
        cpu, cpu_all = u1 - u0, a1 - a0
        pc = m.platform                      # the pc machine: its power and timer state
        power, sleeps = pc.power_event, pc.sleeps
        timer_failures, timer_trace = pc.scheduler.failures, pc.scheduler.last_failure
    finally:
        m.close()
    exits = sum(r.exits.values())
    res.update(stops=dict(r.exits), exits=exits, cpu=round(cpu, 6), cpu_all=round(cpu_all, 6),
               seconds=seconds, exit_code=r.exit_code)
    items = case.get("items", 0)
    bound = cpu_bound(exits, items, seconds, case["deadline"])
    bound_all = total_cpu_bound(exits, items, seconds, case["deadline"], nv)
    res["cpu_bound"], res["cpu_all_bound"] = round(bound, 6), round(bound_all, 6)
    outcome = r.exit
    if r.exit == "debug_exit":
        outcome = {EXC_VALUE: "guest_exception", WAKE_VALUE: "s3_resumed",
                   DONE_VALUE: "done"}.get(r.debug_exit_value, "debug_exit")
    elif power in ("reset", "poweroff") and r.exit_code != status.VMM_ERROR:
        outcome = power
    res["outcome"] = outcome
    if sleeps:
        res["detail"] = f"after {sleeps} S3 sleep(s)"
    if r.exit_code == status.VMM_ERROR or r.exit in ("vmm_error", "handler_error"):
        detail = f"{r.exit} (status {r.exit_code}): {r.detail}\n"
        if r.error is not None:
            detail += _error_detail(r.error)
        res["finding"] = {"kind": "vmm_error", "detail": detail}
    elif timer_failures:
        res["finding"] = {"kind": "exception", "detail":
                          f"{timer_failures} device timer callback(s) raised; the latest:\n"
                          f"{timer_trace}"}
    elif cpu > bound or cpu_all > bound_all:
        res["finding"] = {"kind": "cpu", "detail":
                          f"the VMM used {cpu * 1000:.1f} ms of user CPU (bound "
                          f"{bound * 1000:.1f} ms: {CPU_PER_ACCESS_S * 1000:g} ms per access) "
                          f"and {cpu_all * 1000:.1f} ms in all (bound {bound_all * 1000:.1f} ms) "
                          f"for {exits} exits and {items} string items in "
                          f"{seconds * 1000:.1f} ms on {nv} vCPU(s); exits: {dict(r.exits)}"}
    return res


def _set_waking_vector(m, case: dict) -> None:
    """Point the FACS waking vector (real mode) or X waking vector (32-bit) at WAKE_ADDR, so an
    S3 resume ends the case visibly."""
    facs = m.platform.tables.addr["FACS"]
    if case.get("wake_x"):
        m.memory.write(facs + 24, struct.pack("<Q", WAKE_ADDR))     # X_Firmware_Waking_Vector
    else:
        m.memory.write(facs + 12, struct.pack("<I", WAKE_ADDR))     # Firmware_Waking_Vector
