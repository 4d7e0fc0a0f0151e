"""``python -m pykvm.fuzz --replay FILE``: a reproducer (a finding file the supervisor saved, or
a bare case file) run again under supervision, in a fresh worker, with the verdict said.
"""
import json
import os
import selectors
import signal
import time

from . import cases
from .supervisor import (DEFAULT_OUT, EXIT_FINDINGS, EXIT_INTERRUPTED, EXIT_OK, FD_SLACK,
                         FINDING_FORMAT, HANG_GRACE, RSS_SLACK_MB, WARMUP, WORKER_START_TIMEOUT,
                         Supervisor, Worker, print_summary, signal_name)

def replay(path: str, *, as_json: bool = False, grace: float = HANG_GRACE,
           out_dir: str = DEFAULT_OUT, quiet: bool = False) -> int:
    """Run the reproducer at ``path`` (a finding file or a bare case file, either mode) again,
    supervised, and print the verdict (JSON with ``as_json``). A leak finding reruns its range
    of cases in one worker against the bounds it was found with; any other runs its one case.
    ``grace``: seconds past the case's deadline before it is a hang, scaled by the host's load
    per CPU as in :meth:`Supervisor.hang_limit`; ``out_dir``: where a leak
    rerun's new reproducers go. Returns the exit status: 0 no finding, 1 a finding, 130
    interrupted. Raises ValueError, KeyError or TypeError for a file that is not a reproducer,
    OSError when it cannot be read, RuntimeError when no worker can start."""
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") == FINDING_FORMAT and doc.get("kind") == "leak":
        # The recorded range runs in one worker (twice as many cases from its start, so that
        # a leak found at the range's end grows past the bound again), sampled every 50 ms
        # against the bounds it was found with.
        g = doc["generator"]
        n = doc["stop"] - doc["start"]
        sup = Supervisor(runs=2 * n, start=doc["start"], seed=g["seed"],
                         jobs=1, deadline=g["deadline"], modes=g["modes"],
                         max_vcpus=g["max_vcpus"], out_dir=out_dir, quiet=quiet,
                         inject=doc.get("inject", ()), devices=bool(g.get("devices")),
                         virtio=bool(g.get("virtio")),
                         warmup=min(WARMUP, max(1, n // 4)), check_interval=0.05,
                         fd_slack=doc.get("fd_slack", FD_SLACK),
                         rss_slack_mb=doc.get("rss_slack_mb", RSS_SLACK_MB))
        sup.run()
        s = sup.summary()
        s["replay"] = path
        s["reproduced"] = bool(s["leaks"])
        print(json.dumps(s, indent=1)) if as_json else print_summary(s)
        return EXIT_INTERRUPTED if s["interrupted"] else (EXIT_FINDINGS if s["findings"] else EXIT_OK)
    if doc.get("format") == FINDING_FORMAT:
        case_doc, inject, expected = doc["case"], doc.get("inject", []), doc["kind"]
    else:
        case_doc, inject, expected = doc, [], None
    case = cases.case_from_json(case_doc)
    sup = Supervisor(runs=1, seed=case["seed"], jobs=1, deadline=case["deadline"],
                     modes=[case["mode"]], max_vcpus=len(case["vcpus"]), out_dir=out_dir,
                     quiet=True, inject=inject, grace=grace,
                     devices=cases.is_device_case(case), virtio=cases.is_virtio_case(case))
    result = _replay_one(sup, case, case_doc)
    result.update(replay=path, expected=expected, mode=case["mode"], vcpus=len(case["vcpus"]),
                  seed=case["seed"], index=case["index"])
    result["reproduced"] = expected is not None and result["finding"] == expected
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        print(f"replay {path}: seed {case['seed']} case {case['index']}, {case['mode']} mode, "
              f"{len(case['vcpus'])} vCPU(s)")
        print(f"  outcome: {result['outcome']}")
        if result["finding"]:
            print(f"  finding: {result['finding']}: {result['detail'].strip()[:2000]}")
        if expected:
            print(f"  reproduced: {'yes' if result['reproduced'] else 'no'} (recorded: {expected})")
    if result.get("interrupted"):
        return EXIT_INTERRUPTED
    return EXIT_FINDINGS if result["finding"] else EXIT_OK


def _replay_one(sup: Supervisor, case: dict, case_doc: dict) -> dict:
    w = Worker(sup, 0)
    limit = sup.hang_limit()         # the same load-scaled rule as the run that found it
    out = {"outcome": None, "finding": None, "detail": ""}
    try:
        t_start = time.monotonic()
        ready = False
        sent_at = None
        while True:
            now = time.monotonic()
            if not ready and now - t_start > WORKER_START_TIMEOUT:
                out.update(outcome="error", detail="worker did not start")
                break
            if sent_at is not None and now - sent_at > limit and w.elapsed(now) > limit:
                try:
                    os.kill(w.pid, signal.SIGUSR1)
                    time.sleep(0.3)
                except ProcessLookupError:
                    pass
                out.update(outcome="hang", finding="hang",
                           detail=f"still running {limit:.2f} s after it started\n" + w.stderr_tail())
                break
            r = _select_one(w, 0.05)
            for msg in w.read_lines():
                if msg.get("ev") == "ready":
                    ready = True
                    w.send({"op": "case", "case": case_doc})
                    sent_at, limit = time.monotonic(), sup.hang_limit()
                    w.restart_clock()
                elif msg.get("ev") == "fatal":
                    raise RuntimeError(msg.get("error"))
                elif msg.get("ev") == "result":
                    out["outcome"] = msg["outcome"]
                    out["stops"] = msg.get("stops", [])
                    out["seconds"] = msg.get("seconds")
                    if msg.get("error"):
                        out["error"] = msg["error"]
                    if msg.get("finding"):
                        out["finding"] = msg["finding"]["kind"]
                        out["detail"] = msg["finding"].get("detail", "")
                    return out
            if r == "eof" or w.proc.poll() is not None:
                w.proc.wait()
                rc = w.proc.returncode
                how = signal_name(-rc) if rc < 0 else f"exit status {rc}"
                out.update(outcome="crash", finding="crash",
                           detail=f"worker died ({how})\n" + w.stderr_tail())
                break
    except KeyboardInterrupt:
        out["interrupted"] = True
    finally:
        w.send({"op": "exit"})
        w.kill()
    return out


def _select_one(w: Worker, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(w.proc.stdout, selectors.EVENT_READ)
    try:
        if sel.select(timeout):
            chunk = b""
            try:
                chunk = os.read(w.proc.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                return "idle"
            if not chunk:
                return "eof"
            w.buf += chunk
            return "data"
        return "idle"
    finally:
        sel.close()
