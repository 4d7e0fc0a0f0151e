def pytest_terminal_summary(terminalreporter):
    """Show the sanitized child run's result in the host run's summary."""
    import sys
    mod = sys.modules.get("test_sanitizers") or sys.modules.get("tests.sanitize.test_sanitizers")
    if mod is not None and mod.SUMMARY:
        terminalreporter.section("pykvm C helper under AddressSanitizer + UndefinedBehaviorSanitizer")
        for line in mod.SUMMARY:
            terminalreporter.write_line(line)
