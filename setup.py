"""Build hooks: cffi compiles the C helper (csrc/) into pykvm._native at install time."""
from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
