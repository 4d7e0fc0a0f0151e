"""The README's "Writing a KVM regression test" example, read from README.md as it is.

The section shows each file as a paragraph that starts with its name in backquotes and ends with
a colon, a blank line, then a fenced code block: those (name, text) pairs are what the tests write out and run.
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Writing a KVM regression test"
_FILE_BLOCK = re.compile(r"^`([\w.-]+)`(?:(?!\n\n).)*?:\n\n```\w*\n(.*?)^```", re.M | re.S)


def example_files(readme: str = os.path.join(ROOT, "README.md")) -> dict:
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else len(text)]
    files = {name: body for name, body in _FILE_BLOCK.findall(section)}
    assert any(n.endswith(".c") for n in files) and any(n.startswith("test_") for n in files), \
        f"README example files not found in {SECTION!r}: {sorted(files)}"
    return files


def write_example(directory) -> list:
    names = []
    for name, body in example_files().items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write(body)
        names.append(name)
    return names
