import os

import pytest
import torch

# Triton kernels run under the interpreter where there is no GPU; the variable must be set before
# any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip without CUDA, and only then: on a GPU machine a missing GPU-test dependency
    (fla, the `gpu` extra) fails them instead of skipping them silently."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_process():
    """torch.distributed and megatron-core's groups as rank 0 of 1, for a module's tests; the
    environment variables a bare start sets are put back afterwards."""
    from prism_megatron.config import ParallelConfig
    from prism_megatron.process_groups import destroy_parallel, initialize_parallel

    saved = dict(os.environ)
    initialize_parallel(ParallelConfig(), seed=0)
    yield
    destroy_parallel()
    os.environ.clear()
    os.environ.update(saved)
