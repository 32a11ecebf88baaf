"""Thin entry point: ``python cli.py in.onnx out.onnx --calib DATA``; see msq_onnx/cli.py."""

import signal
import sys

# Ctrl-C or SIGTERM during the imports below can land inside a C extension's initialisation (numpy,
# onnxruntime) and crash the interpreter (exit -11, measured at 0.1 s into a run): the signals are held
# until main() has its handlers, which then report "interrupted" and exit 130.
if hasattr(signal, "pthread_sigmask"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

from msq_onnx.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
