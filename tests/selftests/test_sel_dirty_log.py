"""Port of tools/testing/selftests/kvm/dirty_log_test.c, modes "dirty-log" (KVM_GET_DIRTY_LOG) and
"clear-log" (KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): while
the guest writes the iteration number into random pages of a logged slot, the host collects the
dirty log every 10 ms, stops the guest at its next SYNC and checks every page: a dirty page holds
this iteration or the previous one; a clean one holds at most this iteration, and if it holds
exactly this one, its bit must be set in the next iteration's log.

Bounded where the C test is not: 16 MiB + 3 pages (C: 1 GiB + 3 pages) and 8 iterations (C: 32).
On this host every guest instruction is emulated, and the C test's first pass over 262147
pages takes most of its run (docs/selftests.md). The dirty-ring mode is not ported: the C test
fails it on this host on a race-dependent check (docs/selftests.md)."""
import threading
import time

import pytest

from pykvm.abi import DIRTY_LOG_INITIALLY_SET, DIRTY_LOG_MANUAL_PROTECT_ENABLE, ffi

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
TEST_MEM = 0xC0000000             # DEFAULT_GUEST_TEST_MEM (identity-mapped here, gva = gpa)
PAGES = (16 << 20 >> 12) + 3      # C: (1 << (DIRTY_MEM_BITS - 12)) + 3, DIRTY_MEM_BITS 30
ITERATIONS = 8                    # C: TEST_HOST_LOOP_N 32
INTERVAL = 0.010                  # TEST_HOST_LOOP_INTERVAL, 10 ms


@pytest.mark.parametrize("mode", ["dirty-log", "clear-log"])
def test_dirty_log(kvm, guest_vm, mode):
    if mode == "clear-log":
        caps = kvm.check_extension("MANUAL_DIRTY_LOG_PROTECT2")
        if not caps:
            pytest.skip("pykvm: host lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
    m = guest_vm("sel_dirty_log.c")
    if mode == "clear-log":
        m.vm.enable_cap("MANUAL_DIRTY_LOG_PROTECT2",
                        caps & (DIRTY_LOG_MANUAL_PROTECT_ENABLE | DIRTY_LOG_INITIALLY_SET))
    slot = m.vm.add_memory(TEST_MEM, PAGES * 4096, log_dirty=True)
    values = memoryview(ffi.buffer(ffi.cast("char *", slot.host_addr), slot.size)).cast("Q")[::512]
    m.set_params(TEST_MEM, PAGES)
    iteration = 1
    m.globals["iteration"] = iteration

    quit_ = False
    stop_requested = threading.Event()
    stopped, cont = threading.Semaphore(0), threading.Semaphore(0)
    failure = []

    def vcpu_worker():
        try:
            while not quit_:
                m.sync(stage=1, timeout=60)
                if stop_requested.is_set():          # vcpu_handle_sync_stop()
                    stop_requested.clear()
                    stopped.release()
                    cont.acquire()
        except BaseException as e:                   # noqa: BLE001 — reported by the main thread
            failure.append(e)
            stopped.release()

    worker = threading.Thread(target=vcpu_worker, daemon=True)
    worker.start()
    track = set()                                    # host_bmap_track
    dirty_count = clear_count = track_next_count = 0
    try:
        while iteration < ITERATIONS:
            time.sleep(INTERVAL)
            dirty = {(gpa - TEST_MEM) >> 12 for gpa in m.vm.get_dirty_log(slot)}
            if mode == "clear-log":
                m.vm.clear_dirty_log(slot, [TEST_MEM + (p << 12) for p in dirty])
            stop_requested.set()
            assert stopped.acquire(timeout=120), "the guest never reached its next SYNC"
            if failure:
                raise failure[0]
            for page in range(PAGES):                # vm_dirty_log_verify()
                value = values[page]
                if page in track:
                    track.discard(page)
                    track_next_count += 1
                    assert page in dirty, f"Page {page} should have its dirty bit set in " \
                                          f"this iteration but it is missing"
                if page in dirty:
                    dirty_count += 1
                    assert value in (iteration, iteration - 1), \
                        f"Set page {page} value {value} incorrect (iteration={iteration})"
                else:
                    clear_count += 1
                    assert value <= iteration, \
                        f"Clear page {page} value {value} incorrect (iteration={iteration})"
                    if value == iteration:
                        track.add(page)
            iteration += 1
            if iteration == ITERATIONS:
                quit_ = True
            m.globals["iteration"] = iteration
            cont.release()
    finally:
        quit_ = True
        cont.release()
        if failure or iteration < ITERATIONS:
            m.kick_all()                             # a failed check: end the guest's run
        worker.join(timeout=60)
    assert not failure, failure
    assert dirty_count and clear_count, (dirty_count, clear_count, track_next_count)
