"""MiniLM-L6 sentence embeddings: msq-onnx against ONNX Runtime's own quantizers, on Debian descriptions.

Protocol (fixed): ../shared/data/debian-descriptions/descriptions.tsv in file order; the first 300 rows
calibrate every quantizer, the rows after them evaluate. Scores, computed here for every model (not
taken from msq-onnx's report):
  * nearest-class-mean top-1: class means (class = Debian section) from the model's own L2-normalized
    embeddings of the even evaluation rows (rows 300, 302, ...), each odd row (301, 303, ...) given the
    class whose mean has the largest dot product with its embedding (FP32: 69.84%);
  * mean cosine of each embedding to the FP32 one on the odd rows;
  * bytes on disk (model + external data) and gzip -9 bytes;
  * batch-1 latency at 96 tokens, 1 intra-op and 1 inter-op thread, ORT_ENABLE_ALL, median of --runs
    with all models interleaved round-robin; also as ratios to quantize_dynamic's and FP32's.
Models: FP32; ORT anchors built in the same run from the same 300 texts (quantize_static QDQ per-channel
uint8/int8 MinMax, quantize_dynamic per-channel int8, MatMulNBits 4-bit RTN block 32 symmetric); and one
msq-onnx CLI run per --configs entry (wall time and peak RSS of each conversion in its own process).
Everything runs one step at a time, never two processes at once.

    python bench/text_bench.py                                   # ../shared or MSQ_SHARED
    python bench/text_bench.py --configs "avg8:--avg-bits 8" "avg4:--avg-bits 4" "a35:--avg-bits 3.5"
    python bench/text_bench.py --limit 60 --runs 5 --configs "avg8:--avg-bits 8"   # smoke run
Writes docs/bench/minilm-l6.json and .md (with --limit N: minilm-l6-limitN.*, never the real ones).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import datasets  # noqa: E402

CALIB_ROWS = 300
LATENCY_TOKENS = 96
OUTPUT = "sentence_embedding"
DEFAULT_CONFIGS = ("avg8:--avg-bits 8", "avg4:--avg-bits 4")
WARNING_PREFIX = "msq-onnx: warning"
ANCHORS = {  # key: (row name, what it is)
    "ort-static": ("ORT quantize_static", "QDQ, per-channel, QUInt8 activations / QInt8 weights, MinMax, "
                   "300 calibration texts at batch 1"),
    "ort-dynamic": ("ORT quantize_dynamic", "per_channel=True, weight_type=QInt8"),
    "ort-nbits4": ("ORT MatMulNBits 4-bit", "MatMulNBitsQuantizer, DefaultWeightOnlyQuantConfig (RTN), bits 4, "
                   "block_size 32, is_symmetric True, MatMul only"),
}


# ---------------------------------------------------------------- anchors (each run in its own process)

def build_anchor(kind: str, model: str, output: str, calib_tsv: str, tokenizer: str) -> None:
    """Write one ORT anchor; run as `python -c` by main() so its time and memory are its own."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    if kind == "ort-static":
        texts, _ = datasets.read_text_rows(calib_tsv)
        feeds = datasets.tokenize_rows(tokenizer, texts)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter(feeds)

            def get_next(self):
                return next(self.feeds, None)

        quantize_static(model, output, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    elif kind == "ort-dynamic":
        quantize_dynamic(model, output, per_channel=True, weight_type=QuantType.QInt8)
    elif kind == "ort-nbits4":
        import onnx

        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                         MatMulNBitsQuantizer)
        except ModuleNotFoundError as exc:
            if exc.name != "onnx_ir":
                raise
            raise SystemExit("onnxruntime's matmul_nbits_quantizer imports onnx_ir, which is not installed: "
                             "pip install onnx-ir") from None

        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=4)
        quantizer = MatMulNBitsQuantizer(onnx.load(model), bits=4, block_size=32, is_symmetric=True,
                                         algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(output, use_external_data_format=False)
    else:
        raise ValueError(f"unknown anchor {kind}")


def anchor_command(kind: str, model: str, output: str, calib_tsv: str, tokenizer: str) -> list[str]:
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import text_bench; "
            f"text_bench.build_anchor({kind!r}, {model!r}, {output!r}, {calib_tsv!r}, {tokenizer!r})")
    return [sys.executable, "-c", code]


def run_child(command: list[str]) -> dict:
    """Exit code, wall seconds, peak RSS (MiB, this child alone: wait4) and stderr of one child process.

    compare_ort.measured_run raises on any non-zero exit and drops stderr; here exit 3 (gate failed) is a
    result and the warnings are kept."""
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a chatty child cannot block on it
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        text = errors.read().decode(errors="replace")
    return {"exit_code": process.returncode, "wall_s": round(wall, 2), "peak_mib": round(usage.ru_maxrss / 1024.0, 1),
            "stderr": text}


# ---------------------------------------------------------------- scoring

def session(path: str, latency: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if latency:
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def embeddings(path: str, feeds: list[dict]) -> np.ndarray:
    """Batch-1 embeddings of every feed, default session options."""
    runner = session(path)
    names = {i.name for i in runner.get_inputs()}
    output = OUTPUT if OUTPUT in {o.name for o in runner.get_outputs()} else runner.get_outputs()[0].name
    return np.concatenate([runner.run([output], {k: v for k, v in feed.items() if k in names})[0]
                           for feed in feeds]).astype(np.float64)


def ncm_predictions(embedded: np.ndarray, labels: np.ndarray, normalize_means: bool = False) -> np.ndarray:
    """Class of each odd row: largest dot product with the class means of the even rows."""
    train, test, train_labels = embedded[0::2], embedded[1::2], labels[0::2]
    classes = sorted(set(train_labels.tolist()))
    means = np.stack([train[train_labels == c].mean(axis=0) for c in classes])
    if normalize_means:
        means = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return np.array(classes)[np.argmax(test @ means.T, axis=1)]


def cosines(embedded: np.ndarray, reference: np.ndarray) -> np.ndarray:
    a, b = embedded[1::2], reference[1::2]
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def score(embedded: np.ndarray, reference: np.ndarray, labels: np.ndarray,
          fp32_right: np.ndarray | None) -> tuple[dict, np.ndarray]:
    predicted = ncm_predictions(embedded, labels)
    right = predicted == labels[1::2]
    cos = cosines(embedded, reference)
    normalized_right = ncm_predictions(embedded, labels, True) == labels[1::2]
    result = {"top1": round(100.0 * float(right.mean()), 2),
              "top1_normalized_means": round(100.0 * float(normalized_right.mean()), 2),
              "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5),
              "cosine_p05": round(float(np.percentile(cos, 5)), 5), "scored_rows": int(right.size)}
    if fp32_right is not None:  # McNemar, as docs/BENCHMARKS.md calls ties
        lost, gained = int((fp32_right & ~right).sum()), int((~fp32_right & right).sum())
        result["discordant_vs_fp32"] = {"fp32_only_right": lost, "model_only_right": gained,
                                        "tie": bool(abs(lost - gained) <= 2 * np.sqrt(lost + gained))}
    return result, right


def model_files(path: str) -> list[str]:
    """The model file and every external data file it names."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    files = [path]
    folder = os.path.dirname(os.path.abspath(path))
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in tensor.external_data if e.key == "location")
            extra = os.path.join(folder, location)
            if extra not in files:
                files.append(extra)
    return files


class _Count:
    def __init__(self):
        self.bytes = 0

    def write(self, data) -> int:
        self.bytes += len(data)
        return len(data)

    def flush(self):
        pass


def sizes(path: str) -> dict:
    files = model_files(path)
    counter = _Count()
    with gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=9, mtime=0) as packed:
        for name in files:
            with open(name, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    packed.write(chunk)
    return {"bytes": sum(os.path.getsize(f) for f in files), "gzip9_bytes": counter.bytes,
            "files": [os.path.basename(f) for f in files]}


def latency_feed(tokenizer: str, texts: list[str]) -> tuple[dict, dict]:
    """A batch-1 feed of exactly LATENCY_TOKENS tokens: the first evaluation text that long (truncated, its
    [SEP] kept), else the longest one padded with mask 0."""
    lengths = [f["input_ids"].shape[1] for f in datasets.tokenize_rows(tokenizer, texts)]
    long_enough = [i for i, n in enumerate(lengths) if n >= LATENCY_TOKENS]
    row = long_enough[0] if long_enough else int(np.argmax(lengths))
    feed = datasets.tokenize_rows(tokenizer, [texts[row]], length=LATENCY_TOKENS)[0]
    return feed, {"eval_row": row, "source_row": CALIB_ROWS + row, "tokens": LATENCY_TOKENS,
                  "text_tokens_untruncated_max128": lengths[row], "real_tokens": int(feed["attention_mask"].sum())}


def latency_ms(paths: dict, feed: dict, runs: int, warmup: int = 10) -> dict:
    sessions = {}
    for name, path in paths.items():
        runner = session(path, latency=True)
        names = {i.name for i in runner.get_inputs()}
        sessions[name] = (runner, {k: v for k, v in feed.items() if k in names})
        for _ in range(warmup):
            runner.run(None, sessions[name][1])
    times = {name: [] for name in paths}
    for _ in range(runs):  # round-robin so machine drift hits every model alike
        for name, (runner, inputs) in sessions.items():
            start = time.perf_counter()
            runner.run(None, inputs)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: {"median_ms": round(float(np.median(v)), 3), "min_ms": round(float(np.min(v)), 3),
                   "p90_ms": round(float(np.percentile(v, 90)), 3)} for name, v in times.items()}


# ---------------------------------------------------------------- report

def _versions() -> dict:
    found = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for module in ("onnxruntime", "onnx", "tokenizers", "numpy"):
        try:
            found[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a version is informative only
            found[module] = None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "msq_onnx", "cli.py"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        found["git_head"] = head or None
        found["msq_onnx_uncommitted_changes"] = bool(dirty)
    except OSError:
        pass
    return found


def markdown(result: dict) -> str:
    rows = result["models"]
    lines = ["| model | top-1 (%) | drop vs FP32 | cosine | bytes | gzip -9 bytes | latency ms (96 tok) "
             "| latency / dynamic | latency / FP32 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value, form):
        return "-" if value is None else form.format(value)

    for row in rows:
        lines.append(" | ".join([
            f"| {row['name']}", cell(row.get("top1"), "{:.2f}"), cell(row.get("drop_vs_fp32"), "{:+.2f}"),
            cell(row.get("cosine_mean"), "{:.4f}"), cell(row.get("bytes"), "{:,}"),
            cell(row.get("gzip9_bytes"), "{:,}"), cell(row.get("latency_ms"), "{:.2f}"),
            cell(row.get("latency_vs_dynamic"), "{:.2f}x"), cell(row.get("latency_vs_fp32"), "{:.2f}x")]) + " |")
    return "\n".join(lines)


def conversions_markdown(result: dict) -> str:
    lines = ["| conversion | exit code | wall s | peak MiB | warnings |", "|---|---:|---:|---:|---|"]
    for row in result["models"]:
        run = row.get("conversion")
        if run:
            warnings = "; ".join(w.replace("|", "/") for w in run.get("warnings", [])) or "-"
            lines.append(f"| {row['name']} | {run['exit_code']} | {run['wall_s']} | {run['peak_mib']} | {warnings} |")
    return "\n".join(lines)


def write_outputs(result: dict, out: str, stem: str) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    json_path, md_path = os.path.join(out, stem + ".json"), os.path.join(out, stem + ".md")
    with open(json_path, "w") as handle:
        json.dump(result, handle, indent=1)
    setup = result["setup"]
    text = ["# MiniLM-L6 sentence embeddings on Debian descriptions (`bench/text_bench.py`)", "",
            f"{setup['calibration_rows']} calibration texts, {setup['evaluation_rows']} evaluation rows "
            f"({setup['scored_rows']} scored; class means from the other {setup['mean_rows']}). Top-1: "
            "nearest class mean (dot product with the means of the model's own L2-normalized embeddings); "
            "cosine: mean over the scored rows against FP32. Latency: batch 1, "
            f"{LATENCY_TOKENS} tokens, 1 intra-op / 1 inter-op thread, ORT_ENABLE_ALL, median of "
            f"{setup['latency_runs']} interleaved runs.", "", markdown(result), "", conversions_markdown(result), "",
            f"Command: `{result['command']}`"]
    for row in result["models"]:
        problem = row.get("skipped") or (row.get("conversion") or {}).get("error")
        if problem:
            text.insert(-1, f"{row['name']}: {row.get('skipped', '')}: "
                            f"{(row.get('conversion') or {}).get('error', '')}".rstrip(": ") + "\n")
    if setup.get("limit") is not None:
        text.insert(2, f"**Smoke run (--limit {setup['limit']}): not the benchmark's numbers.**\n")
    with open(md_path, "w") as handle:
        handle.write("\n".join(text) + "\n")
    return json_path, md_path


# ---------------------------------------------------------------- main

def parse_configs(specs: list[str]) -> list[tuple[str, list[str]]]:
    configs = []
    for spec in specs:
        name, sep, flags = spec.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"text_bench: --configs entry '{spec}' is not NAME:FLAGS (e.g. 'avg4:--avg-bits 4')")
        configs.append((name.strip(), shlex.split(flags)))
    return configs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED, help="the shared folder (default ../shared or "
                        "MSQ_SHARED)")
    parser.add_argument("--work", help="folder for splits and models (kept); default a temporary folder removed "
                        "at the end")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="msq-onnx runs as NAME:CLI-FLAGS (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model (median; default 50)")
    parser.add_argument("--limit", type=int, help="only the first N evaluation rows (smoke runs; written to "
                        "minilm-l6-limitN.*)")
    parser.add_argument("--skip-anchors", action="store_true", help="no ORT anchors, only FP32 and msq-onnx")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    args = parser.parse_args(argv)
    configs = parse_configs(args.configs)

    model = os.path.join(args.shared, "models", "minilm-l6", "model.onnx")
    tokenizer = os.path.join(args.shared, "models", "minilm-l6", "tokenizer.json")
    for needed in (model, tokenizer, os.path.join(args.shared, datasets.DEBIAN_TSV)):
        if not os.path.isfile(needed):
            print(f"skipped: '{needed}' not found (set --shared or MSQ_SHARED)")
            return 0
    if args.work:
        work = os.path.abspath(args.work)
        os.makedirs(work, exist_ok=True)
    else:
        work = tempfile.mkdtemp(prefix="msq-text-bench-")
    command = shlex.join(["python", "bench/text_bench.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args, configs, model, tokenizer, work, command)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def run(args, configs, model: str, tokenizer: str, work: str, command_line: str) -> int:
    started = time.time()
    calib, evaluation = datasets.debian_split(args.shared, work, calib=CALIB_ROWS, limit=args.limit)
    texts, labels = datasets.read_text_rows(evaluation)
    labels = np.array(labels)
    feeds = datasets.tokenize_rows(tokenizer, texts)
    print(f"{len(texts)} evaluation rows; FP32 reference embeddings", flush=True)
    reference = embeddings(model, feeds)
    fp32_scores, fp32_right = score(reference, reference, labels, None)
    rows = [{"name": "FP32", "key": "fp32", "path": model, "what": "../shared/models/minilm-l6/model.onnx",
             **fp32_scores}]

    if not args.skip_anchors:
        for kind, (name, what) in ANCHORS.items():
            output = os.path.join(work, f"{kind}.onnx")
            command = anchor_command(kind, model, output, calib, tokenizer)
            print(f"building {name}", flush=True)
            child = run_child(command)
            stderr = child.pop("stderr")
            if child["exit_code"] != 0:
                child["error"] = stderr.strip().splitlines()[-1][:500] if stderr.strip() else "no message"
            rows.append({"name": name, "key": kind, "path": output, "what": what,
                         "command": shlex.join(command), "conversion": child})

    for name, flags in configs:
        output = os.path.join(work, f"msq-{name}.onnx")
        report = os.path.join(work, f"msq-{name}.json")
        command = [sys.executable, os.path.join(ROOT, "cli.py"), model, output, "--calib", calib, "--eval", evaluation,
                   "--tokenizer", tokenizer, "--label-column", "label", *flags, "--report", report, "--quiet"]
        print(f"msq-onnx {name}: {' '.join(flags)}", flush=True)
        child = run_child(command)
        stderr = child.pop("stderr")
        child["warnings"] = [line for line in stderr.splitlines() if line.startswith(WARNING_PREFIX)]
        if child["exit_code"] not in (0, 3):
            child["error"] = stderr.strip()[-1500:] or "no message"
        row = {"name": f"msq-onnx {name}", "key": f"msq-{name}", "path": output, "what": " ".join(flags),
               "command": shlex.join(command), "conversion": child}
        if os.path.isfile(report):
            with open(report) as handle:
                row["msq_report"] = json.load(handle)
        rows.append(row)

    for row in rows[1:]:
        if not os.path.isfile(row["path"]) or (row["conversion"]["exit_code"] not in (0, 3)):
            row["skipped"] = "no model written"
            continue
        print(f"scoring {row['name']}", flush=True)
        try:
            scores, _ = score(embeddings(row["path"], feeds), reference, labels, fp32_right)
        except Exception as exc:  # noqa: BLE001 - a model ORT cannot run is a result, not a crash of the bench
            row["skipped"] = f"does not run: {str(exc).splitlines()[0][:300]}"
            continue
        row.update(scores)
        row["drop_vs_fp32"] = round(rows[0]["top1"] - scores["top1"], 2)
    rows[0]["drop_vs_fp32"] = 0.0

    timed = [row for row in rows if "skipped" not in row]
    for row in timed:
        row.update(sizes(row["path"]))
    feed, feed_info = latency_feed(tokenizer, texts)
    print(f"latency: {len(timed)} models x {args.runs} interleaved runs", flush=True)
    latency = latency_ms({row["key"]: row["path"] for row in timed}, feed, args.runs)
    dynamic = latency.get("ort-dynamic", {}).get("median_ms")
    for row in timed:
        row["latency"] = latency[row["key"]]
        row["latency_ms"] = latency[row["key"]]["median_ms"]
        row["latency_vs_fp32"] = round(row["latency_ms"] / latency["fp32"]["median_ms"], 3)
        row["latency_vs_dynamic"] = round(row["latency_ms"] / dynamic, 3) if dynamic else None
    for row in rows:
        row["path"] = os.path.basename(row["path"]) if row["key"] != "fp32" else row["what"]

    scored = int(len(texts) // 2)
    result = {"benchmark": "minilm-l6 sentence embeddings, Debian descriptions",
              "command": command_line,
              "setup": {"calibration_rows": CALIB_ROWS, "evaluation_rows": len(texts), "limit": args.limit,
                        "mean_rows": len(texts) - scored, "scored_rows": scored,
                        "top1": "nearest class mean: argmax over classes of embedding . mean of that class's "
                                "L2-normalized embeddings (even evaluation rows), scored on odd rows; "
                                "top1_normalized_means: the same with each mean re-normalized (cosine)",
                        "embedding_session": "onnxruntime CPU, default session options, batch 1, each text its "
                                             "own length (tokenizer.json truncates at 128)",
                        "latency_runs": args.runs, "latency_feed": feed_info,
                        "latency_session": "batch 1, intra_op 1, inter_op 1, ORT_ENABLE_ALL, 10 warm-up runs, "
                                           "models interleaved round-robin",
                        "work_folder": None if not args.work else os.path.abspath(args.work)},
              "environment": _versions(), "elapsed_s": round(time.time() - started, 1), "models": rows}
    stem = "minilm-l6" if args.limit is None else f"minilm-l6-limit{args.limit}"
    json_path, md_path = write_outputs(result, args.out, stem)
    print(markdown(result))
    print()
    print(conversions_markdown(result))
    for row in rows:
        if row.get("skipped") or (row.get("conversion") or {}).get("error"):
            print(f"{row['name']}: {row.get('skipped', '')} {(row.get('conversion') or {}).get('error', '')}".strip())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
