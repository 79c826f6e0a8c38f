import json
from pathlib import Path

import pytest
import torch

from editinfinity.demo import example_dir
from parity import parity_path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    p = parity_path()
    if not (p / "manifest.json").is_file():
        pytest.fail(f"parity fixtures not found at {p}; set EDITINFINITY_PARITY_DIR")
    return p


@pytest.fixture(scope="session")
def manifest(parity_dir) -> dict:
    return json.loads((parity_dir / "manifest.json").read_text())


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (training tests: on a shared 2-core runner, two oneDNN threads contending with
    other work run 2-10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def example() -> dict:
    """The bundled demo case (shapes), with absolute image and mask paths."""
    ex = example_dir()
    case = json.loads((ex / "case.json").read_text())
    case["image"] = str(ex / case["image"])
    case["mask"] = str(ex / "mask.png")
    return case
