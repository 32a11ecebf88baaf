"""Speed and memory of msq-onnx against ONNX Runtime's own quantize_static, as ratios measured in one run.

  * conversion: wall time and peak memory (each in its own process, best of
    --repeats, the two tools alternating) of one msq-onnx conversion
    (analysis, allocation, writing and verification included, --avg-bits 4)
    and of ORT's quantize_static (MinMax, QDQ, per-channel, uint8/int8) on the
    same calibration samples, read by the same loader; both from byte-compiled
    modules, as pip installs them;
  * calibration memory as the set grows: 100 vs 1,000 samples (--scale);
  * batch-1 latency, 1 thread, interleaved: FP32, ORT's uniform int8 QDQ and
    ours (and ours with --prefer size, converted once more, its conversion not
    timed); and the fused integer kernels in each optimized graph;
  * session memory: what a process holds for each of those models (resident
    growth from building a one-thread session and running it three times on a
    real sample, and its peak), each model in a fresh process so that no
    freed heap of another one is reused.

    python bench/compare_ort.py                      # EfficientNet-Lite0 and MiniLM-L6
    python bench/compare_ort.py --model efficientnet --scale
    python bench/compare_ort.py --model mnist
    python bench/compare_ort.py --onnx model.onnx --calib samples.npz   # any model (bench/larger_models.py)
Writes docs/bench/timing-<model>.json.
"""

from __future__ import annotations

import argparse
import compileall
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import datasets  # noqa: E402
import run_bench  # noqa: E402

ORT_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from msq_onnx.data import Preprocess, open_samples
from msq_onnx.load import load_model
pre = Preprocess(**{pre!r})  # images: resize/crop/normalize; text: the tokenizer and columns
samples = open_samples({calib!r}, load_model({model!r}).inputs, pre)

class Reader(CalibrationDataReader):
    def __init__(self):
        self.batches = samples.batches(1)
    def get_next(self):
        return next(self.batches, None)

quantize_static({model!r}, {output!r}, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax)
"""


def measured_run(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a child process."""
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a chatty child cannot block on it
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise RuntimeError(f"{command[:3]} failed: {errors.read().decode(errors='replace')[-500:]}")
    return wall, usage.ru_maxrss / 1024.0


MEMORY_SCRIPT = """
import json, sys
import numpy as np, onnxruntime as ort
def resident(field='VmRSS'):  # VmHWM: the peak of this process (ru_maxrss carries the parent's over the exec)
    with open('/proc/self/status') as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field + ':'))
with np.load(sys.argv[2]) as arrays:
    feed = {name: arrays[name] for name in arrays.files}
before = resident()
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.log_severity_level = 3
session = ort.InferenceSession(sys.argv[1], options, providers=['CPUExecutionProvider'])
built = resident()
for _ in range(3):
    session.run(None, feed)
peak = resident('VmHWM')
print(json.dumps({'built_mib': (built - before) / 2**20, 'running_mib': (resident() - before) / 2**20,
                  'peak_mib': (peak - before) / 2**20}))
"""


def session_memory_mib(paths: dict, feed: dict, work: str) -> dict:
    """Per model, what a fresh process's resident memory grows by for a one-thread session on it: once built,
    after three batch-1 runs (`running`), and at its peak. ORT's own defaults otherwise (memory arena on), as a
    deployment would run it. Linux only (/proc/self/status); elsewhere {}."""
    if not os.path.exists("/proc/self/status"):
        return {}
    feed_path = os.path.join(work, "memory-feed.npz")
    np.savez(feed_path, **feed)
    measured = {}
    for name, path in paths.items():
        run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, path, feed_path], cwd=ROOT,
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"the session memory of {name} could not be measured: {run.stderr[-500:]}")
        measured[name] = {k: round(v, 1) for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}
    return measured


def latency_ms(paths: dict, feed: dict, runs: int) -> dict:
    import onnxruntime as ort

    sessions = {}
    for name, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(10):
            sessions[name].run(None, feed)
    times = {name: [] for name in paths}
    for _ in range(runs):  # interleaved so machine noise hits every model alike
        for name, runner in sessions.items():
            start = time.perf_counter()
            runner.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(values)) for name, values in times.items()}


def subset_csv(source: str, count: int, path: str) -> str:
    with open(source, newline="") as handle:
        rows = list(csv.reader(handle))
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows[:1] + rows[1:count + 1])
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("efficientnet", "minilm", "mnist"), nargs="+",
                        default=["efficientnet", "minilm"])
    parser.add_argument("--onnx", help="any other model instead, with --calib (a .npz or a folder of .npy/.npz "
                                       "files, read as they are: no preprocessing)")
    parser.add_argument("--calib", help="the calibration samples of --onnx")
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED)
    parser.add_argument("--repeats", type=int, default=2, help="conversions of each kind; the fastest counts")
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--scale", action="store_true", help="also compare calibration memory at 100 vs 1,000 samples")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    args = parser.parse_args(argv)
    if args.onnx:
        if not args.calib:
            parser.error("--onnx needs --calib")
        name = os.path.splitext(os.path.basename(args.onnx))[0]
        result = compare_model(name, os.path.abspath(args.onnx), os.path.abspath(args.calib), {}, [], args)
        print(json.dumps({"ours_over_ort": {name: _ratios(result)}}))
        return 0
    if not os.path.isdir(args.shared):
        print(f"skipped: shared data folder '{args.shared}' not found (set --shared or MSQ_SHARED)")
        return 0
    ratios = {}
    for model in args.model:
        ratios[model] = _ratios(compare(model, args))
    print(json.dumps({"ours_over_ort": ratios}))
    return 0


def _ratios(result: dict) -> dict:
    return {k: result[k] for k in ("wall_ratio", "memory_ratio", "latency_vs_ort_int8", "session_memory_vs_ort_int8",
                                   "size_session_memory_vs_ort_int8") if k in result}


def compare(model_name: str, args) -> dict:
    work = run_bench._work_folder()
    text_args = []
    if model_name == "efficientnet":
        model = os.path.join(args.shared, "models", "efficientnet-lite0.onnx")
        calib, _ = datasets.imagenet_split(args.shared, work)
        pre = {"resize": 256, "crop": 224, "interpolation": "bicubic", "mean": (127.0,), "std": (128.0,)}
        image_args = datasets.EFFICIENTNET_ARGS
    elif model_name == "minilm":
        model = os.path.join(args.shared, "models", "minilm-l6", "model.onnx")
        tokenizer = os.path.join(args.shared, "models", "minilm-l6", "tokenizer.json")
        calib, _ = datasets.debian_split(args.shared, work, limit=1)
        pre = {"tokenizer": tokenizer, "label_column": "label"}
        image_args, text_args = [], ["--tokenizer", tokenizer, "--label-column", "label"]
    else:
        model = os.path.join(args.shared, "models", "mnist-8.onnx")
        calib, _ = datasets.mnist_split(args.shared, work)
        pre, image_args = {}, []
    return compare_model(model_name, model, calib, pre, image_args + text_args, args, work)


def compare_model(model_name: str, model: str, calib: str, pre: dict, cli_args: list, args, work=None) -> dict:
    """One model's conversions (ours and ORT's, alternating), then latency; writes docs/bench/timing-<name>.json.
    pre: open_samples' Preprocess for ORT's reader; cli_args: the same for our CLI."""
    work = work or run_bench._work_folder()
    ours, theirs = os.path.join(work, "msq.onnx"), os.path.join(work, "ort_int8.onnx")
    msq_command = [sys.executable, os.path.join(ROOT, "cli.py"), model, ours, "--calib", calib, "--avg-bits", "4",
                   "--quiet", *cli_args]
    ort_command = [sys.executable, "-c", ORT_SCRIPT.format(root=ROOT, pre=pre, calib=calib, model=model,
                                                          output=theirs)]
    conversions = {"msq": [], "ort": []}
    ort_error = None
    try:
        measured_run(ort_command)
    except RuntimeError as exc:  # e.g. mnist-8's 2-D Gemm bias: quantize_static(per_channel=True) raises
        ort_error = str(exc).strip().splitlines()[-1][:300]
        # Compare against ORT on our normalized copy (opset 21, [N] Gemm bias) of the same network instead.
        import onnx

        from msq_onnx.load import load_model

        normalized = os.path.join(work, "normalized.onnx")
        onnx.save(load_model(model).model, normalized)
        ort_command = [sys.executable, "-c", ORT_SCRIPT.format(root=ROOT, pre=pre, calib=calib, model=normalized,
                                                              output=theirs)]
    # Both timed as installed: ORT's quantizer runs from the modules pip byte-compiled, and ours now does too. Under
    # PYTHONDONTWRITEBYTECODE (this machine sets it) a checkout recompiled all of msq_onnx every run: 0.07 s.
    compileall.compile_dir(os.path.join(ROOT, "msq_onnx"), quiet=1)
    for _ in range(args.repeats):
        conversions["ort"].append(measured_run(ort_command))
        conversions["msq"].append(measured_run(msq_command))
    best = {k: (min(w for w, _ in v), max(m for _, m in v)) for k, v in conversions.items() if v}
    result = {"model": model_name, "calibration_samples": _count(calib),
              "conversion": {k: {"wall_s": round(w, 2), "peak_mib": round(m, 1)} for k, (w, m) in best.items()}}
    if ort_error:
        result["ort_quantize_static_error_on_original"] = ort_error
        result["ort_ran_on"] = "msq-onnx's normalized copy of the model"
    result["wall_ratio"] = round(best["msq"][0] / best["ort"][0], 3)
    result["memory_ratio"] = round(best["msq"][1] / best["ort"][1], 3)
    print(json.dumps(result), flush=True)

    sys.path.insert(0, ROOT)
    from msq_onnx.verify import fused_integer_kernels, optimized_op_counts
    from msq_onnx.pipeline import written_bytes

    # --prefer size, converted once (untimed): its bytes, latency and memory beside the default's
    ours_size = os.path.join(work, "msq-size.onnx")
    measured_run(msq_command[:3] + [ours_size] + msq_command[4:] + ["--prefer", "size"])
    compared = {"fp32": model, "ort_int8": theirs, "msq": ours, "msq_size": ours_size}
    result["file_bytes"] = {name: written_bytes(path) for name, path in compared.items()}
    result["fused_integer_kernels"] = {name: fused_integer_kernels(optimized_op_counts(path))
                                       for name, path in compared.items()}
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.load import load_model

    feed = next(open_samples(calib, load_model(model).inputs, Preprocess(**pre)).batches(1))  # a real sample
    latency = latency_ms(compared, feed, args.latency_runs)
    result["latency_ms_b1_1thread"] = {k: round(v, 3) for k, v in latency.items()}
    result["latency_vs_ort_int8"] = round(latency["msq"] / latency["ort_int8"], 3)
    result["latency_vs_fp32"] = round(latency["msq"] / latency["fp32"], 3)
    memory = session_memory_mib(compared, feed, work)
    if memory:
        result["session_memory_mib"] = memory
        result["session_memory_vs_ort_int8"] = round(memory["msq"]["running_mib"] / memory["ort_int8"]["running_mib"],
                                                     3)
        result["session_memory_vs_fp32"] = round(memory["msq"]["running_mib"] / memory["fp32"]["running_mib"], 3)
        result["size_session_memory_vs_ort_int8"] = round(
            memory["msq_size"]["running_mib"] / memory["ort_int8"]["running_mib"], 3)

    if getattr(args, "scale", False) and model_name == "efficientnet":
        everything, _ = datasets.imagenet_split(args.shared, work, calib=1000)
        peaks = {}
        for count in (100, 1000):
            subset = subset_csv(everything, count, os.path.join(work, f"calib{count}.csv"))
            command = [sys.executable, os.path.join(ROOT, "cli.py"), model, os.path.join(work, f"s{count}.onnx"),
                       "--calib", subset, "--avg-bits", "4", "--quiet", *cli_args]
            wall, peak = measured_run(command)
            peaks[count] = {"wall_s": round(wall, 2), "peak_mib": round(peak, 1)}
        result["calibration_scaling"] = peaks
        result["memory_growth_100_to_1000"] = round(peaks[1000]["peak_mib"] / peaks[100]["peak_mib"], 3)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"timing-{model_name}")
    with open(stem + ".json", "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1), flush=True)
    return result


def _count(calib: str) -> int:
    if calib.endswith(".npz"):
        with np.load(calib) as arrays:
            return int(len(arrays["labels"] if "labels" in arrays.files else arrays[arrays.files[0]]))
    if os.path.isdir(calib):
        return -1  # a folder of arrays: counted by the tools, not here
    return sum(1 for _ in open(calib, encoding="utf-8")) - 1 if calib.endswith(".csv") else \
        len(datasets.read_text_rows(calib)[0])


if __name__ == "__main__":
    sys.exit(main())
