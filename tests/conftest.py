import os

import pytest

# JAX would otherwise take 75% of the GPU memory at its first use, starving the torch/CuPy tests.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _gpu_available() -> tuple[bool, str]:
    from cuflash._arch import gpu_count

    n, why = gpu_count()
    return n > 0, why


@pytest.fixture(autouse=True)
def poisoned_outputs(request):
    """GPU tests start every output as NaN, so that an element a kernel fails to write shows."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    from cuflash._options import override

    with override(poison_outputs=True):
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when none is visible)")


def pytest_collection_modifyitems(config, items):
    ok, reason = _gpu_available()
    if ok:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
