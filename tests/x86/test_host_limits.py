"""Host-side failures are the host's, typed and named (issue 16, fault 8): real limits in child
processes — RLIMIT_NOFILE (``ulimit -n``), RLIMIT_AS (``ulimit -v``: a vCPU thread cannot
start), a memory cgroup at its limit with the OOM killer off (guest RAM the host cannot back)
— and vCPU counts a machine cannot describe, refused before anything is created."""
import json
import os
import subprocess
import sys
import uuid

import pytest

from pykvm import status
from pykvm.machine import Machine

from _elfguest import elf_guest

HERE = os.path.dirname(os.path.abspath(__file__))
SPIN = "1:  jmp 1b"
TOUCH = """
    mov rbx, 0x400000
1:  mov qword ptr [rbx], rbx
    add rbx, 4096
    cmp rbx, 0x3f000000
    jb 1b
    hlt
"""


def _child(code: str, *args: str, timeout: int = 60, env=None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       timeout=timeout, cwd=HERE, env=env)
    assert r.stdout.strip(), r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


NOFILE = r"""
import json, resource, sys
from pykvm.machine import Machine
from pykvm.errors import HostResourceError
lim = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (lim, lim))
try:
    with Machine(sys.argv[1], vcpus=4) as m:
        r = m.run(timeout=0.1)
        out = {"ran": r.exit}
except Exception as e:
    out = {"type": type(e).__name__, "host": isinstance(e, HostResourceError),
           "resource": getattr(e, "resource", None), "msg": str(e)}
print(json.dumps(out))
"""


def test_out_of_file_descriptors_is_a_host_resource_error_at_every_step(tmp_path):
    """Each limit runs out at another step (image, /dev/kvm, KVM_CREATE_VM, KVM_CREATE_VCPU):
    each is a HostResourceError naming file descriptors and the limit, in one line."""
    path = elf_guest(tmp_path, SPIN)
    failures = 0
    for lim in range(3, 12):
        out = _child(NOFILE, path, str(lim))
        if "ran" in out:
            assert out["ran"] == "timeout"
            continue
        failures += 1
        assert out["host"] and out["resource"] == "file descriptors", out
        assert "ulimit -n" in out["msg"] and "\n" not in out["msg"], out
    assert failures >= 3


THREADS = r"""
import json, resource, sys
from pykvm.machine import Machine
m = Machine(sys.argv[1], vcpus=4)
with open("/proc/self/status") as f:
    size = next(int(l.split()[1]) for l in f if l.startswith("VmSize")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (9 << 20), resource.RLIM_INFINITY))
r = m.run(timeout=0.5)
print(json.dumps({"exit": r.exit, "code": r.exit_code, "detail": r.detail,
                  "resource": getattr(r.error, "resource", None)}))
"""


def test_a_vcpu_thread_that_cannot_start_is_a_vmm_error_naming_threads(tmp_path):
    path = elf_guest(tmp_path, SPIN)
    out = _child(THREADS, path)
    if out["exit"] == "timeout":
        pytest.skip("every vCPU thread started within the address-space limit")
    assert (out["exit"], out["code"]) == ("vmm_error", status.VMM_ERROR), out
    assert out["resource"] == "threads" and "out of threads" in out["detail"], out
    assert "\n" not in out["detail"]


# The child joins the cgroup once its machine exists, so that what the limit meets is the guest
# touching its RAM, not the interpreter starting (under ASan the process itself is larger, and
# with the OOM killer off an allocation over the limit would wait for ever). For the same
# reason it keeps headroom in Python's allocator for what runs after the limit is met (the exit,
# the verdict, the JSON line): free slots in pools of every small size class, made before it
# joins. Without them the first fresh pool page (pymalloc_pool_extend) waits in
# mem_cgroup_oom_synchronize for ever, whichever code asks for it.
CGROUP = r"""
import json, os, sys
from pykvm.machine import Machine
from pykvm.testing.reference_loop import ReferenceLoop
loop = None if sys.argv[3] == "c" else ReferenceLoop
cushion = [bytes(n) for _ in range(64) for n in range(1, 512, 8)]
del cushion[::2]                      # every second one freed: slots in pools already faulted in
with Machine(sys.argv[1], mem_size=1 << 30, loop=loop) as m:
    with open(os.path.join(sys.argv[2], "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    r = m.run(timeout=30)
print(json.dumps({"exit": r.exit, "code": r.exit_code, "detail": r.detail}))
"""
MEMCG = "/sys/fs/cgroup/memory"


@pytest.fixture
def memcg():
    """A memory cgroup (v1) of 120 MiB with the OOM killer off, removed afterwards."""
    if not os.access(os.path.join(MEMCG, "cgroup.procs"), os.W_OK):
        pytest.skip("no writable cgroup-v1 memory controller here")
    path = os.path.join(MEMCG, f"pykvm-test-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(path)
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup: {e}")
    try:
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(120 << 20))
        with open(os.path.join(path, "memory.oom_control"), "w") as f:
            f.write("1")
        yield path
    finally:
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except OSError:
                import time
                time.sleep(0.1)


@pytest.mark.parametrize("loop", ["c", "py"])
def test_guest_ram_the_host_cannot_back_is_a_vmm_error(tmp_path, memcg, loop):
    path = elf_guest(tmp_path, TOUCH)
    out = _child(CGROUP, path, memcg, loop, timeout=90)
    assert (out["exit"], out["code"]) == ("vmm_error", status.VMM_ERROR), out
    assert "host could not back guest RAM at GPA 0x" in out["detail"], out
    assert "memory limit" in out["detail"]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("opts,limit", [({"machine": "pc"}, "255"), ({}, "64"),
                                        ({"irqchip": True}, "64")])
def test_more_vcpus_than_the_machine_describes_is_refused_up_front(tmp_path, opts, limit):
    path = elf_guest(tmp_path, SPIN)
    from pykvm.kvm import Kvm
    with Kvm() as kvm:
        before = _fds()
        with pytest.raises(ValueError, match=f"256 vCPUs requested; .* at most {limit}"):
            Machine(path, vcpus=256, kvm=kvm, **opts)
        assert _fds() == before                     # no VM, vCPU or eventfd was made


def test_the_pc_machine_takes_255_vcpus(tmp_path):
    path = elf_guest(tmp_path, SPIN)
    with Machine(path, vcpus=255, machine="pc") as m:
        assert len(m.vcpus) == 255
