"""Thin entry point: ``python cli.py in.onnx out.onnx --calib DATA``; see msq_onnx/cli.py."""

import sys

try:
    from msq_onnx.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python starts: nothing was written yet
    sys.stderr.write("msq-onnx: interrupted; nothing was written\n")
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
