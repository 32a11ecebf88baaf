"""Thin entry point: ``python cli.py in.onnx out.onnx --calib DATA``; see msq_onnx/cli.py."""

import sys

from msq_onnx.cli import main

if __name__ == "__main__":
    sys.exit(main())
