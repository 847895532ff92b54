import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (tiny_models.py)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Without a GPU the Triton kernels run in Triton's interpreter, so CI still checks their logic.
# Must be set before any kernel module is imported (triton.jit reads it at decoration).
if not _cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
