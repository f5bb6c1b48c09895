import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture
def tiny_cnn() -> pathlib.Path:
    """The repo's small CNN (examples/tiny_cnn): input x [N, 3, 16, 16] float, output probs."""
    return REPO / "examples" / "tiny_cnn" / "model.onnx"
