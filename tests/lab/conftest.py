import pytest


def pytest_configure(config):
    # `lab` (pyproject) marks tests that run *inside* a lab; these boot one from the host
    config.addinivalue_line("markers", "lab_boot: boots a QEMU lab (python -m pykvm.lab); slow, "
                            "needs the Debian mirror or a warm cache")


def _labs_module():
    import sys
    return sys.modules.get("test_labs") or sys.modules.get("tests.lab.test_labs")


LAB_TIMEOUT = 2400     # s, pytest-timeout's limit for a lab test (a lab stops itself at 1800)


def pytest_collection_modifyitems(config, items):
    """The lab tests come last: their labs start when collection ends and run beside the rest."""
    labs = [i for i in items if i.get_closest_marker("lab_boot")]
    for i in labs:
        if i.get_closest_marker("timeout") is None:
            i.add_marker(pytest.mark.timeout(LAB_TIMEOUT))
    if labs:
        ids = {id(i) for i in labs}
        items[:] = [i for i in items if id(i) not in ids] + labs


def pytest_collection_finish(session):
    """Start the selected labs in the background (each takes minutes, mostly QEMU's own CPU), so
    that they run while the rest of the suite does; test_lab then follows its lab's output.
    Under pytest-xdist every worker collects every test, so none starts them here: each lab
    starts when its test runs, once, in the worker that runs it."""
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return
    mod = _labs_module()
    labs = [i.callspec.params["lab"] for i in session.items
            if i.get_closest_marker("lab_boot") and hasattr(i, "callspec") and "lab" in i.callspec.params]
    if mod is not None and labs:
        mod.start_labs(labs)


def pytest_sessionfinish(session):
    """Labs still running (an interrupted or stopped session) are stopped and clean up."""
    mod = _labs_module()
    if mod is not None:
        mod.stop_labs()


def pytest_terminal_summary(terminalreporter):
    """Show each lab's inner pytest summary in the host run's summary."""
    mod = _labs_module()
    if mod is not None and mod.SUMMARIES:
        terminalreporter.section("pykvm labs: inner pytest results")
        for lab, line in mod.SUMMARIES:
            terminalreporter.write_line(f"{lab} {line}")
