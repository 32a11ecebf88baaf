"""Stage 9: the report: JSON (schema in msq_onnx/report.schema.json), a
Markdown summary and PNG plots beside it.
"""

from __future__ import annotations

import json
import os

import onnx

from . import __version__
from .allocate import average_bits
from .fidelity import DECISION_KINDS, judged_channel
from .ops import STATIC
from .load import hidden_file_name, producer_map
from .write import _default_mode, create_empty, written_files

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "report.schema.json")


def _written_opset(path: str) -> int:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _weight_error(analysis, name: str, bits: int):
    choice = analysis.choices[name].get(bits)
    return 0.0 if choice is None else float(f"{choice.error:.6g}")  # float: no weight error


def _level_set(analysis, name: str, bits: int) -> list | None:
    """The integers a layer's levels were fitted to (weights.shared_levels); None: the width's uniform grid."""
    choice = analysis.choices[name].get(bits)
    return None if choice is None or choice.level_set is None else [int(v) for v in choice.level_set]


def _mode_reason(layer, analysis, chosen) -> str:
    mode = chosen.modes[layer.name]
    if mode == "float" and analysis.modes[layer.name].mode != "float":
        return "the allocator kept it in float"
    if mode != analysis.modes[layer.name].mode:
        return f"its {chosen.containers[layer.name]} container runs only as {mode} (--prefer size)"
    return analysis.modes[layer.name].reason


GZIP_BLOCK = 1 << 20  # bytes deflated apart: blocks run at once on the cores free for them
_WINDOW = 1 << 15  # deflate's window: each block starts with the 32 KB before it as its dictionary
_GZIP_FRAMING = 18  # gzip's header (10 bytes) and trailer (CRC-32 and size, 8)


def deflated_block(path: str, offset: int) -> bytes:
    """The file's block at `offset` (a multiple of GZIP_BLOCK), deflated at level 9 as pigz writes it: primed
    with the window before it and ended by a sync flush, the file's last block by the final one. The blocks
    joined in order between gzip's header and trailer are a gzip -9 stream of the file."""
    import zlib

    last = offset + GZIP_BLOCK >= os.path.getsize(path)
    with open(path, "rb") as handle:
        handle.seek(max(0, offset - _WINDOW))
        window = handle.read(offset - max(0, offset - _WINDOW))
        packer = zlib.compressobj(9, zlib.DEFLATED, -15, **({"zdict": window} if window else {}))
        return packer.compress(handle.read(GZIP_BLOCK)) + packer.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class GzipSize:
    """gzip -9 of the written files, what an app bundle or a download carries, measured in the background.

    Blocks of GZIP_BLOCK deflate apart, each from the 32 KB before it (pigz's way), so `threads` cores share the
    work; the size is within 0.13% of one serial stream's (EfficientNet-Lite0 at 3 bits +0.12%, MiniLM-L6 and
    ResNet-50 at 4 bits -0.006%), and a file of one block deflates byte for byte as gzip.compress(data, 9).
    `at_first` blocks run at once until widen(): the batch-1 latency timing holds one core meanwhile (ResNet-50's
    26 MB took 3.3 s on one thread, 1.9 s of it past the timing; 1.6 s on two)."""

    def __init__(self, paths, threads: int = 2, at_first: int = 1):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.paths = list(paths)
        sizes = [os.path.getsize(path) for path in self.paths]
        threads = max(1, threads)
        at_first = min(max(0, at_first), threads)
        self.permits, self.spare = threading.Semaphore(at_first), threads - at_first
        self.pool = ThreadPoolExecutor(threads)
        self.parts = [self.pool.submit(self._block, path, offset) for path, size in zip(self.paths, sizes)
                      for offset in range(0, max(size, 1), GZIP_BLOCK)]

    def _block(self, path: str, offset: int) -> int:
        with self.permits:
            return len(deflated_block(path, offset))

    def widen(self) -> None:
        for _ in range(self.spare):
            self.permits.release()
        self.spare = 0

    def result(self) -> int:
        self.widen()
        return sum(part.result() for part in self.parts) + _GZIP_FRAMING * len(self.paths)

    def cancel(self) -> None:
        """Drop the blocks not started (their size is not wanted), and let the running ones finish."""
        self.widen()
        self.pool.shutdown(cancel_futures=True)

    def __enter__(self) -> "GzipSize":
        return self

    def __exit__(self, *failed) -> None:
        if failed[0] is not None:
            self.cancel()
        self.widen()
        self.pool.shutdown()


def gzip_size(paths) -> int:
    """GzipSize on every usable core at once."""
    from .instrument import usable_cores

    cores = usable_cores()
    with GzipSize(paths, cores, cores) as packed:
        return packed.result()


def _written_wide_inputs(path: str) -> set:
    """The nodes of the written model that read an activation dequantized from 16-bit integers: what ORT's quantizer
    wrote, which is not always what --act16 asked for (a tensor that comes through a Flatten or a MaxPool takes its
    source's uint8, a hunting subagent found: the report said 16)."""
    model = onnx.load(path, load_external_data=False)
    producers = producer_map(model.graph.node)
    types = {t.name: t.data_type for t in model.graph.initializer}
    sixteen = (onnx.TensorProto.UINT16, onnx.TensorProto.INT16)

    def wide(name: str) -> bool:
        source = producers.get(name)
        return source is not None and source.op_type == "DequantizeLinear" and len(source.input) > 2 \
            and types.get(source.input[2]) in sixteen
    return {node.name for node in model.graph.node if any(wide(name) for name in node.input)}


def _left_in_float(loaded) -> list:
    """One entry a node that cannot be a layer, with the float parameters it reads (counted at 32 bits in
    avg_weight_bits, so the average can be recomputed from the report); a weight two such nodes share is counted once,
    with the first."""
    entries, counted = {}, set()
    for skipped in loaded.skipped:
        entry = entries.setdefault((skipped["node"], skipped["reason"]), {
            **{k: v for k, v in skipped.items() if k not in ("weight", "params")}, "params": 0})
        weight = skipped.get("weight")
        if weight and weight not in counted:
            counted.add(weight)
            entry["params"] += loaded.skipped_params(skipped)
    return list(entries.values())


def build_report(model_path, output_path, loaded, options, chosen, params, analysis, op_counts, fused,
                 timings, total_seconds, *, activation_errors, residual, warnings, latency,
                 gzip_bytes: int, fixed_params=0, search=None, reduce_range=None, reallocation=None) -> dict:
    bits, modes, measured = chosen.bits, chosen.modes, chosen.measured
    shares = analysis.stats.residual_share or {}
    files = written_files(output_path)
    wide = _written_wide_inputs(output_path)
    layers = [{
        "name": layer.name,
        "op_type": layer.op_type,
        "params": layer.params,
        "bits": bits[layer.name],
        "predictor_accuracy": round(analysis.scores[layer.name].top1, 6) if layer.name in analysis.scores else None,
        "predictor_score": round(analysis.scores[layer.name].soft, 6) if layer.name in analysis.scores else None,
        "in_body": layer.in_body or None,
        "importance": round(analysis.importance[layer.name], 6),
        "upstream": analysis.upstream[layer.name],
        # its branch's share of the power where its error joins a residual stream, and what the knapsack weighs
        # its error by (allocate.residual_weights: 1 without a join)
        "residual_share": round(shares[layer.name], 6) if layer.name in shares else None,
        "residual_weight": round(residual[layer.name], 6) if layer.name in residual else 1.0,
        "weight_error": _weight_error(analysis, layer.name, bits[layer.name]),
        # null: the input's range was not measured (the layer could not end static)
        "activation_error": float(f"{activation_errors[layer.name]:.6g}") if layer.name in activation_errors else None,
        "activation_bits": 16 if modes[layer.name] == STATIC and layer.nodes[0] in wide else 8,
        "mode": modes[layer.name],
        "mode_reason": _mode_reason(layer, analysis, chosen),
        "container": chosen.containers[layer.name],
        "level_set": _level_set(analysis, layer.name, bits[layer.name]),
        "bytes": int(layer.kind.container_bytes(layer, chosen.containers[layer.name])),
        "mode_errors": {mode: float(f"{error:.6g}") for mode, error in analysis.modes[layer.name].errors.items()},
        "nodes": list(layer.nodes),
    } for layer in loaded.layers]
    report = {
        "tool": "msq-onnx",
        "version": __version__,
        "input_model": os.path.abspath(model_path),
        "output_model": os.path.abspath(output_path),
        "options": {
            "avg_bits": options.avg_bits, "bits": list(options.bits), "allocator": options.allocator,
            "importance_exponent": options.importance_exponent, "act16": options.act16,
            "levels": list(options.levels), "max_dim": options.max_dim, "seed": options.seed,
            "bias_correction": options.bias_correction, "clip_search": options.clip_search,
            "residual_weights": options.residual_weights, "level_sets": options.level_sets,
            "batch_size": options.batch_size, "max_drop": options.max_drop, "max_size": options.max_size,
            "min_cosine": options.min_cosine, "output": loaded.output_name, "activations": options.activations,
            "prefer": options.prefer, "rounding": options.rounding, "max_latency": options.max_latency,
            "reduce_range": options.reduce_range, "on_collapse": options.on_collapse,
        },
        "reduce_range": reduce_range,
        "opset": {"input": loaded.source_opset, "output": _written_opset(output_path),
                  "raised_for_int2": any(c == "int2" for c in chosen.containers.values())},
        "calibration": {"samples": analysis.stats.samples, "labels_source": analysis.labels.source,
                        "classes": analysis.labels.classes,
                        "input_accuracy": round(analysis.input_score.top1, 6),
                        "input_score": round(analysis.input_score.soft, 6),
                        "inputs_given_whole": [spec.name for spec in loaded.inputs if spec.name in loaded.sample_axes]},
        "layers": layers,
        "avg_weight_bits": round(average_bits(bits, params, fixed_params), 6),
        "modes": {mode: sum(1 for m in modes.values() if m == mode) for mode in sorted(set(modes.values()))},
        "left_in_float": _left_in_float(loaded)  # one entry a node, not one a weight
        + [{"node": name, "op_type": next(l.op_type for l in loaded.layers if l.name == name),
            "reason": "kept in float by the allocator", "params": params[name]}
           for name, mode in modes.items() if mode == "float"],
        "already_quantized": loaded.prequantized,
        "warnings": list(warnings),
        "activation_modes": {"tolerance": options.mode_tolerance, "end_to_end": analysis.mode_log,
                             **({"judged": loaded.judged_text} if loaded.judged_text else {})},
        "size_bytes": {"input": int(loaded.size_bytes), "file": int(sum(os.path.getsize(p) for p in files)),
                       "gzip": gzip_bytes, "layers": sum(layer["bytes"] for layer in layers)},
        "latency_ms": latency,
        "quantized_layers": len(layers),
        "fused_integer_kernels": int(fused),
        "optimized_ops": dict(sorted(op_counts.items())),
        "evaluation": measured,
        "fp32_top1": measured.get("fp32_top1") if measured else None,
        "quant_top1": measured.get("quant_top1") if measured else None,
        "agreement": measured.get("agreement") if measured else None,
        "cosine": measured.get("cosine") if measured else None,
        "timings_s": dict(timings, total=round(total_seconds, 3)),
    }
    if search is not None:
        report["search"] = search
    if reallocation is not None:
        report["reallocation"] = reallocation
    if (options.max_drop is not None or options.min_cosine is not None) and measured is not None:
        from .pipeline import gate_passed

        report["gate"] = {"max_drop": options.max_drop, "drop": _round(measured.get("drop")),
                          "min_cosine": options.min_cosine, "cosine": measured["cosine"],
                          "weakest_channel": judged_channel(measured),
                          "passed": bool(gate_passed(measured, options))}
    return report


def _round(value):
    return None if value is None else round(value, 6)


def check_report_path(path: str, model_paths: tuple = ()) -> None:
    """Before any work: a report that cannot be written must not cost a conversion (nor leave the model written
    beside a failure), and must not overwrite the input or output model (model_paths)."""
    from .errors import BadOption

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BadOption(f"report folder '{folder}' does not exist; create it first.")
    stem = _stem(path)
    models = {os.path.abspath(p) for p in model_paths}
    for target in (path, stem + ".md", stem + ".layers.png", stem + ".search.png"):
        if os.path.isdir(target):
            raise BadOption(f"report file '{target}' is a folder; give --report a name whose files are free.")
        if os.path.abspath(target) in models:
            raise BadOption(f"report file '{target}' is the model '{target}' itself; give --report another name.")


def _atomic_write(path: str, data: bytes) -> None:
    temporary = hidden_file_name(os.path.dirname(os.path.abspath(path)), ".msq-", ".tmp")
    try:
        create_empty(temporary)
        with open(temporary, "wb") as out:
            out.write(data)
        os.chmod(temporary, _default_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _stem(path: str) -> str:
    return path[:-5] if path.endswith(".json") else path


def markdown(report: dict) -> str:
    lines = ["# msq-onnx report", "",
             f"- input: `{report['input_model']}` ({report['size_bytes']['input']:,} bytes, opset "
             f"{report['opset']['input']})",
             f"- output: `{report['output_model']}` ({report['size_bytes']['file']:,} bytes written, "
             f"{report['size_bytes']['gzip']:,} gzip -9, opset {report['opset']['output']})",
             "- batch-1 latency, 1 thread (ms): " + ", ".join(
                 f"{k} {v}" for k, v in report["latency_ms"].items() if isinstance(v, float)),
             f"- average weight bits: {report['avg_weight_bits']:.3f} (budget: {report['options']['avg_bits']}, "
             f"allocator: {report['options']['allocator']})",
             f"- fused integer kernels: {report['fused_integer_kernels']} for {report['quantized_layers']} layers",
             f"- calibration: {report['calibration']['samples']} samples, predictor labels from "
             f"{report['calibration']['labels_source']}"]
    evaluation = report.get("evaluation")
    if evaluation:
        lines.append(f"- task output `{evaluation['task_output']}` ({evaluation['kind']}) on {evaluation['samples']} "
                     f"held-out samples: cosine to FP32 {evaluation['cosine']:.4f}, SQNR {evaluation['sqnr_db']} dB")
        if evaluation.get("fp32_top1") is not None:
            lines.append(f"- top-1: FP32 {evaluation['fp32_top1']:.2f}%, quantized {evaluation['quant_top1']:.2f}% "
                         f"(drop {evaluation['drop']:.2f} points)")
        if evaluation.get("agreement") is not None:
            measure = "top-1" if evaluation["kind"] in DECISION_KINDS else "nearest neighbour"
            lines.append(f"- agreement with FP32 ({measure}): {evaluation['agreement']:.2f}%")
        for name, out in evaluation["outputs"].items():
            lines.append(f"- output `{name}`: cosine {out['cosine']:.4f} (min {out['min_cosine']:.4f}), "
                         f"SQNR {out['sqnr_db']} dB")
    lines.append("- activation modes: " + ", ".join(f"{mode} {count}" for mode, count in report["modes"].items()))
    for warning in report.get("warnings", []):
        lines.append(f"- **warning**: {warning}")
    reallocation = report.get("reallocation")
    if reallocation:
        figure = reallocation["weakest_figure"]
        compared = (f"weakest figure on {reallocation['calibration_samples']} calibration samples "
                    f"{figure['first']:.4f} first, {figure['reallocated']:.4f} again" if figure else
                    "the same allocation again")
        lines.append(f"- the first allocation collapsed on the held-out samples; allocated again "
                     f"({reallocation['allocator']}, {reallocation['seconds']:.1f} s): {compared}; kept the "
                     f"{reallocation['kept']} one")
    if report.get("search"):
        tried = ", ".join(f"{p['avg_bits']:.2f} bits: drop {p['drop']}, cosine {p['cosine']:.4f}"
                          for p in report["search"])
        evaluated = sum(1 for probe in report["search"] if not probe.get("reused"))
        lines.append(f"- budget search ({len(report['search'])} budgets, {evaluated} models evaluated): {tried}")
    gate = report.get("gate")
    if gate:
        weakest = gate.get("weakest_channel") if gate["min_cosine"] is not None else None
        channel = (f", weakest channel {weakest['index']} of axis {weakest['axis']} at cosine {weakest['cosine']:.4f}, "
                   f"relative error {weakest['relative_error']:.4f}" if weakest else "")
        lines.append(f"- accuracy gate (--max-drop {gate['max_drop']}, --min-cosine {gate['min_cosine']}{channel}): "
                     f"**{'passed' if gate['passed'] else 'FAILED'}**")
    lines += ["", "| # | layer | op | params | predictor top-1 | predictor score | importance | residual weight | "
              "bits | mode | container | bytes | rel. output error |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for index, layer in enumerate(report["layers"]):
        predictor = ("inside " + layer["in_body"] + " | no probe" if layer.get("in_body") else
                     f"{layer['predictor_accuracy']:.3f} | {layer['predictor_score']:.4f}")
        lines.append(f"| {index} | `{layer['name']}` | {layer['op_type']} | {layer['params']:,} | {predictor} | "
                     f"{layer['importance']:.4f} | {layer['residual_weight']:.3f} | {layer['bits']} | "
                     f"{layer['mode']} | {layer['container']}{' (fitted levels)' if layer['level_set'] else ''} | "
                     f"{layer['bytes']:,} | "
                     f"{layer['weight_error']:.2e} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()), ""]
    return "\n".join(lines)


def plot_layers(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    x = range(len(layers))
    figure, axes = plt.subplots(3, 1, figsize=(max(8, len(layers) * 0.18), 7), sharex=True)
    for key, label in (("predictor_accuracy", "LOO top-1"), ("predictor_score", "soft score")):  # a gap: no probe
        axes[0].plot(x, [float("nan") if layer[key] is None else layer[key] for layer in layers], marker=".", label=label)
    axes[0].set_ylabel("predictor")
    axes[0].legend(fontsize=8)
    axes[1].bar(x, [layer["importance"] for layer in layers])
    axes[1].set_ylabel("importance")
    weighed = axes[1].twinx()  # what the knapsack weighs each layer's error by (1: nothing dilutes it)
    weighed.step(x, [layer["residual_weight"] for layer in layers], where="mid", color="tab:red", linewidth=1)
    weighed.set_ylim(0, 1.05)
    weighed.set_ylabel("residual weight", color="tab:red", fontsize=8)
    colours = {"static": "tab:orange", "dynamic": "tab:blue", "weight-only": "tab:green", "float": "tab:gray"}
    bars = axes[2].bar(x, [min(layer["bits"], 9) for layer in layers], color=[colours[layer["mode"]] for layer in layers])
    for bar, layer in zip(bars, layers):
        if layer.get("level_set"):
            bar.set_hatch("//")
    from matplotlib.patches import Patch

    axes[2].legend(handles=[Patch(color=colour, label=mode) for mode, colour in colours.items()]
                   + [Patch(facecolor="white", hatch="//", label="fitted levels")], fontsize=7, ncol=5)
    axes[2].set_ylabel("weight bits (float at top)")
    axes[2].set_xlabel("layer (network order)")
    axes[0].set_title(f"msq-onnx: {os.path.basename(report['input_model'])}, "
                      f"avg {report['avg_weight_bits']:.2f} bits")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_accuracy_vs_size(points: list[dict], path: str, title: str, x: str = "avg_bits",
                          xlabel: str = "average weight bits (model size)") -> None:
    """points: {label, x, top1}; one line per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label in sorted({p["label"] for p in points}):
        series = sorted((p[x], p["top1"]) for p in points if p["label"] == label)
        axis.plot([s[0] for s in series], [s[1] for s in series], marker="o", label=label)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("top-1 (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report: dict, path: str) -> list[str]:
    """Write FILE.json, FILE.md, FILE.layers.png and, after a --max-drop search, FILE.search.png."""
    stem = _stem(path)
    _atomic_write(path, (json.dumps(report, indent=2, sort_keys=False) + "\n").encode())
    _atomic_write(stem + ".md", markdown(report).encode())
    plot_layers(report, stem + ".layers.png")
    written = [path, stem + ".md", stem + ".layers.png"]
    fp32 = (report.get("evaluation") or {}).get("fp32_top1")
    if report.get("search"):
        reference = fp32 if fp32 is not None else 100.0  # without labels: agreement with FP32
        points = [{"label": "budgets tried", "bytes": probe["bytes"] / 1e6,
                   "top1": reference - probe["drop"] if probe["drop"] is not None else 100.0 * probe["cosine"]}
                  for probe in report["search"]]
        plot_accuracy_vs_size(points, stem + ".search.png",
                              "held-out top-1 (or agreement, or 100 x cosine) per budget tried", x="bytes",
                              xlabel="bytes written (MB)")
        written.append(stem + ".search.png")
    return written


def summary(report: dict) -> dict:
    """The machine-readable line for --json."""
    keys = ("output_model", "avg_weight_bits", "size_bytes", "fp32_top1", "quant_top1", "agreement",
            "fused_integer_kernels", "quantized_layers", "modes", "warnings", "gate")
    return {k: report.get(k) for k in keys if k in report}
