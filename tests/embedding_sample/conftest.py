import os
from pathlib import Path

import pytest


@pytest.fixture
def greeter_argv() -> list[str]:
    """How to start the worker under test; GREETER_PYTHON has the iii SDK installed."""
    python = os.environ.get("GREETER_PYTHON")
    if not python:
        pytest.skip("set GREETER_PYTHON to an interpreter with iii-sdk installed")
    return [python, str(Path(__file__).with_name("greeter_worker.py"))]
