"""msq-onnx: post-training mixed-precision QDQ quantization of ONNX models with MSQ layer importance."""

__version__ = "0.1.0"

from .convert import Options, Result, convert  # noqa: E402
from .data import Preprocess  # noqa: E402

__all__ = ["Options", "Preprocess", "Result", "convert", "__version__"]
