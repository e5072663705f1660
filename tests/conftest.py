"""Shared pytest configuration: option --runslow, tests dir on sys.path."""
import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from zfixtures import *  # noqa: E402,F401,F403  (shared storage fixtures: ZEO, PostgreSQL, writers)

TESTDATA = os.path.join(os.path.dirname(os.path.dirname(TESTS_DIR)), "shared", "testdata")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run long soak tests (marked slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
