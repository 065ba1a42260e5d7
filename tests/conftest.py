import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One intra-op thread: the test models are tiny, and on a 2-core machine several threads per
# process oversubscribe the cores (measured: up to 20x slower when other work is running).
import torch  # noqa: E402

torch.set_num_threads(1)
