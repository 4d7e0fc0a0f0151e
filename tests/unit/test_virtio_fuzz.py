"""The device fuzzer's virtio mode (pykvm.fuzz.virtio_generator / virtio_runner, ``python -m
pykvm.fuzz --virtio``): a fixed-seed budget of hostile-driver cases against every target
(virtio-mmio and virtio-pci x rng, blk, read-only blk, console) keeps every invariant, the
cases really reach the devices, cases round-trip through JSON, the command line runs virtio
targets under the supervisor, and regression tests for what the fuzzing found."""
import json
import os
import struct
import subprocess
import sys
import threading
import time

import pytest

from pykvm.devices.virtio import STATUS_DEVICE_NEEDS_RESET
from pykvm.devices.virtio import mmio as M
from pykvm.devices.virtio.console import VirtioConsole
from pykvm.fuzz import cases, virtio_generator as G, virtio_runner as R
from pykvm.kvm import Kvm

pytestmark = pytest.mark.requires_kvm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUDGET = 96                     # cases (12 per target on average): a few seconds


@pytest.fixture(scope="module")
def kvm():
    k = Kvm()
    yield k
    k.close()


def test_fixed_seed_budget_keeps_every_invariant(kvm):
    outcomes, used, ops = {}, {}, 0
    for i in range(BUDGET):
        case = G.generate_case(1, i)
        r = R.run_case(kvm, case)
        assert "finding" not in r, (i, case["mode"], r["finding"]["detail"])
        assert r["outcome"] in ("done", "needs_reset")
        outcomes.setdefault(case["mode"], set()).add(r["outcome"])
        used[case["mode"]] = used.get(case["mode"], 0) + r["used"]
        ops += r["ops"]
    assert set(outcomes) == set(G.MODES)              # every target drawn
    # both endings seen on each transport, and every target's device returned chains
    for t in G.TRANSPORTS:
        seen = set().union(*(o for m, o in outcomes.items() if m.startswith(t)))
        assert seen == {"done", "needs_reset"}, (t, seen)
    assert all(used[m] > 0 for m in G.MODES), used
    assert ops > 10 * BUDGET


def test_cases_are_pure_and_round_trip_through_json():
    a, b = G.generate_case(5, 17), G.generate_case(5, 17)
    assert a == b
    assert G.generate_case(5, 18) != a
    doc = json.loads(json.dumps(cases.case_to_json(a)))
    assert cases.is_virtio_case(doc) and not cases.is_device_case(doc)
    assert cases.case_from_json(doc) == a
    assert cases.generate({"seed": 5, "modes": list(G.MODES), "max_vcpus": 1,
                           "deadline": G.DEFAULT_DEADLINE, "virtio": True}, 17) == a
    only = G.generate_case(5, 17, modes=("pci-console",))
    assert only["mode"] == "pci-console"
    with pytest.raises(ValueError):
        cases.case_from_json(dict(doc, mode="isa-rng"))


def _init_ops(target_queue_size=8):
    """A correct virtio-mmio initialisation of an rng with one queue at 0x10000."""
    base = G.MMIO_BASE
    w = lambda off, v: ["w", base + off, 4, v]          # noqa: E731
    return [w(M.STATUS, 0), w(M.STATUS, 1), w(M.STATUS, 3), w(M.DRIVER_FEATURES_SEL, 1),
            w(M.DRIVER_FEATURES, 1), w(M.STATUS, 11), w(M.QUEUE_SEL, 0),
            w(M.QUEUE_NUM, target_queue_size), w(M.QUEUE_DESC_LOW, 0x10000),
            w(M.QUEUE_DRIVER_LOW, 0x11000), w(M.QUEUE_DEVICE_LOW, 0x12000),
            w(M.QUEUE_READY, 1), w(M.STATUS, 15)]


def _case(mode, ops):
    return {"format": G.CASE_FORMAT, "seed": 0, "index": 0, "mode": mode, "deadline": 5.0,
            "image_sectors": 8, "vcpus": [{"ops": ops}], "blobs": []}


def test_a_valid_request_is_served_and_a_looping_chain_needs_reset(kvm):
    desc = lambda i, a, n, f, nx: ["mem", 0x10000 + 16 * i,          # noqa: E731
                                   struct.pack("<QIHH", a, n, f, nx).hex()]
    avail = lambda idx, head: [["mem", 0x11004 + 2 * ((idx - 1) % 8),  # noqa: E731
                                struct.pack("<H", head).hex()],
                               ["mem", 0x11000, struct.pack("<HH", 0, idx).hex()]]
    notify = ["w", G.MMIO_BASE + M.QUEUE_NOTIFY, 4, 0]
    good = _init_ops() + [desc(0, 0x80000, 64, 2, 0)] + avail(1, 0) + [notify]
    r = R.run_case(kvm, _case("mmio-rng", good))
    assert "finding" not in r and r["outcome"] == "done" and r["used"] == 1
    assert r["interrupts"] == 1
    loop = good + [desc(1, 0x80000, 64, 3, 2), desc(2, 0x80100, 64, 3, 1)] + avail(2, 1) + \
        [notify]
    r = R.run_case(kvm, _case("mmio-rng", loop))
    assert "finding" not in r and r["outcome"] == "needs_reset" and r["used"] == 1


def test_read_only_disk_image_is_checked_unchanged(kvm):
    # an OUT request to a read-only disk: refused, and the runner hashed the image around it
    ops = _init_ops()
    hdr, data, st = 0x80000, 0x80100, 0x80400
    ops += [["mem", hdr, struct.pack("<IIQ", 1, 0, 0).hex()], ["mem", data, (b"\xAA" * 512).hex()],
            ["mem", 0x10000, struct.pack("<QIHHQIHHQIHH", hdr, 16, 1, 1, data, 512, 1, 2,
                                         st, 1, 2, 0).hex()],
            ["mem", 0x11004, struct.pack("<H", 0).hex()],
            ["mem", 0x11000, struct.pack("<HH", 0, 1).hex()],
            ["w", G.MMIO_BASE + M.QUEUE_NOTIFY, 4, 0], ["r", G.MMIO_BASE + M.STATUS, 4]]
    r = R.run_case(kvm, _case("mmio-blk-ro", ops))
    assert "finding" not in r and r["outcome"] == "done" and r["used"] == 1


def test_cli_runs_virtio_targets_under_the_supervisor(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pykvm.fuzz", "--virtio", "--runs", "24",
                        "--jobs", "1", "--seed", "3", "--modes", "mmio-console,pci-blk",
                        "--json", "--quiet", "--out", str(tmp_path / "findings")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["virtio"] is True and s["runs"] == 24 and s["findings"] == []
    assert set(s["outcomes_by_mode"]) <= {"mmio-console", "pci-blk"}
    assert sum(s["outcomes"].values()) == 24
    bad = subprocess.run([sys.executable, "-m", "pykvm.fuzz", "--virtio", "--modes", "long",
                          "--out", str(tmp_path / "f2")], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "virtio mode runs the targets" in bad.stderr


def test_console_input_meeting_a_broken_receive_ring_does_not_deadlock_a_vcpu(kvm):
    """Regression (found reviewing the console for the fuzzer): host input that met a broken
    receive ring called needs_reset() -- which takes the transport's lock -- while holding the
    console's own lock, and a vCPU notifying queue 0 holds the transport's lock while it waits
    for the console's: the two threads deadlocked."""
    with kvm.create_vm() as vm:
        vm.add_memory(0, 1 << 20)
        mem = vm.memory
        con = VirtioConsole(lambda b: None)
        t = M.VirtioMmio(con, mem, set_irq=lambda level: None)
        w = lambda off, v: t.write(off, 4, v)            # noqa: E731
        for off, v in ((M.STATUS, 3), (M.DRIVER_FEATURES_SEL, 1), (M.DRIVER_FEATURES, 1),
                       (M.STATUS, 11)):
            w(off, v)
        for qi, base in ((0, 0x1000), (1, 0x4000)):
            for off, v in ((M.QUEUE_SEL, qi), (M.QUEUE_NUM, 8), (M.QUEUE_DESC_LOW, base),
                           (M.QUEUE_DRIVER_LOW, base + 0x1000),
                           (M.QUEUE_DEVICE_LOW, base + 0x2000), (M.QUEUE_READY, 1)):
                w(off, v)
        w(M.STATUS, 15)
        mem.write(0x2000 + 2, struct.pack("<H", 100))     # receiveq: avail idx 100 ahead
        state = {}

        def vcpu():                        # holds the transport's lock, then notifies queue 0
            with t.lock:
                state["held"] = True
                end = time.monotonic() + 0.5
                while not con._rx_lock.locked() and time.monotonic() < end:
                    time.sleep(0.001)
                time.sleep(0.05)
                w(M.QUEUE_NOTIFY, 0)
            state["vcpu"] = True

        def host():
            while not state.get("held"):
                time.sleep(0.001)
            con.feed(b"x")
            state["host"] = True

        threads = [threading.Thread(target=f, daemon=True) for f in (vcpu, host)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        assert state.get("vcpu") and state.get("host"), "deadlocked"
        assert t.status & STATUS_DEVICE_NEEDS_RESET
        t.close()


def _console_on_mmio(mem, on_output, qsize=8):
    """A virtio-console behind virtio-mmio, set up and running: receiveq rings at 0x1000,
    transmitq rings at 0x4000 (descriptor table, +0x1000 available, +0x2000 used)."""
    con = VirtioConsole(on_output)
    t = M.VirtioMmio(con, mem, set_irq=lambda level: None)
    for off, v in ((M.STATUS, 3), (M.DRIVER_FEATURES_SEL, 1), (M.DRIVER_FEATURES, 1),
                   (M.STATUS, 11)):
        t.write(off, 4, v)
    for qi, base in ((0, 0x1000), (1, 0x4000)):
        for off, v in ((M.QUEUE_SEL, qi), (M.QUEUE_NUM, qsize), (M.QUEUE_DESC_LOW, base),
                       (M.QUEUE_DRIVER_LOW, base + 0x1000), (M.QUEUE_DEVICE_LOW, base + 0x2000),
                       (M.QUEUE_READY, 1)):
            t.write(off, 4, v)
    t.write(M.STATUS, 4, 15)
    return con, t


def test_console_output_per_notification_is_bounded(kvm):
    """Regression (found by the fuzzer, seed 1): transmit chains whose descriptors all name
    the same 512 KiB of guest RAM asked the host for 256 x 512 KiB per chain, times every
    entry of the available ring -- 32 GiB of output for one notification, minutes of one
    vCPU under the transport's lock. Now at most OUTPUT_BUDGET bytes go out per notification;
    every chain is still returned, the rest is counted as dropped."""
    from pykvm.devices.virtio.console import OUTPUT_BUDGET
    size, span = 256, 512 << 10
    got = []
    with kvm.create_vm() as vm:
        vm.add_memory(0, 1 << 20)
        mem = vm.memory
        con, t = _console_on_mmio(mem, lambda b: got.append(len(b)), qsize=size)
        table = b"".join(struct.pack("<QIHH", 0x80000, span, 1 if j < size - 1 else 0, j + 1)
                         for j in range(size))
        mem.write(0x4000, table)
        mem.write(0x5004, struct.pack("<H", 0) * size)           # every entry: chain 0
        mem.write(0x5000, struct.pack("<HH", 0, size))
        t.write(M.QUEUE_NOTIFY, 4, 1)
        assert sum(got) == con.output_bytes == OUTPUT_BUDGET
        assert con.output_dropped == size * size * span - OUTPUT_BUDGET
        assert struct.unpack("<H", mem.read(0x6002, 2))[0] == size     # all returned
        assert not t.status & STATUS_DEVICE_NEEDS_RESET
        t.close()
