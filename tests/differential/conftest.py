from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="differential and fault-loop tests: thousands of cases / 100 rounds (or TP_TEST_LONG=1)",
    )
