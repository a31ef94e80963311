"""Shared test setup: fixture locations and the devices every kernel test runs on."""
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY = SHARED / "fixtures" / "tiny-llama"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    import qlora_ext
    return f"qlora_ext: cpu_isa={qlora_ext.cpu_isa()} with_cuda={qlora_ext.with_cuda()} " \
           f"cuda_available={torch.cuda.is_available()}"


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def needs_shared():
    if not SHARED.exists():
        pytest.fail(f"{SHARED} is missing: the tests need the shared fixtures beside the repository")
