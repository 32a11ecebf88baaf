"""The CLI end to end on the bundled example, as a user and a CI pipeline run it."""

import hashlib
import json
import os
import subprocess
import sys

import jsonschema
import onnx
import pytest

from conftest import BUNDLED_CALIB, BUNDLED_EVAL, BUNDLED_MODEL, ROOT
from msq_onnx.report import SCHEMA_PATH


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundled")
    before = digest(BUNDLED_MODEL)
    result = run_cli(BUNDLED_MODEL, folder / "out.onnx", "--calib", BUNDLED_CALIB, "--eval", BUNDLED_EVAL,
                     "--avg-bits", "3.5", "--report", folder / "report.json", "--json")
    return folder, result, before


def test_bundled_example_converts_and_reports(bundled_run):
    folder, result, before = bundled_run
    assert result.returncode == 0, result.stderr
    assert digest(BUNDLED_MODEL) == before  # the input is never modified
    summary = json.loads(result.stdout)
    report = json.load(open(folder / "report.json"))
    jsonschema.validate(report, json.load(open(SCHEMA_PATH)))
    assert summary["avg_weight_bits"] == report["avg_weight_bits"] <= 3.5
    assert report["fused_integer_kernels"] == report["quantized_layers"] == 6
    assert report["evaluation"]["samples"] == 497
    # the accuracy claim is on held-out samples, and 3.5-bit MSQ keeps the model useful
    assert report["quant_top1"] >= report["fp32_top1"] - 3.0
    assert len({layer["bits"] for layer in report["layers"]}) > 1  # mixed precision, not uniform
    for suffix in (".md", ".layers.png"):
        assert os.path.getsize(folder / f"report{suffix}") > 100
    assert "| `fc1` |" in open(folder / "report.md").read()
    onnx.checker.check_model(str(folder / "out.onnx"))


def test_uniform_levels_flag_keeps_every_grid_even(bundled_run, tmp_path):
    """By default the bundled CNN's narrow layers take fitted levels; --uniform-levels writes uniform grids."""
    folder, _, _ = bundled_run
    assert any(layer["level_set"] for layer in json.load(open(folder / "report.json"))["layers"])
    result = run_cli(BUNDLED_MODEL, tmp_path / "out.onnx", "--calib", BUNDLED_CALIB, "--avg-bits", "3.5",
                     "--uniform-levels", "--report", tmp_path / "report.json", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.load(open(tmp_path / "report.json"))
    assert report["options"]["level_sets"] is False
    assert not any(layer["level_set"] for layer in report["layers"])


def test_same_inputs_give_byte_identical_model_and_report(bundled_run, tmp_path):
    folder, first, _ = bundled_run
    second = run_cli(BUNDLED_MODEL, tmp_path / "out.onnx", "--calib", BUNDLED_CALIB, "--eval", BUNDLED_EVAL,
                     "--avg-bits", "3.5", "--report", tmp_path / "report.json", "--json")
    assert second.returncode == 0, second.stderr
    assert digest(folder / "out.onnx") == digest(tmp_path / "out.onnx")
    a, b = (json.load(open(p / "report.json")) for p in (folder, tmp_path))
    for report in (a, b):
        report.pop("timings_s")
        report.pop("output_model")
        report.pop("latency_ms")  # measured, so it varies; everything else is determined by the inputs
    assert a == b


def test_accuracy_gate_fails_with_its_own_code_but_still_writes(tmp_path):
    result = run_cli(BUNDLED_MODEL, tmp_path / "out.onnx", "--calib", BUNDLED_CALIB, "--eval", BUNDLED_EVAL,
                     "--avg-bits", "2", "--bits", "2,3", "--max-drop", "0", "--report", tmp_path / "r.json")
    assert result.returncode == 3, result.stderr
    assert "accuracy gate failed" in result.stderr and "Traceback" not in result.stderr
    assert os.path.exists(tmp_path / "out.onnx")
    report = json.load(open(tmp_path / "r.json"))
    assert report["gate"]["passed"] is False and report["gate"]["drop"] > 0


def test_gate_passes_when_drop_is_within_limit(tmp_path):
    result = run_cli(BUNDLED_MODEL, tmp_path / "out.onnx", "--calib", BUNDLED_CALIB, "--eval", BUNDLED_EVAL,
                     "--max-drop", "5", "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["gate"]["passed"] is True


def test_help_documents_every_option():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--calib", "--eval", "--avg-bits", "--bits", "--allocator", "--max-drop", "--levels",
                   "--max-dim", "--batch-size", "--seed", "--resize", "--crop", "--mean", "--std",
                   "--channel-order", "--layout", "--report", "--json", "--quiet", "Exit codes"):
        assert option in result.stdout


def test_console_script_is_declared_and_runs_the_same_main():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("msq-onnx") == "msq_onnx.cli:main"
    result = subprocess.run([sys.executable, "-c", "import sys; from msq_onnx.cli import main; sys.exit(main())",
                             "--version-does-not-exist"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1


@pytest.mark.parametrize("options", [["--seed", "-1"], ["--avg-bits", "nan"], ["--max-drop", "inf", "--eval",
                                                                                BUNDLED_EVAL],
                                     ["--report", "no/such/folder/r.json"]])
def test_bad_options_fail_before_anything_is_written(tmp_path, options):
    result = run_cli(BUNDLED_MODEL, tmp_path / "out.onnx", "--calib", BUNDLED_CALIB, *options)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("msq-onnx: error:")
    assert os.listdir(tmp_path) == []


def test_an_interrupt_inside_a_locks_handover_is_sent_again_and_elsewhere_raised_at_once(monkeypatch):
    """A KeyboardInterrupt raised in threading's __enter__ / __exit__ (a Condition's lock taken, or not yet given
    back) leaks the lock and the conversion hangs: the interrupt is sent again a moment later. In a blocking wait of
    threading's, or in code of ours, it is raised at once (a review's: deferring every threading frame held an
    interrupt until a join ended)."""
    import signal
    import sys
    import threading

    from msq_onnx import cli

    import time

    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, number: sent.append((pid, number)))  # the retry's, recorded
    for name, value in (("_interrupted", False), ("_finishing", False), ("_deferred", 0), ("_retry_pending", False),
                        ("_run_number", 7)):
        monkeypatch.setattr(cli, name, value)

    def settled():  # the retry thread has slept and sent (or not): it clears its mark, then sends, under the lock
        deadline = time.monotonic() + 5
        while cli._retry_pending and time.monotonic() < deadline:
            time.sleep(0.005)
        with cli._retry_lock:
            pass

    def frame_of_threading(name: str):
        namespace = {}
        exec(compile(f"import sys\ndef {name}():\n    return sys._getframe()\nframe = {name}()", threading.__file__,
                     "exec"), namespace)
        return namespace["frame"]

    cli._interrupt(signal.SIGTERM, frame_of_threading("__enter__"))  # no KeyboardInterrupt there
    cli._interrupt(signal.SIGINT, frame_of_threading("__exit__"))  # a second meanwhile: the same retry
    settled()
    assert cli._interrupted and sent == [(os.getpid(), signal.SIGTERM)]
    for frame in (frame_of_threading("wait"), sys._getframe()):
        with pytest.raises(KeyboardInterrupt):
            cli._interrupt(signal.SIGINT, frame)
    cli._interrupt(signal.SIGTERM, frame_of_threading("__enter__"))
    cli._stop_retrying()  # the run ends before the retry wakes: it sends nothing, and an interrupt now is dropped
    settled()
    assert sent == [(os.getpid(), signal.SIGTERM)]
    cli._interrupt(signal.SIGINT, sys._getframe())


def test_interrupt_inside_an_import_still_exits_as_interrupted(monkeypatch, tmp_path, capsys):
    """SIGTERM landing in a C extension's import surfaces as ImportError: still exit 130, one line."""
    import signal

    import msq_onnx.pipeline
    from msq_onnx import cli

    def interrupted_import(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 1) if hasattr(signal, "sigtimedwait") else None
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None
        raise AssertionError("the signal handler did not run")

    monkeypatch.setattr(msq_onnx.pipeline, "convert", interrupted_import)
    monkeypatch.setattr(cli, "_interrupted", False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = cli.main([BUNDLED_MODEL, str(tmp_path / "out.onnx"), "--calib", BUNDLED_CALIB])
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    err = capsys.readouterr().err
    assert code == 130 and err.startswith("msq-onnx: interrupted") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_the_cli_keeps_its_threads_in_one_arena():
    """Worker threads get glibc arenas of their own, whose freed blocks stay mapped beside the main heap's; the
    CLI's policy keeps every thread in one (EfficientNet-Lite0's peak 305-322 -> 281-287 MB). Counted with
    malloc_stats in a child process: the policy is the CLI's, not the test process's. Skipped without glibc."""
    import ctypes
    import ctypes.util

    if not hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_stats"):
        pytest.skip("no glibc malloc_stats here")
    probe = """
import ctypes, ctypes.util, sys, threading, numpy as np
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
if sys.argv[1] == "cli":
    from msq_onnx.cli import _allocator_for_a_run
    _allocator_for_a_run()
kept = []
threads = [threading.Thread(target=lambda: kept.append(np.ones(20_000))) for _ in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc.malloc_stats()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}  # glibc's own
    arenas = {how: subprocess.run([sys.executable, "-c", probe, how], capture_output=True, text=True, cwd=ROOT,
                                  env=env, check=True).stderr.count("Arena ") for how in ("default", "cli")}
    assert arenas["cli"] == 1 and arenas["default"] >= 2
