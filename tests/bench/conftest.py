def pytest_terminal_summary(terminalreporter):
    """Show the benchmark ratios (measured against baselines in the same run) and the limits the
    project holds them to; the tests assert their shape, not their values."""
    import sys
    mod = sys.modules.get("test_bench") or sys.modules.get("tests.bench.test_bench")
    for res in getattr(mod, "RESULTS", []):
        terminalreporter.section("pykvm bench --quick (ratios within this run)")
        h = res["host"]
        terminalreporter.write_line(f"{h['cpu']}, {h['cpus']} CPUs, load {h['loadavg']}, "
                                    f"{res['seconds']} s")
        for name, v in res["ratios"].items():
            lim = res["thresholds"].get(name)
            rng = res["ratio_ranges"].get(name)
            if v is None:
                text = "n/a"
            else:
                text = f"{v:.3f}" + (f" ({rng[0]:.3f}-{rng[1]:.3f})" if rng else "")
            if lim is not None and v is not None:
                text += f"  limit {lim}: {'ok' if v <= lim else 'OVER'}"
            terminalreporter.write_line(f"  {name:<28} {text}")
