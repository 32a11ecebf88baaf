"""Command line: ``msq-onnx in.onnx out.onnx --calib DATA [options]``.

Exit codes: 0 success; 2 bad input or usage; 3 accuracy gate failed (model and
report still written); 1 internal error.
"""

from __future__ import annotations

import _thread
import argparse
import json
import os
import signal
import sys
import threading
import time
import warnings

from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, MsqError, one_line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and the bad-input code, like every other bad input
        sys.stderr.write(f"msq-onnx: error: {message}; see msq-onnx --help\n")
        sys.exit(EXIT_BAD_INPUT)


def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None
    return values


def _float_list(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def build_parser() -> argparse.ArgumentParser:
    from .allocate import ALLOCATORS, DEFAULT_BITS, IMPORTANCE_EXPONENT
    from .features import DEFAULT_LEVELS, DEFAULT_MAX_DIM
    from .fidelity import OUTPUT_KINDS

    parser = _Parser(
        prog="msq-onnx",
        description="Post-training mixed-precision quantization of an FP32 ONNX model (CNNs, transformers, "
                    "integer or several inputs; class scores, embeddings or maps) for ONNX Runtime. Per layer: a "
                    "bit-width chosen by MSQ (pyramid-pooled, weight-imprinted task predictors after every layer) "
                    "and measured error under a budget, an activation mode measured for damage and speed (static "
                    "uint8, dynamic int8, weight-only, float) and a weight container (--prefer). Every output is "
                    "compared with FP32 on held-out samples.",
        epilog="Exit codes: 0 success (warnings on stderr), 2 bad input or usage, 3 an accuracy gate (--max-drop, "
               "--min-cosine) failed, 1 internal error, 130 interrupted.",
    )
    parser.add_argument("input", help="FP32 ONNX model (opset 7-26; never modified)")
    parser.add_argument("output", help="where to write the QDQ model (written atomically)")
    parser.add_argument("--calib", required=True, metavar="PATH",
                        help="calibration samples: ImageFolder folder, folder or CSV with labels.csv "
                             "(file,label), .npz file/folder (arrays named after model inputs, optional "
                             "integer 'labels'; per-sample files may differ in sequence length), or text "
                             "(.tsv/.csv/.jsonl/.txt with --tokenizer). Without labels the FP32 outputs serve.")
    parser.add_argument("--eval", metavar="PATH", help="held-out samples (same formats) on which every output is "
                        "compared with FP32 (default: every 5th --calib sample, then not calibrated on)")
    parser.add_argument("--output", dest="task_output", metavar="NAME",
                        help="the output the task is judged on when the model has several (default: the first "
                             "float output of rank >= 2)")
    parser.add_argument("--output-kind", choices=OUTPUT_KINDS,
                        help="what an [N, C] task output holds, when its name and values do not say: class scores "
                             "are judged by top-1 agreement, embeddings and tensors by cosine (default: probability "
                             "rows or a name with logit/prob/score/cls are class scores, embed/hidden/pool an "
                             "embedding, box/coord/offset a tensor; else unit-norm rows an embedding). An [N, T, C] "
                             "output declared or named as class scores is judged by its arg-max at each position")
    budget = parser.add_argument_group("bit allocation")
    budget.add_argument("--avg-bits", type=float, metavar="B",
                        help="parameter-weighted average weight bit-width to stay at or under (default: no budget, "
                             "every layer at the widest candidate; weights left in float count at 32 bits)")
    budget.add_argument("--bits", type=_int_list, default=DEFAULT_BITS, metavar="LIST",
                        help="candidate weight widths, comma-separated, each 2..8 (default 2,3,4,5,6,7,8)")
    budget.add_argument("--allocator", choices=ALLOCATORS, default=ALLOCATORS[0],
                        help="ilp: knapsack of MSQ importance x residual weight x measured output error "
                             "(default); greedy: the paper's rule, least important layers get fewer bits first "
                             "(greedy-step: one width at a time); sensitivity: knapsack on output damage measured "
                             "one layer and width at a time (AIMET-style, slow); msq-task: knapsack of each layer's "
                             "error weighted by the task predictor's loss with that layer alone at the narrowest "
                             "width (one pass per layer); output-weighted: knapsack of each layer's error weighted "
                             "by what that layer alone at the narrowest width does to every output and channel "
                             "(one pass per layer, 8-32 samples)")
    budget.add_argument("--on-collapse", choices=("reallocate", "warn"), default="reallocate",
                        help="when the default allocator's model collapses on the held-out samples under a budget: "
                             "reallocate (default) allocates again output-weighted and keeps the one nearer FP32 on "
                             "calibration samples; warn only says it")
    budget.add_argument("--importance-exponent", type=float, default=IMPORTANCE_EXPONENT, metavar="E",
                        help=f"ilp damage = importance^E x measured output error (default {IMPORTANCE_EXPONENT}, the "
                             "tuning protocol's choice: each layer's measured error alone; 1 is the plain product)")
    budget.add_argument("--max-size", type=float, metavar="BYTES",
                        help="bound on the bytes written (model file plus external data): bytes, or a fraction "
                             "(<= 1) of the input model's size. With --prefer speed (int8 containers) it may be "
                             "unreachable: --prefer size writes int4/int2 containers")
    budget.add_argument("--max-latency", type=float, metavar="R",
                        help="batch-1 latency at most R times FP32's (each layer timed alone on this machine in "
                             "each mode and container, cached): with --prefer size, the smallest model no slower "
                             "than R; needs fixed input sizes besides the batch")
    budget.add_argument("--prefer", choices=("speed", "size"), default="speed",
                        help="speed (default): int8 containers on ORT's fused integer kernels (the k-bit levels "
                             "show in gzip size, not on disk); size: the narrowest container ORT runs: int4/int2 "
                             "MatMul weights (MatMulNBits), int4 Conv weights (slower: float Conv), 4-bit "
                             "embedding tables (GatherBlockQuantized, used in both)")
    budget.add_argument("--max-drop", type=float, metavar="POINTS",
                        help="accuracy gate: exit 3 if the task output's held-out top-1 drop exceeds POINTS (without "
                             "labels: disagreement with FP32 in points). Without --avg-bits or --max-size it also "
                             "searches for the smallest budget that passes the gates, past the widest widths by "
                             "leaving the most damaged layers in float")
    budget.add_argument("--min-cosine", type=float, metavar="C",
                        help="accuracy gate: exit 3 if the task output's mean cosine to FP32 on held-out samples "
                             "is below C (0 < C <= 1), or one channel of it (a map's or a detector's short axis) "
                             "below the lower of C and 0.9 (its cosine, or the cosine noise alone leaves at its "
                             "relative error, the lower); searches like --max-drop")
    budget.add_argument("--activations", choices=("auto", "static", "dynamic", "weight-only"), default="auto",
                        help="activation mode of every layer: auto (default) measures each layer and takes the "
                             "fastest mode whose output error is small; static = uint8 QDQ (fused integer "
                             "kernels), dynamic = per-batch int8 (MatMul/Gemm), weight-only = DQ(weight) -> MatMul/Conv "
                             "(ORT's MatMulNBits then quantizes MatMul inputs to int8 per block of 32)")
    budget.add_argument("--reduce-range", choices=("auto", "on", "off"), default="auto",
                        help="7-bit weights for the layers ORT's u8s8 integer kernels run (its reduce_range): auto "
                             "(default) where this machine's kernels saturate on 8-bit weights (AVX2 or AVX512 "
                             "without VNNI), on for such a target, off: 8 bits wherever allocated")
    budget.add_argument("--act16", type=int, default=0, metavar="N",
                        help="keep the inputs of the N layers with the largest uint8 activation error (ranges "
                             "dominated by outliers) in uint16; those layers lose ORT's fused integer kernel. "
                             "Layers fed through a Flatten, MaxPool, Reshape ... from another static layer keep "
                             "its uint8 in ORT's quantizer and are not chosen (default 0)")
    budget.add_argument("--rounding", choices=("gptq", "nearest"), default="gptq",
                        help="gptq (default): round each dense layer column by column, compensating the error "
                             "through its input Hessian (even samples of the last 128), kept per width where it "
                             "beats round-to-nearest on the odd ones; nearest: round to nearest")
    budget.add_argument("--no-bias-correction", action="store_true",
                        help="do not correct the bias shift caused by weight quantization")
    budget.add_argument("--no-residual-weights", action="store_true",
                        help="ilp: weigh every layer's error alike, not by the share of it a residual stream keeps "
                             "(x + f(x): f's power over the sum's, measured in the calibration pass)")
    budget.add_argument("--uniform-levels", action="store_true",
                        help="keep every width's levels evenly spaced; by default a 2-4-bit layer in an int8 "
                             "container (not --prefer size's int4) takes 2^k levels fitted to its weights, one "
                             "set of 7-bit integers per layer, where that has less error")
    budget.add_argument("--no-clip-search", action="store_true",
                        help="use min-max weight ranges instead of searching each channel's clipping range")
    msq = parser.add_argument_group("MSQ analysis")
    msq.add_argument("--levels", type=_int_list, default=DEFAULT_LEVELS, metavar="LIST",
                     help="pyramid pooling levels (default 1,2,4; 1 alone = single-scale global pooling)")
    msq.add_argument("--max-dim", type=int, default=DEFAULT_MAX_DIM, metavar="N",
                     help=f"cap on each layer's embedding size; wider embeddings are signed-hashed down to it "
                          f"(default {DEFAULT_MAX_DIM})")
    msq.add_argument("--batch-size", type=int, default=1, metavar="N",
                     help="samples per ONNX Runtime call (models with a fixed batch use theirs; default 1: "
                          "measured fastest and smallest on CPU, as exposed probes scale with the batch)")
    msq.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    images = parser.add_argument_group("image preprocessing (0..255 pixels: resize short side, center crop, "
                                       "(x - mean) / std)")
    images.add_argument("--resize", type=int, metavar="N", help="short side before cropping (default crop/0.875)")
    images.add_argument("--crop", type=int, metavar="N", help="center crop size (default: the model's input size)")
    images.add_argument("--mean", type=_float_list, default=(0.0,), metavar="LIST",
                        help="per-channel mean on the 0..255 scale, e.g. 123.675,116.28,103.53 (default 0)")
    images.add_argument("--std", type=_float_list, default=(1.0,), metavar="LIST",
                        help="per-channel std on the 0..255 scale, e.g. 58.395,57.12,57.375 (default 1)")
    images.add_argument("--channel-order", choices=("rgb", "bgr"), default="rgb")
    images.add_argument("--layout", choices=("auto", "nchw", "nhwc"), default="auto",
                        help="image tensor layout (auto: from the model's input shape)")
    images.add_argument("--interpolation", choices=("bilinear", "bicubic"), default="bilinear")
    text = parser.add_argument_group("text (for --calib/--eval .tsv, .csv, .jsonl or .txt files)")
    text.add_argument("--tokenizer", metavar="tokenizer.json", help="a Hugging Face tokenizers file")
    text.add_argument("--text-column", default="text", help="column (or JSON key) of the text (default text)")
    text.add_argument("--label-column", default="label",
                      help="column of the label (default label; strings map to classes in sorted order)")
    out = parser.add_argument_group("output")
    out.add_argument("--report", metavar="FILE.json",
                     help="write the JSON report, plus FILE.md and FILE.layers.png beside it")
    out.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    out.add_argument("--quiet", action="store_true", help="no progress bars or summary text")
    return parser


def options_from(args):
    from .pipeline import Options
    from .data import Preprocess

    preprocess = Preprocess(resize=args.resize, crop=args.crop, mean=args.mean, std=args.std,
                            channel_order=args.channel_order, layout=args.layout,
                            interpolation=args.interpolation, tokenizer=args.tokenizer,
                            text_column=args.text_column, label_column=args.label_column)
    return Options(avg_bits=args.avg_bits, bits=args.bits, allocator=args.allocator,
                   importance_exponent=args.importance_exponent, act16=args.act16, levels=args.levels,
                   max_dim=args.max_dim, eval_path=args.eval, max_drop=args.max_drop, max_size=args.max_size,
                   min_cosine=args.min_cosine, output=args.task_output, output_kind=args.output_kind,
                   activations=args.activations,
                   prefer=args.prefer, rounding=args.rounding, max_latency=args.max_latency,
                   reduce_range=args.reduce_range, on_collapse=args.on_collapse, preprocess=preprocess,
                   batch_size=args.batch_size, seed=args.seed, quiet=args.quiet or args.json,
                   bias_correction=not args.no_bias_correction, clip_search=not args.no_clip_search,
                   residual_weights=not args.no_residual_weights,
                   level_sets=not args.uniform_levels)


_interrupted = False


def _interrupt(signum, frame):
    # Remember it: an interrupt that lands inside a C extension's import (numpy,
    # onnxruntime) surfaces as an ImportError rather than KeyboardInterrupt.
    global _interrupted, _deferred
    if _finishing:
        return  # the work is done: it stands
    _interrupted = True
    if _handing_over_a_lock(frame) and _deferred < MAX_DEFERRALS:
        # Raised in a Condition's __enter__ (its lock just taken) or __exit__ (not yet given back), the exception
        # leaves the lock held, and the worker threads, then the interpreter's exit, wait on it for ever: a
        # conversion interrupted in its pass hung so. Sent again a moment later, once the main thread is past it, by
        # one thread at a time (a second interrupt meanwhile asks the same), started without waiting for it.
        if not _retry_pending:
            _deferred += 1
            _start_retry(signum)
        return
    raise KeyboardInterrupt


RETRY_INTERRUPT_SECONDS = 0.01
MAX_DEFERRALS = 100  # a frame that never moves on gets the interrupt anyway, after a second
_deferred = 0
_finishing = False
_retry_pending = False
_run_number = 0  # a retry from an earlier main() in this process sends nothing into a later one
_retry_lock = threading.Lock()  # held while a retry sends its signal, and while main() ends the run


def _start_retry(signum) -> None:
    global _retry_pending
    _retry_pending = True
    try:
        _thread.start_new_thread(_send_again, (signum, _run_number))
    except RuntimeError:  # no thread to be had: the interrupt stays noted (_interrupted), unraised
        _retry_pending = False


def _send_again(signum, run: int) -> None:
    global _retry_pending
    time.sleep(RETRY_INTERRUPT_SECONDS)
    with _retry_lock:
        _retry_pending = False  # first: the signal's handler, if it must defer again, starts another retry
        if not _finishing and run == _run_number:
            os.kill(os.getpid(), signum)


def _handing_over_a_lock(frame) -> bool:
    """Whether the main thread is in threading's own __enter__ or __exit__ (a blocking wait or join is not: an
    interrupt there unwinds cleanly, and is raised at once)."""
    return frame is not None and frame.f_code.co_name in ("__enter__", "__exit__") and \
        os.path.abspath(frame.f_code.co_filename) == os.path.abspath(threading.__file__)


def _stop_retrying() -> None:
    """The run is over: no retry sends anything from here on. One sent just before is dropped by _interrupt, which
    runs for it before the caller's handlers come back (CPython runs a pending handler as a call returns, and
    signal.signal runs it before it replaces the handler)."""
    global _finishing
    _finishing = True  # first: a handler that runs from here on (while the lock below is awaited too) drops its signal
    with _retry_lock:  # a retry sending right now finishes; none sends after
        pass


def _human_summary(report: dict) -> str:
    text = (f"wrote {report['output_model']}: {report['quantized_layers']} layers, average "
            f"{report['avg_weight_bits']:.2f} weight bits, {report['fused_integer_kernels']} fused integer kernels")
    text += " (" + ", ".join(f"{count} {mode}" for mode, count in report["modes"].items()) + ")"
    if report.get("quant_top1") is not None:
        text += f"; top-1 FP32 {report['fp32_top1']:.2f}% -> {report['quant_top1']:.2f}%"
    elif report.get("agreement") is not None:
        text += f"; agreement with FP32 {report['agreement']:.2f}%"
    if report.get("cosine") is not None:
        text += f"; cosine to FP32 {report['cosine']:.4f}"
    if report.get("reallocation", {}).get("kept") == "reallocated":
        text += "; allocated again after the first allocation collapsed (report: reallocation)"
    return text


def _allocator_for_a_run() -> None:
    """One glibc arena for every thread: the pass's and the error tables' worker threads otherwise each get an
    arena of their own, whose freed blocks stay mapped beside the main heap's (EfficientNet-Lite0's peak 305-322
    MB with glibc's defaults, 281-287 MB with one arena; the stages' malloc_trim then returns one heap's free
    pages). glibc's mmap threshold keeps its dynamic rise: fixed at 1 MB (every larger block mapped on its own
    and unmapped when freed) the peak was 273-277 MB, but every array of a megabyte or more cost page faults
    again: EfficientNet-Lite0 9.2-10.2 -> 8.0-9.1 s, MiniLM-L6 15.6-16.0 -> 14.2 s (peak 627-632 -> 643-644 MB;
    ORT's quantize_static 278 and 637 MB). The CLI's own process only: the Python API leaves its caller's
    allocator alone."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): its own policy stands


def main(argv=None) -> int:
    # SIGTERM unwinds like Ctrl-C so temporary files are removed; the output
    # is only ever replaced by an atomic rename, so it is never half-written.
    # The handlers are put back on the way out: a signal after the work is done
    # (the interpreter shutting down) must not turn exit 0 into a traceback.
    global _finishing, _deferred, _interrupted, _run_number
    _allocator_for_a_run()
    with _retry_lock:
        _finishing, _deferred, _interrupted, _run_number = False, 0, False, _run_number + 1
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return _run(argv)
    finally:
        _stop_retrying()
        for number, handler in previous.items():
            if handler is not None:  # None: set outside Python, nothing we can put back
                signal.signal(number, handler)


def _run(argv) -> int:
    try:
        if hasattr(signal, "pthread_sigmask"):  # cli.py holds them while it imports; delivered here if pending
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("msq-onnx: interrupted; nothing was written", file=sys.stderr)
        return 130
    if not os.environ.get("MSQ_DEBUG"):
        warnings.simplefilter("ignore")  # library warnings would break the one-line error contract
    try:
        from .pipeline import convert, enforce_gate
        from .report import check_report_path, summary, write_report

        if args.report:
            check_report_path(args.report, (args.input, args.output))
        result = convert(args.input, args.output, args.calib, options_from(args))
        if args.report:
            write_report(result.report, args.report)
        for warning in result.report["warnings"]:  # even with --quiet: a result we cannot stand behind
            print(f"msq-onnx: warning: {warning}", file=sys.stderr)
        if args.json:
            print(json.dumps(summary(result.report)))
        elif not args.quiet:
            print(_human_summary(result.report), file=sys.stderr)
        enforce_gate(result)
        return EXIT_OK
    except MsqError as error:
        print("msq-onnx: error: " + str(error).replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("msq-onnx: interrupted; no output was written (an existing output is left as it was)",
              file=sys.stderr)
        return 130
    except MemoryError:
        print("msq-onnx: error: out of memory; lower --batch-size or --max-dim", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as error:  # an internal error still gets one line; MSQ_DEBUG=1 shows the traceback
        if _interrupted:
            print("msq-onnx: interrupted; no output was written (an existing output is left as it was)",
                  file=sys.stderr)
            return 130
        if os.environ.get("MSQ_DEBUG"):
            raise
        print(f"msq-onnx: internal error: {type(error).__name__}: {one_line(error)} (rerun with MSQ_DEBUG=1 for the "
              "traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
