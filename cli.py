"""Thin entry point: ``python cli.py in.onnx out.onnx --calib DATA``; see msq_onnx/cli.py."""

import atexit
import importlib
import os
import signal
import sys

_early = []


def _remember(signum, frame):
    # No exception here: raised inside a C extension's import (numpy, onnxruntime) it broke the import or
    # crashed the interpreter (exit -11, measured at 0.1 s into a run). Reported once the imports are done.
    _early.append(signum)


signal.signal(signal.SIGINT, _remember)
signal.signal(signal.SIGTERM, _remember)
if hasattr(signal, "pthread_sigmask"):  # and held from here on until main() has its own handlers
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

from msq_onnx.cli import main  # noqa: E402
# The pipeline's own imports (onnxruntime among them) too: main() unblocks the signals before it imports them, and
# a Ctrl-C there broke onnxruntime's import ("ImportError: initialization failed", exit 1 instead of 130; the
# interrupt test, at 1.0 s into a run on a loaded machine).
for _module in ("msq_onnx.pipeline", "msq_onnx.report"):
    importlib.import_module(_module)

if __name__ == "__main__":
    if _early:
        sys.stderr.write("msq-onnx: interrupted; nothing was written\n")
        sys.exit(130)
    code = main()
    # The interpreter's teardown (freeing ONNX Runtime, scipy and the arrays module by module) took 0.3-0.4 s of
    # a 22 s MiniLM-L6 conversion: skipped once the exit handlers (the weights folders' removal among them) ran.
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that closed the pipe (| head): nothing more to say to it
            pass
    os._exit(code or 0)
