import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One intra-op thread: the test models are tiny, and on a 2-core machine several threads per
# process oversubscribe the cores (measured: up to 20x slower when other work is running).
import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Every test module starts with one thread, whatever an earlier module (e.g. an end-to-end run) set."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
