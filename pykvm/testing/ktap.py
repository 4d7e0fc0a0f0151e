"""Write pytest results as KTAP (the kselftest format KernelCI and LAVA read)."""


class KtapWriter:
    def __init__(self, path: str):
        self.path = path
        self.results = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.results.append(report)

    def pytest_sessionfinish(self, session):
        lines = ["KTAP version 1", f"1..{len(self.results)}"]
        for i, r in enumerate(self.results, 1):
            name = r.nodeid.replace("#", "_").replace("\n", " ")
            if r.skipped:
                reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else ""
                lines.append(f"ok {i} {name} # SKIP {reason}".rstrip())
            elif r.passed:
                lines.append(f"ok {i} {name}")
            else:
                for l in str(r.longreprtext).splitlines()[-6:]:
                    lines.append(f"# {l}")
                lines.append(f"not ok {i} {name}")
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")
