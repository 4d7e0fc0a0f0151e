"""Running many fuzz cases: the :class:`Supervisor`, its worker processes, findings and their
reproducers, and the run's summary.

A case that ends in an *outcome* (:mod:`pykvm.fuzz.runner`) is counted. Everything else is a
*finding*, saved as a reproducer that ``--replay`` (:mod:`pykvm.fuzz.replay`) runs again:

* ``crash``     the worker process died (a signal, or an exit status) while running the case;
* ``hang``      the case ran past its deadline + 2 s (more on a loaded host: the grace grows
                with the load average per CPU, up to 5 times), counting only the time the
                worker could run (time its threads waited on a run queue, from
                ``/proc/PID/task/*/schedstat``, is left out), so a case that only waited for
                a CPU is not taken for a hang;
* ``exception`` pykvm raised something that is not a ``PykvmError`` (the traceback is kept);
* ``leak``      the worker's fd count or RSS grew past a bound over the baseline taken after a
                warm-up (the reproducer names the range of cases to run again);
* ``vmm_error`` (device mode) the guest ended the machine with pykvm's VMM-error status (8): a
                device or exit handler raised, or KVM refused what a device asked of it;
* ``cpu``       (device mode) the VMM's host CPU time exceeded the bound per guest access
                (:data:`pykvm.fuzz.device_runner.CPU_PER_ACCESS_S`);
* ``invariant`` (virtio mode) a virtio device broke a rule :mod:`pykvm.fuzz.virtio_runner`
                checks after every operation (running with a broken queue, an interrupt
                line out of step, a read-only image written).

Cases run in worker processes (``python -m pykvm.fuzz`` started with a hidden worker option,
:func:`pykvm.fuzz.runner.worker_main`); the :class:`Supervisor` hands them index ranges over a
pipe, reads one JSON line per case back, kills and restarts a worker that hangs or dies, and
samples ``/proc/PID/fd`` and ``/proc/PID/status``. See docs/fuzzing.md.
"""
import collections
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from .. import _cliutil, status
from ..outfile import write_report
from . import cases

PROG = "python -m pykvm.fuzz"

# Exit statuses of python -m pykvm.fuzz (docs/fuzzing.md "Exit status").
EXIT_OK = status.OK
EXIT_FINDINGS = 1
EXIT_USAGE = status.BAD_INPUT
EXIT_ENVIRONMENT = status.VMM_ERROR   # /dev/kvm or the host unusable
EXIT_INTERRUPTED = status.SIGINT

FINDING_FORMAT = "pykvm-fuzz-finding/1"
FINDING_KINDS = ("crash", "hang", "exception", "leak", "vmm_error", "cpu", "invariant")

DEFAULT_OUT = os.path.join("build", "fuzz-findings")
HANG_GRACE = 2.0              # a case running past deadline + this is a hang
WORKER_START_TIMEOUT = 60.0
BATCH = 25                    # cases per message to a worker
WARMUP = 100                  # cases a worker runs before its fd/RSS baseline is taken
FD_SLACK = 16                 # fds over the baseline that count as a leak
RSS_SLACK_MB = 96             # MiB of RSS over the baseline that count as a leak
THREAD_SLACK = 8              # threads over the baseline (a case uses up to max_vcpus + timers)
CHECK_INTERVAL = 1.0          # seconds between fd/RSS samples of a worker
PROGRESS_INTERVAL = 5.0
MAX_FILES_PER_SIGNATURE = 20  # reproducers saved per distinct finding (the rest are counted)


def _proc_fds(pid: int) -> Optional[int]:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _proc_status(pid: int, field: str) -> Optional[int]:
    """An integer field of /proc/PID/status ("VmRSS" in KiB, "Threads")."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def signal_name(n: int) -> str:
    """The name of signal ``n`` ("SIGSEGV"), or "signal N" for a number Python does not name."""
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _signature(f: dict) -> str:
    """Findings with the same signature are the same bug: the kind and the last line of the
    detail (the exception, or how the worker died)."""
    if f["kind"] == "exception":
        lines = f["detail"].strip().splitlines()
        return f"exception: {lines[-1][:160] if lines else '?'}"
    if f["kind"] == "crash":
        return f"crash: {f.get('signal') or ('exit status %s' % f.get('exit_status'))}"
    if f["kind"] == "leak":
        return f"leak: {f.get('resource')}"
    if f["kind"] == "vmm_error":
        return f"vmm_error: {_where(f['detail'])}"
    return f["kind"]


# Where pykvm's device models and run loops live: a VMM error's signature names the innermost
# frame in one of these.
_MODEL_DIRS = ("/pykvm/devices/", "/pykvm/platform/", "/pykvm/arch/", "/pykvm/runloop")
_FRAME = re.compile(r'File "([^"]*)", line \d+, in (\S+)')


def _where(detail: str) -> str:
    """"ExceptionType at module.py:function" for a VMM-error detail: the exception and the
    innermost frame in a device model or run loop (else in pykvm), or the verdict line without
    its numbers when there is no traceback."""
    lines = detail.strip().splitlines()
    frames = [(m.group(1), m.group(2)) for m in _FRAME.finditer(detail) if "/pykvm/" in m.group(1)]
    if not frames:
        return re.sub(r"0x[0-9a-fA-F]+|\d+", "N", lines[0] if lines else "?")[:160]
    pick = [f for f in frames if any(part in f[0] for part in _MODEL_DIRS)] or frames
    path, func = pick[-1]
    exc = lines[-1].split(":")[0].strip() if lines else "?"
    return f"{exc} at {path.split('/pykvm/', 1)[1]}:{func}"


class Worker:
    """One worker process (``python -m pykvm.fuzz --_worker``, in its own session, this
    checkout first on its PYTHONPATH) and what the supervisor knows of it: the case indices
    sent and not yet reported, its start, its fd/RSS/thread baseline, its stderr (a temporary
    file) for crash and hang reports."""

    def __init__(self, sup, wid: int):
        self.id = wid
        self.err = tempfile.TemporaryFile(prefix="pykvm-fuzz-worker-")
        argv = [sys.executable, "-m", "pykvm.fuzz", "--_worker"]
        for spec in sup.inject:
            argv += ["--_inject", spec]
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=env, start_new_session=True)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buf = b""
        self.eof = False
        self.queue: collections.deque = collections.deque()     # indices sent, not reported
        self.ready = False
        self.since = time.monotonic()       # when the in-flight case (or the start) began
        self.delays: dict = {}              # {thread id: run-queue wait in ns} at `since`
        self.done = 0                       # cases reported by this process
        self.baseline = None                # (fds, rss KiB, cases done) after the warm-up
        self.baseline_index = None
        self.last_check = 0.0
        self.last_index = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _run_delays(self) -> dict:
        """{thread id: ns it has waited on a run queue} (``/proc/PID/task/TID/schedstat``, second
        field; {} where the kernel has no schedstats)."""
        out = {}
        try:
            tids = os.listdir(f"/proc/{self.proc.pid}/task")
        except OSError:
            return out
        for tid in tids:
            try:
                with open(f"/proc/{self.proc.pid}/task/{tid}/schedstat") as f:
                    out[tid] = int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
        return out

    def restart_clock(self) -> None:
        """A case (or the start) begins now: :meth:`elapsed` counts from here."""
        self.since = time.monotonic()
        self.delays = self._run_delays()

    def elapsed(self, now: float) -> float:
        """Seconds since :meth:`restart_clock` in which the worker could run: the wall time less
        the longest time any of its threads waited for a CPU since then (a thread that started
        later counts from 0). On a loaded host a case that only waited for a CPU is not a hang;
        one that is blocked or spinning still is."""
        wall = now - self.since
        waited = max((d - self.delays.get(tid, 0) for tid, d in self._run_delays().items()),
                     default=0)
        return wall - min(wall, max(0, waited) / 1e9)

    def send(self, obj) -> bool:
        try:
            self.proc.stdin.write((json.dumps(obj, separators=(",", ":")) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def read_lines(self) -> List[dict]:
        """Messages that have arrived (sets ``eof`` once the worker's end is closed)."""
        out = []
        try:
            while True:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    self.eof = True
                    break
                self.buf += chunk
        except BlockingIOError:
            pass
        except (OSError, ValueError):
            self.eof = True
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stderr_tail(self, n: int = 6000) -> str:
        try:
            self.err.flush()
            size = self.err.seek(0, os.SEEK_END)
            self.err.seek(max(0, size - n))
            return self.err.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.err.close()


class Supervisor:
    """Hands case ranges to ``jobs`` worker processes and watches them."""

    def __init__(self, *, runs: int, seed: int, jobs: int, deadline: float, modes, max_vcpus: int,
                 out_dir: str, quiet: bool = False, inject=(), start: int = 0,
                 warmup: int = WARMUP, fd_slack: int = FD_SLACK, rss_slack_mb: float = RSS_SLACK_MB,
                 check_interval: float = CHECK_INTERVAL, grace: float = HANG_GRACE,
                 progress_interval: float = PROGRESS_INTERVAL, devices: bool = False,
                 virtio: bool = False):
        self.runs, self.seed, self.jobs = runs, seed, jobs
        self.deadline, self.modes, self.max_vcpus = deadline, list(modes), max_vcpus
        self.out_dir, self.quiet, self.inject = out_dir, quiet, list(inject)
        self.start = start
        self.warmup, self.fd_slack, self.rss_slack_kib = warmup, fd_slack, int(rss_slack_mb * 1024)
        self.check_interval, self.grace = check_interval, grace
        self.progress_interval = progress_interval
        self.devices = devices
        self.gen = {"seed": seed, "modes": self.modes, "max_vcpus": max_vcpus, "deadline": deadline}
        if devices:
            self.gen["devices"] = True
        self.virtio = virtio
        if virtio:
            self.gen["virtio"] = True
        self.pending: collections.deque = collections.deque()    # indices not yet handed out
        self.outcomes: collections.Counter = collections.Counter()
        self.by_mode: Dict[str, collections.Counter] = {m: collections.Counter() for m in self.modes}
        self.stops: collections.Counter = collections.Counter()
        self.details: collections.Counter = collections.Counter()
        self.findings: List[dict] = []
        self.signatures: collections.Counter = collections.Counter()
        self.completed = 0
        self.slowest = (0.0, None)
        self.t0 = time.monotonic()
        self.interrupted = False
        self.workers: List[Worker] = []
        self.sel = selectors.DefaultSelector()
        self.failed_starts = 0
        self.save_error: Optional[OSError] = None   # the first reproducer that could not be saved

    # -- bookkeeping ------------------------------------------------------------------------
    def _record(self, w: Worker, msg: dict) -> None:
        index = msg["index"]
        if w.queue and w.queue[0] == index:
            w.queue.popleft()
        else:
            try:
                w.queue.remove(index)
            except ValueError:
                pass
        w.restart_clock()
        w.done += 1
        w.last_index = index
        self.completed += 1
        outcome = msg["outcome"]
        self.stops.update(msg.get("stops", ()))
        if msg.get("seconds", 0) > self.slowest[0]:
            self.slowest = (msg["seconds"], index)
        if msg.get("finding"):
            f = msg["finding"]
            self._finding(f["kind"], index, detail=f.get("detail", ""), outcome=outcome)
            return
        self.outcomes[outcome] += 1
        if msg.get("detail"):
            self.details[f"{outcome} ({msg['detail']})"] += 1
        self.by_mode.setdefault(msg["mode"], collections.Counter())[outcome] += 1

    def _finding(self, kind: str, index: Optional[int], *, detail: str = "", outcome=None,
                 extra: Optional[dict] = None) -> dict:
        f = {"kind": kind, "index": index, "detail": detail}
        if outcome:
            f["outcome"] = outcome
        if extra:
            f.update(extra)
        sig = _signature(f)
        self.signatures[sig] += 1
        self.findings.append(f)
        if self.signatures[sig] > MAX_FILES_PER_SIGNATURE:
            f["file"] = None                 # the same finding again: counted, not saved
            return f
        try:
            f["file"] = self._save(f)
        except OSError as e:                 # the findings directory cannot take it (full ...)
            f["file"] = None
            if self.save_error is None:
                self.save_error = e
                _cliutil.err(f"{PROG}: {e}")
        if not self.quiet:
            where = f"case {index}" if index is not None else "worker"
            first = (detail.strip().splitlines() or [""])[-1][:200]
            print(f"pykvm.fuzz: finding: {kind} at {where}: {first} -> "
                  f"{f['file'] or '(reproducer not saved)'}",
                  file=sys.stderr, flush=True)
        return f

    def _save(self, f: dict) -> str:
        """Write the finding's reproducer into the findings directory (created if missing) as
        pykvm.outfile writes reports: atomically, never over a device, FIFO or symlink. Raises
        ReportPathError (one line) when it cannot be written."""
        doc = {"format": FINDING_FORMAT, "kind": f["kind"], "detail": f.get("detail", ""),
               "seed": self.seed, "index": f["index"], "inject": self.inject,
               "generator": self.gen, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if f["kind"] == "leak":                  # the bounds it was found with, for --replay
            doc["fd_slack"], doc["rss_slack_mb"] = self.fd_slack, self.rss_slack_kib / 1024
        for k in ("outcome", "signal", "exit_status", "stderr", "resource", "baseline", "value",
                  "start", "stop"):
            if k in f:
                doc[k] = f[k]
        if f["kind"] != "leak" and f["index"] is not None:
            case = cases.generate(self.gen, f["index"])
            doc["mode"], doc["vcpus"] = case["mode"], len(case["vcpus"])
            doc["case"] = cases.case_to_json(case)
            name = f"{f['kind']}-s{self.seed}-i{f['index']}.json"
        else:
            name = f"{f['kind']}-s{self.seed}-{f.get('start', 0)}-{f.get('stop', 0)}.json"
        path = os.path.join(self.out_dir, name)
        write_report(path, json.dumps(doc, indent=1) + "\n", "the reproducer")  # atomically
        return path

    # -- workers ----------------------------------------------------------------------------
    def _spawn(self) -> Worker:
        w = Worker(self, len(self.workers))
        self.workers.append(w)
        self.sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        return w

    def _retire(self, w: Worker, requeue: bool = True) -> None:
        try:
            self.sel.unregister(w.proc.stdout)
        except (KeyError, ValueError):
            pass
        if requeue:
            self.pending.extendleft(reversed(w.queue))
        w.queue.clear()
        w.kill()
        self.workers.remove(w)

    def _feed(self, w: Worker) -> None:
        """Keep two batches queued at each ready worker."""
        while w.ready and len(w.queue) < 2 * BATCH and self.pending:
            start = self.pending.popleft()
            stop = start + 1
            while (stop - start < BATCH and self.pending and self.pending[0] == stop):
                self.pending.popleft()
                stop += 1
            if not w.queue:
                w.restart_clock()
            w.queue.extend(range(start, stop))
            if not w.send({"op": "run", "gen": self.gen, "start": start, "stop": stop}):
                break

    def _dead(self, w: Worker) -> None:
        """A worker's pipe closed or its process ended: a crash if a case was in flight."""
        for msg in w.read_lines():
            self._handle(w, msg)
        try:
            w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        rc = w.proc.returncode
        how = signal_name(-rc) if rc < 0 else f"exit status {rc}"
        tail = w.stderr_tail()
        if w.queue:
            index = w.queue.popleft()
            self.completed += 1
            extra = {"stderr": tail}
            if rc < 0:
                extra["signal"] = signal_name(-rc)
            else:
                extra["exit_status"] = rc
            self._finding("crash", index, detail=f"worker {w.pid} died ({how}) running case "
                          f"{index}", extra=extra)
        elif not w.ready:
            self.failed_starts += 1
            if not self.quiet or self.failed_starts >= 3:
                print(f"pykvm.fuzz: worker {w.pid} failed to start ({how}): "
                      f"{tail.strip()[-500:]}", file=sys.stderr)
        else:
            self._finding("crash", w.last_index, detail=f"worker {w.pid} died ({how}) "
                          f"between cases", extra={"stderr": tail,
                                                   "exit_status": rc})
        self._retire(w)

    def hang_limit(self) -> float:
        """Seconds a case may run before it is a hang: its deadline plus the grace, the grace
        scaled by the host's 1-minute load average per CPU (1 to 5 times)."""
        try:
            load = os.getloadavg()[0] / (os.cpu_count() or 1)
        except OSError:
            load = 1.0
        return self.deadline + self.grace * min(5.0, max(1.0, load))

    def _hang(self, w: Worker, limit: float) -> None:
        index = w.queue.popleft()
        self.completed += 1
        try:                                   # ask faulthandler for every thread's stack
            os.kill(w.pid, signal.SIGUSR1)
            time.sleep(0.3)
        except ProcessLookupError:
            pass
        tail = w.stderr_tail()
        self._finding("hang", index, detail=f"case {index} still running "
                      f"{limit:.2f} s after it started "
                      f"(deadline {self.deadline} s); worker {w.pid} killed",
                      extra={"stderr": tail})
        self._retire(w)

    def _check_resources(self, w: Worker, now: float, final: bool = False) -> None:
        if not final and (w.done < self.warmup or now - w.last_check < self.check_interval):
            return
        if w.done < self.warmup:
            return
        w.last_check = now
        fds, rss = _proc_fds(w.pid), _proc_status(w.pid, "VmRSS")
        threads = _proc_status(w.pid, "Threads")
        if fds is None or rss is None or threads is None:
            return
        if w.baseline is None:
            w.baseline = (fds, rss, threads)
            w.baseline_index = w.last_index
            return
        leak = None
        if fds > w.baseline[0] + self.fd_slack:
            leak = ("fds", w.baseline[0], fds)
        elif rss > w.baseline[1] + self.rss_slack_kib:
            leak = ("rss_kib", w.baseline[1], rss)
        elif threads > w.baseline[2] + 2 * self.max_vcpus + THREAD_SLACK:
            leak = ("threads", w.baseline[2], threads)
        if leak:
            start = w.baseline_index + 1 if w.baseline_index is not None else 0
            stop = (w.last_index or start) + 1
            self._finding("leak", None, detail=f"worker {w.pid}: {leak[0]} grew from {leak[1]} "
                          f"to {leak[2]} over {w.done} cases (cases {start}..{stop - 1} ran in "
                          f"it after the baseline)",
                          extra={"resource": leak[0], "baseline": leak[1], "value": leak[2],
                                 "start": start, "stop": stop})
            self._retire(w)

    def _handle(self, w: Worker, msg: dict) -> None:
        ev = msg.get("ev")
        if ev == "ready":
            w.ready = True
            w.restart_clock()
            self._feed(w)
        elif ev == "result":
            self._record(w, msg)
        elif ev == "fatal":
            raise RuntimeError(msg.get("error", "worker could not start"))

    # -- the main loop ----------------------------------------------------------------------
    def _progress(self) -> None:
        if self.quiet:
            return
        el = time.monotonic() - self.t0
        rate = self.completed / el if el > 0 else 0.0
        left = self.runs - self.completed
        eta = f", ETA {int(left / rate) // 60}m{int(left / rate) % 60:02d}s" if rate and left else ""
        line = (f"pykvm.fuzz: {self.completed}/{self.runs} runs ({100 * self.completed / self.runs:.1f}%), "
                f"{rate:.0f} runs/s, {len(self.findings)} findings{eta}")
        print(line, file=sys.stderr, flush=True)

    def run(self) -> None:
        self.pending.extend(range(self.start, self.start + self.runs))
        self.t0 = time.monotonic()
        last_progress = self.t0
        try:
            for _ in range(min(self.jobs, self.runs)):
                self._spawn()
            while self.pending or any(w.queue for w in self.workers):
                if self.failed_starts >= 3:
                    raise RuntimeError("workers keep failing to start")
                while len(self.workers) < self.jobs and len(self.workers) < len(self.pending):
                    self._spawn()
                now = time.monotonic()
                wait = self.check_interval
                case_limit = self.hang_limit()
                for w in self.workers:
                    limit = WORKER_START_TIMEOUT if not w.ready else case_limit
                    if w.queue or not w.ready:
                        wait = min(wait, max(0.0, w.since + limit - now))
                for key, _ in self.sel.select(timeout=max(0.01, wait)):
                    w = key.data
                    if w not in self.workers:
                        continue
                    for msg in w.read_lines():
                        self._handle(w, msg)
                    if w.eof:
                        self._dead(w)
                now = time.monotonic()
                for w in list(self.workers):
                    if w.proc.poll() is not None:
                        self._dead(w)
                        continue
                    if not w.ready:
                        if now - w.since > WORKER_START_TIMEOUT:
                            self.failed_starts += 1
                            self._retire(w)
                        continue
                    if w.queue and now - w.since > case_limit and w.elapsed(now) > case_limit:
                        self._hang(w, case_limit)
                        continue
                    self._check_resources(w, now)
                    if w in self.workers:
                        self._feed(w)
                if now - last_progress >= self.progress_interval:
                    last_progress = now
                    self._progress()
            now = time.monotonic()
            for w in list(self.workers):                # a last, quiet sample: between cases
                self._check_resources(w, now, final=True)
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            self.elapsed = time.monotonic() - self.t0
            for w in list(self.workers):
                w.send({"op": "exit"})
                self._retire(w, requeue=False)

    # -- results ----------------------------------------------------------------------------
    def summary(self) -> dict:
        kinds = collections.Counter(f["kind"] for f in self.findings)
        el = getattr(self, "elapsed", time.monotonic() - self.t0)
        return {
            "runs": self.completed, "requested": self.runs, "seed": self.seed, "jobs": self.jobs,
            "modes": self.modes, "max_vcpus": self.max_vcpus, "deadline": self.deadline,
            "seconds": round(el, 3), "runs_per_s": round(self.completed / el, 1) if el else 0.0,
            "outcomes": dict(self.outcomes.most_common()),
            "outcomes_by_mode": {m: dict(c.most_common()) for m, c in self.by_mode.items()},
            "outcome_details": dict(self.details.most_common()),
            "stops": dict(self.stops.most_common()),
            "crashes": kinds["crash"], "hangs": kinds["hang"], "leaks": kinds["leak"],
            "exceptions": kinds["exception"], "vmm_errors": kinds["vmm_error"],
            "cpu_overruns": kinds["cpu"], "devices": self.devices,
            "virtio": self.virtio, "invariants": kinds["invariant"],
            "finding_signatures": dict(self.signatures.most_common()),
            "findings": [{k: f[k] for k in ("kind", "index", "detail", "file") if k in f}
                         for f in self.findings[:500]],
            "slowest_case": {"index": self.slowest[1], "seconds": round(self.slowest[0], 4)},
            "interrupted": self.interrupted,
        }


def print_summary(s: dict, out=None) -> None:
    """The human-readable form of :meth:`Supervisor.summary` ``s`` on ``out`` (stdout)."""
    out = sys.stdout if out is None else out     # the stdout of now (a program watches it)
    p = lambda *a: print(*a, file=out)       # noqa: E731
    state = " (interrupted)" if s["interrupted"] else ""
    what = " --virtio" if s.get("virtio") else " --devices" if s.get("devices") else ""
    p(f"pykvm fuzz{what}{state}: {s['runs']} runs in {s['seconds']:.1f} s ({s['runs_per_s']:.1f} runs/s); "
      f"seed {s['seed']}, jobs {s['jobs']}, modes {','.join(s['modes'])}, "
      f"deadline {s['deadline']} s, up to {s['max_vcpus']} vCPUs")
    p("outcomes:")
    for name, n in s["outcomes"].items():
        per = ", ".join(f"{m} {c[name]}" for m, c in s["outcomes_by_mode"].items() if c.get(name))
        p(f"  {name:<22} {n:>8}   ({per})")
    if s.get("outcome_details"):
        p("details:")
        for name, n in s["outcome_details"].items():
            p(f"  {name:<46} {n:>8}")
    p(f"crashes: {s['crashes']}")
    p(f"hangs: {s['hangs']}")
    p(f"leaks: {s['leaks']}")
    p(f"exceptions: {s['exceptions']}")
    if s.get("devices"):
        p(f"vmm errors: {s['vmm_errors']}")
        p(f"cpu overruns: {s['cpu_overruns']}")
    if s.get("virtio"):
        p(f"invariants broken: {s['invariants']}")
        p(f"cpu overruns: {s['cpu_overruns']}")
    if s["findings"]:
        p("findings:")
        for sig, n in s["finding_signatures"].items():
            p(f"  {n:>6} x {sig}")
        saved = [f for f in s["findings"] if f.get("file")]
        for f in saved[:20]:
            where = f"case {f['index']}" if f.get("index") is not None else "worker"
            p(f"  {f['kind']:<10} {where:<12} {f['file']}")
        if len(saved) > 20:
            p(f"  ... {len(saved) - 20} more reproducers in the findings directory")
    else:
        p("findings: none")
