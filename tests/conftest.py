import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def checkout():
    return ROOT


def pytest_collection_modifyitems(config, items):
    # Everything under tests/hw needs the real /dev/kvm: mark it so the fail-closed policy
    # (skip = failure where /dev/kvm exists) applies.
    for item in items:
        if f"{os.sep}tests{os.sep}hw{os.sep}" in str(item.fspath):
            item.add_marker(pytest.mark.requires_kvm)


pytest_plugins = ["pytester"]
