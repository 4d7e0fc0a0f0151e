"""Running fuzz cases inside a worker process: :class:`CaseRunner` runs one case of either mode
in a fresh VM under its deadline and names how it ended (its *outcome*: the typed exit that
ended it, ``debug_exit``, ``deadline``, or the class name of a
:class:`~pykvm.errors.PykvmError`), or reports a *finding* (an exception that is not a
``PykvmError``); :func:`worker_main` is the worker's side of the supervisor's pipe protocol
(``python -m pykvm.fuzz --_worker``: one JSON message a line each way).
"""
import faulthandler
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from typing import Dict, List

from .. import platform, status
from ..arch.x86 import modes as cpu_modes
from ..arch.x86.regs import cpuid_for_vcpu
from ..errors import PykvmError
from ..kvm import Kvm
from ..runloop import LoopConfig, RunLoop
from ..testing.reference_loop import ReferenceLoop
from . import cases, device_runner, virtio_runner

# Exits after which the vCPU is run again (until the case's stop budget is used up).
RESUMABLE = frozenset({"IO", "MMIO", "HLT", "INTR", "IRQ_WINDOW_OPEN", "DEBUG", "X86_RDMSR",
                       "X86_WRMSR", "HYPERCALL", "NMI", "EXCEPTION", "debug_exit"})



class _Injected(Exception):
    """What the hidden --_inject raise@K option raises: not a PykvmError, so a finding."""


def _parse_inject(specs) -> Dict[int, List[str]]:
    out: Dict[int, List[str]] = {}
    for spec in specs or ():
        kind, _, at = spec.partition("@")
        out.setdefault(int(at), []).append(kind)
    return out


def _error_detail(e) -> str:
    """What a typed error was about, for the summary: the ioctl and errno of a KvmError."""
    if getattr(e, "ioctl", None):
        return f"{e.ioctl} {getattr(e, 'errno_name', '')}".strip()
    return str(e).split(":")[0][:60]


class CaseRunner:
    """Runs cases (either mode) in fresh VMs on one open :class:`~pykvm.Kvm`. ``inject``: the
    hidden --_inject hooks ("KIND@INDEX": crash, hang, raise, leakfd, leakmem, vmmerror, cpu)
    that make case INDEX produce that finding on purpose, for the tests. Each vCPU of a
    random-guest case gets the host-supported CPUID with its own APIC id
    (:func:`pykvm.arch.x86.regs.cpuid_for_vcpu`)."""

    def __init__(self, kvm, inject=()):
        self.kvm = kvm
        self.cpuid = kvm.supported_cpuid()
        self.inject = _parse_inject(inject)
        self._leaked: list = []
        self._leaking = None            # "fd"/"mem": the injected leak, once it has started
        self.background_errors: List[str] = []

    def _injections(self, index: int) -> None:
        kinds = self.inject.get(index, ())
        for k in kinds:
            if k in ("leakfd", "leakmem"):
                self._leaking = k
        if self._leaking == "leakfd":
            self._leaked.append(os.open("/dev/null", os.O_RDONLY))
        elif self._leaking == "leakmem":
            self._leaked.append(bytearray(b"\1" * (1 << 20)))
        if "crash" in kinds:
            os.kill(os.getpid(), signal.SIGSEGV)
        if "hang" in kinds:
            while True:
                time.sleep(3600)
        if "raise" in kinds:
            raise _Injected(f"injected exception at case {index}")

    def run(self, case: dict) -> dict:
        """Run ``case``; returns {"outcome", "stops", "seconds"} and, for a finding,
        "finding" = {"kind": "exception", "detail": traceback}."""
        t0 = time.perf_counter()
        res = {"outcome": None, "stops": []}
        try:
            self._injections(case["index"])
            if cases.is_virtio_case(case):
                res.update(virtio_runner.run_case(self.kvm, case))
            elif cases.is_device_case(case):
                res.update(device_runner.run_case(self.kvm, case,
                                                  inject=self.inject.get(case["index"], ())))
            else:
                with self.kvm.create_vm() as vm:
                    self._run_in_vm(vm, case, res)
        except PykvmError as e:
            res["outcome"] = type(e).__name__
            res["detail"] = _error_detail(e)
            res["error"] = str(e)[:300]
        except Exception as e:                                  # noqa: BLE001 — a finding
            res["outcome"] = f"exception:{type(e).__name__}"
            res["finding"] = {"kind": "exception", "detail": traceback.format_exc()}
        if self.background_errors and not res.get("finding"):
            # An exception in another thread (a timer, a finalizer) is a finding too; it may
            # belong to the case before this one if it fired after that case ended.
            res["outcome"] = "exception:background"
            res["finding"] = {"kind": "exception",
                              "detail": "raised outside the vCPU threads during or just before "
                                        "this case:\n" + "\n".join(self.background_errors)}
        self.background_errors.clear()
        res["seconds"] = time.perf_counter() - t0
        return res

    def install_hooks(self) -> None:
        """Collect exceptions raised in other threads and in finalizers (which Python would
        only print) so that they become findings."""
        def thread_hook(a):
            self.background_errors.append(
                f"in thread {a.thread.name if a.thread else '?'}:\n" +
                "".join(traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback)))

        def unraisable_hook(u):
            self.background_errors.append(
                f"unraisable ({u.err_msg or 'exception ignored'} in {u.object!r}):\n" +
                "".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
        threading.excepthook = thread_hook
        sys.unraisablehook = unraisable_hook

    def _run_in_vm(self, vm, case: dict, res: dict) -> None:
        vm.set_tss_addr(0xFFFBD000)
        vm.set_identity_map_addr(0xFFFBC000)
        if case["irqchip"]:
            vm.create_irqchip()
            if case["pit"]:
                vm.create_pit2()
        for s in case["slots"]:
            vm.add_memory(s["gpa"], s["size"], readonly=s["readonly"])
        mem = vm.memory
        mode = case["mode"]
        vcpus = []
        for i, spec in enumerate(case["vcpus"]):
            v = vm.create_vcpu(i)
            vcpus.append(v)
            if case["cpuid"]:
                v.set_cpuid(cpuid_for_vcpu(self.cpuid, i))
            regs = spec["regs"]
            if mode == "long":
                cpu_modes.setup_long_mode(v, mem, regs["rip"], regs["rsp"], vcpu_index=i,
                                     write_tables=(i == 0))
            elif mode == "protected":
                cpu_modes.setup_protected_mode(v, mem, regs["rip"], esp=regs["rsp"], vcpu_index=i)
            else:
                cpu_modes.setup_real_mode(v, spec["cs"], regs["rip"], sp=regs["rsp"] & 0xFFFF)
            if spec.get("idt") or spec.get("sregs"):
                s = v.get_sregs()
                if spec.get("idt"):
                    s.idt.base, s.idt.limit = spec["idt"]
                for field, value in spec.get("sregs", {}).items():
                    obj = s
                    *path, last = field.split(".")
                    for part in path:
                        obj = getattr(obj, part)
                    setattr(obj, last, value)
                v.set_sregs(s)
            r = v.get_regs()
            for name, value in regs.items():
                setattr(r, name, value)
            v.set_regs(r)
        if case["page_tables"]:
            cpu_modes.write_identity_map(mem)
        for gpa, data in case["blobs"]:
            mem.write(gpa, data)
        loop_class = RunLoop if case["native"] else ReferenceLoop
        loops = [loop_class(v, LoopConfig(serial_base=0x3F8, debugcon_port=0xE9, exit_port=0xF4))
                 for v in vcpus]              # the PC's ports: LoopConfig serves none itself

        state = {"winner": None, "results": [None] * len(vcpus)}
        lock = threading.Lock()
        deadline = time.monotonic() + case["deadline"]

        def drive(i):
            out = self._drive(loops[i], i, case, deadline, state)
            state["results"][i] = out
            with lock:
                if state["winner"] is None and out["outcome"] != "kick":
                    state["winner"] = i
                    for j, other in enumerate(loops):
                        if j != i:
                            other.kick()

        if len(vcpus) == 1:
            drive(0)
        else:
            threads = [threading.Thread(target=drive, args=(i,), name=f"fuzz-vcpu{i}", daemon=True)
                       for i in range(len(vcpus))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        results = state["results"]
        w = state["winner"] if state["winner"] is not None else 0
        res["outcome"] = results[w]["outcome"]
        res["stops"] = [s for r in results for s in r["stops"]]
        for r in results:                          # a finding on any vCPU is the case's finding
            if r.get("finding"):
                res["outcome"] = r["outcome"]
                res["finding"] = r["finding"]
                break
        if not res.get("finding"):
            for k in ("detail", "error"):
                if results[w].get(k):
                    res[k] = results[w][k]
        for v in vcpus:                            # the state must stay readable after anything
            v.get_regs()
            v.get_sregs()

    def _drive(self, loop, i: int, case: dict, deadline: float, state: dict) -> dict:
        """Run vCPU ``i`` for up to ``max_stops`` stops, answering reads with random data."""
        rng = random.Random(f"{case['io_seed']}:{i}")
        stops: List[str] = []
        out = {"stops": stops, "outcome": None}
        detail = None
        try:
            for _ in range(case["max_stops"]):
                if state["winner"] is not None:
                    name = "kick"
                    break
                s = loop.run(deadline=deadline)
                name = s.exit.name if s.kind == "exit" else s.kind
                stops.append(name)
                detail = None
                if s.kind == "exit":
                    ex = s.exit
                    ex.fields()
                    repr(ex)
                    if name == "INTERNAL_ERROR":
                        detail = ex.suberror_name
                    elif name == "FAIL_ENTRY":
                        detail = f"reason {ex.hardware_entry_failure_reason:#x}"
                    if name == "IO" and not ex.is_out:
                        ex.respond(rng.randbytes(ex.size * ex.count))
                    elif name == "MMIO" and not ex.is_write:
                        ex.respond(rng.randbytes(ex.len))
                if name not in RESUMABLE:
                    break
            out["outcome"] = name
            if detail:
                out["detail"] = detail
        except PykvmError as e:
            out["outcome"] = type(e).__name__
            out["detail"] = _error_detail(e)
            out["error"] = str(e)[:300]
        except Exception as e:                                  # noqa: BLE001 — a finding
            out["outcome"] = f"exception:{type(e).__name__}"
            out["finding"] = {"kind": "exception", "detail": traceback.format_exc()}
        return out


def worker_main(inject) -> int:
    """The worker process (``--_worker``): reads requests from stdin — {"op": "run", "gen",
    "start", "stop"} (generate and run that index range), {"op": "case", "case"} (run this
    case, JSON form), {"op": "exit"} — and writes one JSON line per event on its stdout:
    {"ev": "ready"}, {"ev": "result", "index", "mode", "outcome", ...} per case, or
    {"ev": "fatal", "error"} when /dev/kvm cannot be opened. Anything else the process prints
    goes to stderr. ``inject``: the --_inject test hooks ("KIND@INDEX"). Returns the exit
    status: 0, or 8 (pykvm.status.VMM_ERROR) without /dev/kvm."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    proto = os.fdopen(os.dup(1), "w", buffering=1)         # our replies; stray output -> stderr
    os.dup2(2, 1)

    def send(obj):
        proto.write(json.dumps(obj, separators=(",", ":")) + "\n")

    try:
        kvm = Kvm()
        runner = CaseRunner(kvm, inject)
        runner.install_hooks()
        platform.preload()          # machines and the ELF reader: not inside a case's deadline
    except PykvmError as e:
        send({"ev": "fatal", "error": str(e)})
        return status.VMM_ERROR
    send({"ev": "ready", "pid": os.getpid()})
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg["op"]
        if op == "run":
            g = msg["gen"]
            for index in range(msg["start"], msg["stop"]):
                case = cases.generate(g, index)
                r = runner.run(case)
                r.update(ev="result", index=index, mode=case["mode"])
                send(r)
        elif op == "case":
            case = cases.case_from_json(msg["case"])
            r = runner.run(case)
            r.update(ev="result", index=case["index"], mode=case["mode"])
            send(r)
        elif op == "exit":
            break
    return status.OK
