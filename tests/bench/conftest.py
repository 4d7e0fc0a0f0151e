def pytest_terminal_summary(terminalreporter):
    """Show the benchmark ratios (measured against baselines in the same run)."""
    import sys
    mod = sys.modules.get("test_bench") or sys.modules.get("tests.bench.test_bench")
    for res in getattr(mod, "RESULTS", []):
        e, m = res["exit_loop"], res["memory"]
        terminalreporter.section("pykvm benchmarks (ratios within this run)")
        terminalreporter.write_line(
            f"exit loop, {e['exits']} console exits: Python loop / C loop = "
            f"{e['ratio_py_over_c']}x ({e['py_loop_us_per_exit']} vs {e['c_loop_us_per_exit']} "
            f"us/exit); C-served exit / bare KVM_RUN ioctl = {e['ratio_c_exit_over_ioctl']}x")
        terminalreporter.write_line(
            f"memory per VM: Machine / raw VM = {m['ratio_machine_over_raw']}x "
            f"({m['machine_kib']} vs {m['raw_vm_kib']} KiB)")
