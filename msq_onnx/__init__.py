"""msq-onnx: post-training mixed-precision QDQ quantization of ONNX models with MSQ layer importance."""

__version__ = "0.1.0"

__all__ = ["Options", "Preprocess", "Result", "convert", "__version__"]


def __getattr__(name):
    # Lazy: `msq-onnx` must reach its Ctrl-C handling before numpy, onnx and
    # onnxruntime load (about a second), so the package import stays light.
    import importlib

    if name in ("Options", "Result", "convert"):
        return getattr(importlib.import_module(".pipeline", __name__), name)
    if name == "Preprocess":
        return importlib.import_module(".data", __name__).Preprocess
    raise AttributeError(f"module 'msq_onnx' has no attribute {name!r}")
