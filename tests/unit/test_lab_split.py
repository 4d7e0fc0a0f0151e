"""Which lab boot runs which inner tests (pykvm/lab/build.py ``split_tests``): tests that compare
pykvm with QEMU inside the lab get a boot of their own whose initrd carries that QEMU."""
from pykvm.lab.build import NESTED, RISCV, split_tests

BENCH = "tests/nested/test_blk_bench_nested.py"
NET_BENCH = "tests/nested/test_net_fs_bench_nested.py"
IGNORED = [f"--ignore={BENCH}", f"--ignore={NET_BENCH}"]


def test_a_folder_above_a_qemu_test_keeps_the_rest_and_sends_that_test_to_its_own_boot():
    main, qemu = split_tests(NESTED, ["tests/nested", "tests/lab/inner_smoke"])
    assert main == ["tests/nested", *IGNORED, "tests/lab/inner_smoke"]
    assert qemu == [BENCH, NET_BENCH]
    main, qemu = split_tests(NESTED, ["tests"])
    assert main == ["tests", *IGNORED] and qemu == [BENCH, NET_BENCH]


def test_a_qemu_test_named_alone_or_by_node_id_runs_only_in_the_qemu_boot():
    assert split_tests(NESTED, [BENCH]) == ([], [BENCH])
    node = f"{BENCH}::test_virtio_blk_throughput_against_qemu"
    assert split_tests(NESTED, [node, "tests/nested/test_linux.py"]) == (["tests/nested/test_linux.py"], [node])


def test_tests_elsewhere_leave_the_qemu_boot_out():
    assert split_tests(RISCV, ["tests/riscv/test_riscv.py"]) == (["tests/riscv/test_riscv.py"], [])
    assert split_tests(RISCV, ["tests/riscvx"]) == (["tests/riscvx"], [])    # a prefix is no folder
    main, qemu = split_tests(RISCV, ["tests/riscv/"])
    assert qemu == ["tests/riscv/test_blk_bench_riscv.py", "tests/riscv/test_net_fs_bench_riscv.py"]
    assert main[0] == "tests/riscv/"


def test_paths_are_normalised_before_they_are_split():
    from pykvm.lab.build import CHECKOUT
    for spelled in ("./tests/nested", "tests//nested/", str(CHECKOUT / "tests/nested")):
        main, qemu = split_tests(NESTED, [spelled])
        assert qemu == [BENCH, NET_BENCH] and f"--ignore={BENCH}" in main, spelled
    assert split_tests(NESTED, [f"./{BENCH}", BENCH, f"{BENCH}/"]) == ([], [BENCH])
    assert split_tests(NESTED, ["tests/nested", BENCH])[1] == [BENCH, NET_BENCH]      # once each


def test_later_riscv_boots_ignore_the_once_tests_and_are_left_out_when_nothing_else_remains():
    from pykvm.lab.build import later_boot_args
    main, _ = split_tests(RISCV, ["tests/riscv", "tests/lab/inner_smoke"])
    more = later_boot_args(RISCV, main)
    assert more[:len(main)] == main
    assert {a.removeprefix("--ignore=").removeprefix("--deselect=")
            for a in more[len(main):]} == set(RISCV.once_tests)
    node = next(o for o in RISCV.once_tests if "::" in o)
    assert f"--deselect={node}" in more and f"--ignore={node}" not in more
    assert later_boot_args(RISCV, [node]) == []                      # a node id named alone
    kept = later_boot_args(RISCV, [node.partition("::")[0]])         # its file: the rest runs
    assert kept[0] == node.partition("::")[0] and f"--deselect={node}" in kept
    one = "tests/riscv/test_linux_sandbox_riscv.py"
    assert one in RISCV.once_tests
    assert later_boot_args(RISCV, [one]) == []                       # the first model's alone
    assert later_boot_args(RISCV, [one + "::test_x", "./" + one]) == []
    named = later_boot_args(RISCV, [one, "tests/riscv/test_riscv.py::test_x", "-k", "x"])
    assert named[:3] == ["tests/riscv/test_riscv.py::test_x", "-k", "x"]   # the file named: out
    assert all(a.startswith(("--ignore=", "--deselect=")) for a in named[3:])
    assert later_boot_args(NESTED, main) == main                      # no once_tests there


def test_a_panicked_lab_kernel_is_told_from_a_console_that_just_stopped(tmp_path):
    from pykvm.lab.build import _l1_panicked
    log = tmp_path / "serial-nested-qemu.log"
    assert not _l1_panicked(log)                                     # no log yet
    log.write_bytes(b"[  200.8] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n"
                    b"[  200.9] Kernel panic - not syncing: Fatal exception in interrupt\n")
    assert _l1_panicked(log)
    log.write_bytes(b"[  200.8] reboot: Power down\n")
    assert not _l1_panicked(log)
