import os
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def tiny_vlm_pipe(tmp_path_factory):
    """A CPU pipeline over a tiny random SmolVLM checkpoint folder, one per test module."""
    import meganeura
    from tiny_models import write_tiny_smolvlm_folder

    folder = tmp_path_factory.mktemp("tiny-smolvlm")
    write_tiny_smolvlm_folder(folder)
    return meganeura.load(str(folder), device="cpu", progress=False)
