"""What importing pykvm's pytest plugin may add to a process that has pytest loaded (shared by
tests/unit/test_plugin.py and tests/packaging/test_wheel.py): pykvm's three small modules and the
plugin itself, nothing from the core."""

OWN = ["pykvm", "pykvm._host", "pykvm.testing", "pykvm.testing.plugin"]

# run with `python -c`: prints the sorted list of modules the plugin's import added
NEW_MODULES = """
import sys, pytest
before = set(sys.modules)
import pykvm.testing.plugin
print(sorted(set(sys.modules) - before))
"""
