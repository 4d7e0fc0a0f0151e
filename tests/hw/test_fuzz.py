"""The random-guest fuzzer (``python -m pykvm.fuzz``): a seeded quick run finds nothing and sees
many kinds of outcome, reproducers replay, and every kind of finding the supervisor claims to
detect (a worker killed by a signal, a hang, an unexpected exception, an fd leak) is produced on
purpose through the hidden ``--_inject`` hook and shown to be detected and saved."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pykvm import Kvm
from pykvm import fuzz
from pykvm.fuzz import supervisor

pytestmark = pytest.mark.requires_kvm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fuzz_cli(*args, timeout=120):
    """Run ``python -m pykvm.fuzz ARGS``; returns (status, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "pykvm.fuzz", *args], cwd=ROOT, timeout=timeout,
                       capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def fuzz_json(*args, timeout=120):
    rc, out, err = fuzz_cli("--json", "--quiet", *args, timeout=timeout)
    assert "Traceback" not in err, err
    return rc, json.loads(out), err


def test_seeded_quick_run_finds_nothing_and_sees_many_outcomes(tmp_path):
    rc, s, err = fuzz_json("--runs", "400", "--seed", "1", "--jobs", "2", "--out", str(tmp_path))
    assert rc == 0, (s["findings"], err)
    assert s["runs"] == 400 and sum(s["outcomes"].values()) == 400
    assert (s["crashes"], s["hangs"], s["leaks"], s["exceptions"]) == (0, 0, 0, 0)
    assert s["findings"] == [] and not os.listdir(tmp_path)
    # the guests end in many different ways: exits, the deadline, typed errors
    assert len(s["outcomes"]) >= 5, s["outcomes"]
    assert {"IO", "MMIO", "deadline"} <= set(s["outcomes"]), s["outcomes"]
    assert {"SHUTDOWN", "INTERNAL_ERROR", "HLT"} & set(s["outcomes"]), s["outcomes"]
    for mode in fuzz.MODES:                         # all three modes ran, several outcomes each
        assert len(s["outcomes_by_mode"][mode]) >= 3, s["outcomes_by_mode"]
    assert s["stops"].get("kick", 0) > 0            # multi-vCPU guests ran and were kicked
    assert s["runs_per_s"] > 0


def test_cases_are_a_function_of_seed_and_index():
    a = fuzz.generate_case(5, 123)
    assert a == fuzz.generate_case(5, 123)
    assert a != fuzz.generate_case(5, 124) and a != fuzz.generate_case(6, 123)
    modes = {fuzz.generate_case(5, i, modes=["long"])["mode"] for i in range(20)}
    assert modes == {"long"}
    assert {len(fuzz.generate_case(5, i, max_vcpus=1)["vcpus"]) for i in range(20)} == {1}
    # the JSON form round-trips exactly (images, tables, registers)
    j = json.loads(json.dumps(fuzz.case_to_json(a)))
    assert fuzz.case_from_json(j) == a


def test_replay_round_trip(tmp_path):
    """A saved case replays (in a supervised worker) to the outcome it has in-process."""
    with Kvm() as kvm:
        runner = fuzz.CaseRunner(kvm)
        for index in range(200):
            case = fuzz.generate_case(11, index, max_vcpus=1, deadline=1.0)
            res = runner.run(case)
            if res["outcome"] in ("HLT", "SHUTDOWN", "IO", "MMIO", "INTERNAL_ERROR") and \
                    case["max_stops"] == 1 and case["native"] and not case["irqchip"]:
                break
        else:
            pytest.fail("no case with a deterministic outcome among 200")
    path = tmp_path / "case.json"
    path.write_text(json.dumps(fuzz.case_to_json(case)))
    rc, r, err = fuzz_json("--replay", str(path), "--out", str(tmp_path / "f"))
    assert rc == 0, (r, err)
    assert r["outcome"] == res["outcome"] and r["finding"] is None
    assert (r["seed"], r["index"], r["mode"]) == (11, index, case["mode"])
    assert r["reproduced"] is False and r["expected"] is None
    # a file that is not a reproducer is refused cleanly
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    rc, out, err = fuzz_cli("--replay", str(bad))
    assert rc == 2 and "not a reproducer" in err and "Traceback" not in err


def test_worker_killed_by_a_signal_is_a_crash_finding_with_a_reproducer(tmp_path):
    rc, s, err = fuzz_json("--runs", "60", "--seed", "4", "--jobs", "1", "--out", str(tmp_path),
                           "--_inject", "crash@25")
    assert rc == 1
    assert s["crashes"] == 1 and (s["hangs"], s["leaks"], s["exceptions"]) == (0, 0, 0)
    assert s["runs"] == 60 and sum(s["outcomes"].values()) == 59    # the rest ran on, respawned
    [f] = s["findings"]
    assert f["kind"] == "crash" and f["index"] == 25 and "SIGSEGV" in f["detail"]
    doc = json.loads(open(f["file"]).read())
    assert doc["kind"] == "crash" and doc["signal"] == "SIGSEGV"
    assert (doc["seed"], doc["index"]) == (4, 25)
    case = fuzz.case_from_json(doc["case"])
    assert case == fuzz.generate_case(4, 25)       # image bytes, registers, entry points, vCPUs
    assert doc["mode"] == case["mode"] and doc["vcpus"] == len(case["vcpus"]) >= 1
    assert "Segmentation fault" in doc["stderr"]    # faulthandler's stack of the dead worker
    # replaying the reproducer crashes the (supervised) worker again, and says so
    rc, r, err = fuzz_json("--replay", f["file"], "--out", str(tmp_path / "again"))
    assert rc == 1 and r["finding"] == "crash" and r["reproduced"] is True


def test_hang_and_unexpected_exception_are_findings(tmp_path):
    rc, s, err = fuzz_json("--runs", "40", "--seed", "4", "--jobs", "1", "--out", str(tmp_path),
                           "--_inject", "raise@7", "--_inject", "hang@20")
    assert rc == 1
    assert (s["hangs"], s["exceptions"], s["crashes"], s["leaks"]) == (1, 1, 0, 0)
    by_kind = {f["kind"]: f for f in s["findings"]}
    assert by_kind["exception"]["index"] == 7 and "_Injected" in by_kind["exception"]["detail"]
    assert by_kind["hang"]["index"] == 20
    hang = json.loads(open(by_kind["hang"]["file"]).read())
    assert "_injections" in hang["stderr"]          # where the worker was stuck
    assert s["runs"] == 40 and sum(s["outcomes"].values()) == 38
    rc, r, err = fuzz_json("--replay", by_kind["exception"]["file"], "--out", str(tmp_path / "r"))
    assert rc == 1 and r["finding"] == "exception" and r["reproduced"] is True


def test_fd_leak_is_a_finding(tmp_path):
    rc, s, err = fuzz_json("--runs", "150", "--seed", "4", "--jobs", "1", "--modes", "long",
                           "--deadline", "0.01", "--out", str(tmp_path), "--_inject", "leakfd@50",
                           "--_warmup", "20", "--_check-interval", "0.1")
    assert rc == 1 and s["leaks"] >= 1 and (s["crashes"], s["hangs"]) == (0, 0)
    leak = json.loads(open(s["findings"][0]["file"]).read())
    assert leak["resource"] == "fds" and leak["value"] > leak["baseline"] + supervisor.FD_SLACK
    assert leak["start"] <= 50 < leak["stop"]


@pytest.mark.parametrize("args, message", [
    (("--runs", "0"), "--runs"), (("--runs", "-3"), "--runs"), (("--deadline", "nan"), "--deadline"),
    (("--deadline", "-1"), "--deadline"), (("--jobs", "0"), "--jobs"),
    (("--modes", "real,bogus"), "--modes"), (("--max-vcpus", "0"), "--max-vcpus"),
    (("--seed", "x"), "--seed"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    rc, out, err = fuzz_cli(*args)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def _children(pid: int) -> list:
    """The pids of ``pid``'s child processes (Linux /proc), [] once it is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids: list = []
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                kids += f.read().split()
        except OSError:
            pass
    return kids


def test_ctrl_c_prints_the_summary_so_far_and_exits_130():
    p = subprocess.Popen([sys.executable, "-m", "pykvm.fuzz", "--runs", "100000", "--seed", "8",
                          "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Ctrl-C once the runs are under way (the supervisor has started a worker process): the
    # start-up alone (imports, the first VM) can take more than a few seconds on a loaded host
    # or under ASan, and a Ctrl-C before any run ends it with one line and no summary
    end = time.monotonic() + 120
    while time.monotonic() < end and p.poll() is None and not _children(p.pid):
        time.sleep(0.1)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    assert "(interrupted)" in out and "crashes: 0" in out and "hangs: 0" in out
