"""Sphinx configuration for pykvm's API reference (built from the docstrings).

Build: ``python -m sphinx -W -b html docs build/docs`` (the test suite does this with warnings as
errors, tests/unit/test_docs.py)."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "pykvm"
author = "the pykvm developers"
copyright = "2026, the pykvm developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True,
                           "ignore-module-all": True}
autodoc_typehints = "description"
nitpicky = False
exclude_patterns = ["_build", "*.md", "api/_*"]
html_theme = "alabaster"
suppress_warnings = ["autodoc.import_object"]
