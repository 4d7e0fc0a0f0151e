"""The device fuzzer (``python -m pykvm.fuzz --devices``) on the real /dev/kvm: a seeded quick run
drives every device of the PC machine with no finding, and every kind of finding the device mode
claims to detect — a crash, a hang, an unexpected exception, an fd leak, a guest-caused VMM error
and host CPU over the per-access bound — is produced on purpose through the hidden ``--_inject``
hook, saved as a reproducer and reproduced by ``--replay``."""
import json
import os
import subprocess
import sys

import pytest

from pykvm import Kvm
from pykvm import fuzz
from pykvm.fuzz import device_generator, device_runner

# the device mode drives the x86 PC machine (a RISC-V host refuses it: see the last test)
pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fuzz_cli(*args, timeout=180):
    p = subprocess.run([sys.executable, "-m", "pykvm.fuzz", *args], cwd=ROOT, timeout=timeout,
                       capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def fuzz_json(*args, timeout=180):
    rc, out, err = fuzz_cli("--json", "--quiet", *args, timeout=timeout)
    assert "Traceback" not in err, err
    return rc, json.loads(out), err


def test_seeded_quick_run_of_the_device_mode_finds_nothing(tmp_path):
    rc, s, err = fuzz_json("--devices", "--runs", "400", "--seed", "1", "--jobs", "2",
                           "--out", str(tmp_path))
    sigs = s["finding_signatures"]
    assert rc == 0 and s["findings"] == [], (sigs, s["findings"][:3], err)
    assert s["devices"] is True and s["runs"] == 400 and sum(s["outcomes"].values()) == 400
    assert (s["crashes"], s["hangs"], s["leaks"], s["exceptions"], s["vmm_errors"],
            s["cpu_overruns"]) == (0, 0, 0, 0, 0, 0)
    assert not os.listdir(tmp_path)
    # most guests finish their operations; others reset, sleep, fault or time out
    assert s["outcomes"].get("done", 0) > 200, s["outcomes"]
    assert len(s["outcomes"]) >= 4, s["outcomes"]
    assert {"reset", "poweroff", "s3_resumed"} & set(s["outcomes"]), s["outcomes"]
    for mode in device_generator.MODES:
        assert sum(s["outcomes_by_mode"][mode].values()) > 100, s["outcomes_by_mode"]
    assert s["stops"].get("IO", 0) > 5000 and s["stops"].get("MMIO", 0) > 2000, s["stops"]


def _index_with_device_exits(seed: int, start: int) -> int:
    """An index whose case sends vCPU 0 to a port pykvm serves in Python (an exit the injected
    handlers see) before anything that ends the machine."""
    for i in range(start, start + 200):
        c = device_generator.generate_case(seed, i)
        ops = c["vcpus"][0]["ops"]
        if ops and ops[0][0] in ("out", "in") and ops[0][1] in (0x70, 0x71, 0xCF8, 0xCFC, 0x510) \
                and c["native"] and len(c["vcpus"]) == 1:
            return i
    raise AssertionError("no such case")


def test_each_injected_finding_kind_is_saved_and_replays(tmp_path):
    seed = 7
    vmm = _index_with_device_exits(seed, 3)
    cpu = _index_with_device_exits(seed, vmm + 1)
    inject = {"crash": 1, "exception": 2, "vmm_error": vmm, "cpu": cpu}
    rc, s, err = fuzz_json("--devices", "--runs", str(cpu + 3), "--seed", str(seed), "--jobs", "1",
                           "--out", str(tmp_path), "--_inject", "crash@1", "--_inject", "raise@2",
                           "--_inject", f"vmmerror@{vmm}", "--_inject", f"cpu@{cpu}")
    assert rc == 1, err
    by_kind = {f["kind"]: f for f in s["findings"]}
    assert set(by_kind) == set(inject), s["findings"]
    assert (s["crashes"], s["exceptions"], s["vmm_errors"], s["cpu_overruns"]) == (1, 1, 1, 1)
    for kind, index in inject.items():
        f = by_kind[kind]
        assert f["index"] == index and os.path.isfile(f["file"]), f
        doc = json.loads(open(f["file"]).read())
        assert doc["kind"] == kind and doc["generator"].get("devices") is True
        case = fuzz.case_from_json(doc["case"])
        assert case == device_generator.generate_case(seed, index)
        rc, r, err = fuzz_json("--replay", f["file"], "--out", str(tmp_path / f"again-{kind}"))
        assert rc == 1 and r["finding"] == kind and r["reproduced"] is True, (kind, r, err)
    assert "injected exit-handler failure" in by_kind["vmm_error"]["detail"]
    assert "status 8" in by_kind["vmm_error"]["detail"]
    assert "ms per access" in by_kind["cpu"]["detail"]
    assert any(sig.startswith("vmm_error: RuntimeError at") for sig in s["finding_signatures"])


def test_hang_and_leak_in_device_mode(tmp_path):
    rc, s, err = fuzz_json("--devices", "--runs", "80", "--seed", "3", "--jobs", "1",
                           "--out", str(tmp_path), "--_inject", "hang@4", "--_inject", "leakfd@30",
                           "--_warmup", "10", "--_check-interval", "0.1")
    assert rc == 1, err
    kinds = {f["kind"] for f in s["findings"]}
    assert {"hang", "leak"} <= kinds and s["crashes"] == 0, s["findings"]
    hang = next(f for f in s["findings"] if f["kind"] == "hang")
    assert hang["index"] == 4
    rc, r, err = fuzz_json("--replay", hang["file"], "--out", str(tmp_path / "r"))
    assert rc == 1 and r["finding"] == "hang" and r["reproduced"] is True
    leak = next(f for f in s["findings"] if f["kind"] == "leak")
    doc = json.loads(open(leak["file"]).read())
    assert doc["resource"] == "fds" and doc["start"] <= 30 < doc["stop"]
    assert doc["generator"]["devices"] is True
    rc, r, err = fuzz_json("--replay", leak["file"], "--out", str(tmp_path / "l"))
    assert rc == 1 and r["reproduced"] is True and r["devices"] is True


def test_device_case_replays_to_its_outcome(tmp_path):
    with Kvm() as kvm:
        for index in range(50):
            case = device_generator.generate_case(2, index, max_vcpus=1)
            res = device_runner.run_case(kvm, case)
            if res["outcome"] == "done" and not res.get("finding"):
                break
        else:
            pytest.fail("no case finished its operations among 50")
    assert res["exits"] > 0 and 0 <= res["cpu"] <= res["cpu_bound"]
    path = tmp_path / "case.json"
    path.write_text(json.dumps(fuzz.case_to_json(case)))
    rc, r, err = fuzz_json("--replay", str(path), "--out", str(tmp_path / "f"))
    assert rc == 0 and r["outcome"] == "done" and r["finding"] is None, (r, err)
    assert (r["seed"], r["index"]) == (2, index)


@pytest.mark.parametrize("args, message", [
    (("--devices", "--modes", "real"), "--modes"),
    (("--devices", "--modes", "long,real"), "--modes"),
    (("--devices", "--deadline", "0"), "--deadline"),
    (("--devices", "--runs", "0"), "--runs"),
])
def test_bad_device_mode_arguments_are_one_line_errors(args, message):
    rc, out, err = fuzz_cli(*args)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_help_documents_the_device_mode():
    rc, out, err = fuzz_cli("--help")
    assert rc == 0 and "--devices" in out and "2 ms of CPU per access" in " ".join(out.split())


# Cases the long run (docs/fuzzing.md, seed 1) found before their fixes: a guest-written RTC
# date past year 9999 (a register value over a byte), and two vCPUs taking the machine to S3
# at once (the wake set the state of a vCPU another thread was running: Busy).
LONG_RUN_FINDINGS = [(1, 349), (1, 2637), (1, 6072)]


@pytest.mark.parametrize("seed,index", LONG_RUN_FINDINGS)
def test_long_run_findings_stay_fixed(seed, index):
    case = device_generator.generate_case(seed, index)
    with Kvm() as kvm:
        for _ in range(3):                          # interleavings vary from run to run
            r = device_runner.run_case(kvm, case)
            assert "finding" not in r, r["finding"]["detail"]
