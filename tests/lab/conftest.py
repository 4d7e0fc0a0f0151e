def pytest_configure(config):
    # `lab` (pyproject) marks tests that run *inside* a lab; these boot one from the host
    config.addinivalue_line("markers", "lab_boot: boots a QEMU lab (python -m pykvm.lab); slow, "
                            "needs the Debian mirror or a warm cache")


def pytest_terminal_summary(terminalreporter):
    """Show each lab's inner pytest summary in the host run's summary."""
    import sys
    mod = sys.modules.get("test_labs") or sys.modules.get("tests.lab.test_labs")
    if mod is not None and mod.SUMMARIES:
        terminalreporter.section("pykvm labs: inner pytest results")
        for lab, line in mod.SUMMARIES:
            terminalreporter.write_line(f"{lab} {line}")
