"""Reading ``python -X importtime`` output (used by the plugin-cost tests)."""
import re


def importtime_lines(stderr: str):
    """(indent level, cumulative us, module) for each ``-X importtime`` line."""
    rows = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$", line)
        if m:
            rows.append((len(m.group(3)) // 2, int(m.group(2)), m.group(4)))
    return rows


def pykvm_cost_us(rows) -> int:
    """Cumulative import time of pykvm's modules, each counted once: a pykvm line nested under
    another pykvm line (its cost is in that line's cumulative figure) is not added again.
    importtime prints children before their parent, one indent level deeper."""
    def is_ours(name):
        return name == "pykvm" or name.startswith("pykvm.")
    total = 0
    for i, (level, cum, name) in enumerate(rows):
        if not is_ours(name):
            continue
        lvl, nested = level, False
        for plevel, _, pname in rows[i + 1:]:     # walk up through the enclosing imports
            if plevel < lvl:
                if is_ours(pname):
                    nested = True
                    break
                lvl = plevel
        if not nested:
            total += cum
    return total
