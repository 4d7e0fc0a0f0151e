"""``python -m pykvm.fuzz``: see :mod:`pykvm.fuzz.cli`."""
import sys

from .cli import program

sys.exit(program())
