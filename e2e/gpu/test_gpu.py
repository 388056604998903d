"""The GPU check (e2e/gpu/check.py) under pytest: marked `gpu`, and skipped where there is no
CUDA device, saying so."""
import pytest
import torch

from e2e.gpu import check

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU check needs an NVIDIA GPU")
def test_outputs_equal_transformers_on_cuda(tmp_path):
    rows = check.exactness(tmp_path, "cuda")
    assert all(r["equal"] == r["of"] for r in rows), rows
