"""Hugging Face transformers through the CLI: 8 tiny random-init models, 3 exports each, --avg-bits 8, 4, 4 --prefer size.

The models, each from a small config (hidden 128, 2 layers, 4 heads, vocabulary 2,000) with weights from a fixed seed
(the CRC-32 of its name), nothing downloaded: bert (input_ids, attention_mask, token_type_ids; last_hidden_state and
pooler_output), bertcls (BertForSequenceClassification, 3 classes), distilbert, gpt2 (GPT2LMHeadModel without cache:
logits [N, T, 2000]), vit (ViTForImageClassification on 32 x 32 images), whisper (the encoder, 80 x 100 features),
wav2vec2 (4,000 raw samples) and t5 (T5EncoderModel). Each is exported with torch's legacy exporter (opset 17) and with
dynamo=True (opset 18); bert, bertcls, gpt2, vit, whisper and t5 also as `outliers`: the legacy export of weights less
benign than a fresh init, as trained ones are (biases N(0, 0.05), LayerNorm gains 1 + N(0, 0.2) with channels 3 and 77
at 15, matrices doubled). Text models get sequences of 6..32 real tokens right-padded to 32 (id 0, attention_mask 0;
token_type_ids 1 on the second half), the others standard-normal inputs: 64 to calibrate, 128 others passed as --eval.
Each written model is run again here with onnxruntime, at the batch the report evaluated at (dynamic layers quantize
each run on its own range), and compared with FP32: cosine of every output per sample on real tokens only, arg-max
agreement of the class-score output (per real position for GPT-2's [N, T, V] logits). Random weights: the scores mean
fidelity to FP32, not accuracy.

    python bench/transformers_models.py [--budgets 8 4 4s] [--models bert gpt2 ...]
(`4s`: --avg-bits 4 --prefer size; `none`: no --avg-bits.) Writes docs/bench/transformers-models.json and .md. Skips
everything when torch or transformers is not installed; a failed export or an exit other than 0 is a row with its
one-line error, not a stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import architectures  # noqa: E402
import datasets  # noqa: E402
from architectures import CALIBRATION, TEST, TOKENS  # noqa: E402 - the other random-weight bench's splits

VOCABULARY = 2000
OUTLIERS = {"bert", "bertcls", "gpt2", "vit", "whisper", "t5"}


def zoo():
    """name: (constructor, {input: (per-sample shape, dynamic axes)}, {output: dynamic axes}, class-score output or
    None). Inside a function so that a missing transformers is a message, not an ImportError at import."""
    import transformers as hf
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    small = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    text = {"input_ids": ((TOKENS,), "NT"), "attention_mask": ((TOKENS,), "NT")}
    segments = {**text, "token_type_ids": ((TOKENS,), "NT")}
    return {
        "bert": (lambda: hf.BertModel(hf.BertConfig(vocab_size=VOCABULARY, **small)), segments,
                 {"last_hidden_state": "NT", "pooler_output": "N"}, None),
        "bertcls": (lambda: hf.BertForSequenceClassification(hf.BertConfig(vocab_size=VOCABULARY, num_labels=3, **small)),
                    segments, {"logits": "N"}, "logits"),
        "distilbert": (lambda: hf.DistilBertModel(hf.DistilBertConfig(vocab_size=VOCABULARY, dim=128, n_layers=2,
                                                                      n_heads=4, hidden_dim=256)),
                       text, {"last_hidden_state": "NT"}, None),
        "gpt2": (lambda: hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=VOCABULARY, n_embd=128, n_layer=2, n_head=4,
                                                          n_positions=128, use_cache=False)),
                 text, {"logits": "NT"}, "logits"),
        "vit": (lambda: hf.ViTForImageClassification(hf.ViTConfig(image_size=32, patch_size=8, num_labels=10, **small)),
                {"pixel_values": ((3, 32, 32), "N")}, {"logits": "N"}, "logits"),
        "whisper": (lambda: WhisperEncoder(hf.WhisperConfig(d_model=128, encoder_layers=2, encoder_attention_heads=4,
                                                            encoder_ffn_dim=256, num_mel_bins=80,
                                                            max_source_positions=50, vocab_size=VOCABULARY)),
                    {"input_features": ((80, 100), "N")}, {"last_hidden_state": "N"}, None),
        "wav2vec2": (lambda: hf.Wav2Vec2Model(hf.Wav2Vec2Config(conv_dim=(64, 64, 64), conv_stride=(5, 4, 2),
                                                                conv_kernel=(10, 4, 2), num_conv_pos_embeddings=16,
                                                                num_conv_pos_embedding_groups=4,
                                                                feat_extract_norm="group", **small)),
                     {"input_values": ((4000,), "NS")}, {"last_hidden_state": "NF"}, None),
        "t5": (lambda: hf.T5EncoderModel(hf.T5Config(vocab_size=VOCABULARY, d_model=128, d_kv=32, d_ff=256,
                                                     num_layers=2, num_heads=4, relative_attention_num_buckets=32)),
               text, {"last_hidden_state": "NT"}, None)}


def samples(inputs: dict, count: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    if "input_ids" not in inputs:
        return {name: rng.standard_normal((count, *shape)).astype(np.float32) for name, shape in inputs.items()}
    length, position = rng.integers(6, TOKENS + 1, (count, 1)), np.arange(TOKENS)[None]
    mask = (position < length).astype(np.int64)
    feed = {"input_ids": rng.integers(5, VOCABULARY, (count, TOKENS)) * mask, "attention_mask": mask,
            "token_type_ids": (position >= length // 2).astype(np.int64) * mask}
    return {name: feed[name] for name in inputs}


def with_outliers(model):
    """What a fresh init lacks and trained transformers have: non-zero biases, LayerNorm gains with two outlier
    channels (large activations in a few channels, which stretch a per-tensor activation range), larger matrices."""
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
            elif parameter.dim() >= 2:
                parameter.mul_(2.0)
        for module in model.modules():
            if type(module).__name__.endswith("LayerNorm"):  # torch's, and T5's RMS norm (no bias)
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.weight[[3, 77]] = 15.0
    return model


def export(name: str, spec: tuple, work: str) -> dict:
    """{exporter: model path or the export's one-line error}; writes work/name-{calib,test}.npz."""
    import torch

    build, inputs, outputs, _ = spec
    shapes = {input_name: shape for input_name, (shape, _) in inputs.items()}
    for split, count, seed in (("calib", CALIBRATION, 1), ("test", TEST, 2)):
        np.savez(os.path.join(work, f"{name}-{split}.npz"), **samples(shapes, count, seed))
    example = tuple(torch.from_numpy(v) for v in samples(shapes, 2, 99).values())
    axes = {n: dict(enumerate(a)) for n, a in [*((n, a) for n, (_, a) in inputs.items()), *outputs.items()]}

    class Positional(torch.nn.Module):  # the exporters pass positional inputs and take a tuple back
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *values):
            result = self.model(**dict(zip(inputs, values)), return_dict=True)
            return tuple(result[output] for output in outputs)

    paths = {}
    for exporter in ("legacy", "outliers", "dynamo") if name in OUTLIERS else ("legacy", "dynamo"):
        torch.manual_seed(zlib.crc32(name.encode()))  # the same weights under every exporter
        model = build().eval()
        model = Positional(with_outliers(model) if exporter == "outliers" else model).eval()
        path = os.path.join(work, f"{name}-{exporter}-fp32.onnx")
        dynamo = exporter == "dynamo"
        try:
            with warnings.catch_warnings():  # tracer and deprecation advice, the same for every model
                warnings.simplefilter("ignore")
                # dynamo at 18, its own lowest: asked for 17 it converts down, and GPT-2's Split kept an opset-18
                # attribute the ONNX checker refuses. Its axes go as dynamic_shapes (of the one *values argument).
                shape = {"dynamic_shapes": (tuple({i: torch.export.Dim.DYNAMIC for i in axes[n]} for n in inputs),)} \
                    if dynamo else {"dynamic_axes": axes}
                torch.onnx.export(model, example, path, input_names=list(inputs), output_names=list(outputs),
                                  opset_version=18 if dynamo else 17, dynamo=dynamo, external_data=False,
                                  verbose=False, **shape)
            paths[exporter] = path
        except Exception as error:  # noqa: BLE001 - an exporter's failure is a finding, the other runs go on
            cause = re.sub(r"\x1b\[[0-9;]*m", "", str(error.__cause__ or error)).strip()  # the root, uncoloured
            paths[exporter] = f"export failed: {cause.splitlines()[0][:200]}"
    return paths


def outputs_at(path: str, feed: dict, batch: int) -> dict:
    """architectures.outputs_of, run `batch` samples at a time as the report's evaluation ran them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the machine is shared; 128 tiny samples do not need more
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    count = len(next(iter(feed.values())))
    runs = [session.run(None, {k: v[i:i + batch] for k, v in feed.items()}) for i in range(0, count, batch)]
    return {o.name: np.concatenate([run[j] for run in runs]) for j, o in enumerate(session.get_outputs())}


def check(fp32_path: str, quant_path: str, feed: dict, evaluation: dict, scores: str | None) -> dict:
    batch = evaluation.get("batch") or len(next(iter(feed.values())))
    fp32, quant = outputs_at(fp32_path, feed, batch), outputs_at(quant_path, feed, batch)
    mask = feed.get("attention_mask")

    def sequence(value):  # an [N, T, ...] output of a model with an attention mask
        return mask is not None and value.ndim >= 3 and value.shape[:2] == mask.shape

    def real_only(outputs):  # padding zeroed in both: each sample's cosine then reads its real tokens only
        return {k: v * mask.reshape(*mask.shape, *[1] * (v.ndim - 2)) if sequence(v) else v for k, v in outputs.items()}

    result = architectures.compare(real_only(fp32), real_only(quant), evaluation["task_output"], None)
    agreement = None
    if scores:  # class scores: arg-max over the last axis, at every real position of a sequence
        same = fp32[scores].argmax(-1) == quant[scores].argmax(-1)
        agreement = 100 * float(same[mask.astype(bool)].mean() if sequence(fp32[scores]) else same.mean())
    return {"cosine": result["cosine"], "agreement": agreement, "output_cosines": result["outputs"]}


def flags(budget: str) -> list[str]:
    bits = [] if budget == "none" else ["--avg-bits", budget.rstrip("s")]
    return bits + (["--prefer", "size"] if budget.endswith("s") else [])


def convert(name: str, exporter: str, model: str, budget: str, work: str, scores: str | None) -> dict:
    row = {"model": name, "exporter": exporter, "bits": budget, "exit": 0, "error": None}
    test = os.path.join(work, f"{name}-test.npz")
    tag = f"{name}-{exporter}-{budget}"
    try:
        report = datasets.run_cli(model, work, os.path.join(work, f"{name}-calib.npz"), test, tag, flags(budget))
    except SystemExit as failed:  # run_cli's message: "<name>: exit <code>: <stderr tail>"
        code, _, stderr = str(failed).split(": exit ", 1)[1].partition(": ")
        return {**row, "exit": int(code), "error": stderr.strip().splitlines()[-1][:240]}
    evaluation, size, latency = report["evaluation"], report["size_bytes"], report["latency_ms"]
    return {**row, "warnings": report["warnings"], "task_output": evaluation["task_output"],
            "kind": evaluation.get("kind"), "report_cosine": evaluation["cosine"],
            "report_agreement": evaluation.get("agreement"), "agreement_unit": evaluation.get("agreement_unit"),
            "centred_cosines": datasets.centred_cosines(evaluation),
            **check(model, os.path.join(work, tag + ".onnx"), dict(np.load(test)), evaluation, scores),
            "avg_weight_bits": report["avg_weight_bits"], "bytes": size["file"], "fp32_bytes": size["input"],
            "latency_ratio": latency["output"] / latency["fp32"], "quantized_layers": report["quantized_layers"],
            "left_in_float": sorted({entry["node"] for entry in report["left_in_float"]})}


def row(r: dict) -> str:
    """architectures' row, with the task output, its kind and the report's agreement unit beside the model."""
    if r.get("task_output"):
        unit = f", over {r['agreement_unit']}" if r.get("agreement_unit") else ""
        r = {**r, "model": f"{r['model']}: `{r['task_output']}` ({r['kind']}{unit})"}
    return architectures.row(r)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["8", "4", "4s"],
                        help="--avg-bits values; a trailing s adds --prefer size; none: no --avg-bits")
    parser.add_argument("--models", nargs="+", default=None, help="a subset of the 8 (default: all)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    args = parser.parse_args(argv)
    if not all(re.fullmatch(r"none|\d+(\.\d+)?s?", budget) for budget in args.budgets):
        parser.error("--budgets: numbers, each optionally followed by s (--prefer size), or none")
    try:
        import torch
        import transformers
    except ImportError as missing:
        print(f"skipped: {missing.name} not installed (pip install torch==2.13.0 transformers)")
        return 0
    transformers.logging.set_verbosity_error()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # dynamo's notes on torchvision ops it skips
    torch.set_num_threads(1)  # exporting these takes seconds; leave the other core to whoever shares the machine
    models = zoo()
    if set(args.models or []) - set(models):
        parser.error(f"--models: choose from {', '.join(models)}")
    results = architectures.sweep(
        args.models or models, lambda name, work: export(name, models[name], work),
        lambda name, exporter, model, budget, work: convert(name, exporter, model, budget, work, models[name][3]),
        args.budgets, "msq-transformers-")
    architectures.save(args.out, "transformers-models", results, "model: task output (kind)", "bits (s: --prefer size)",
                       row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
