"""Architectures beyond CNN classifiers: 11 small random-weight torch models through the CLI at --avg-bits 8, 4, 3.

What converts, what is refused and what the report says against an independent onnxruntime check. The models:
unet (ConvTranspose up-sampling), unet_op (ConvTranspose with output_padding), gru / lstm_raw (Conv1d front on raw
audio, then a GRU / LSTM), lstm (2-layer bidirectional LSTM on features), vit (patch Conv, 4 attention blocks),
twoin (an image and a vector input), conv3d (Conv3d with BatchNorm), tokens (input_ids + attention_mask; a pooled
embedding first, token logits second), dscnn (depthwise-separable, squeeze-excitation, hardswish / SiLU) and
multiout (scores, boxes, objectness). Each is exported with torch's legacy exporter (opset 17); gru, unet_op, vit,
tokens, dscnn and multiout also with dynamo=True (opset 18). Weights and data come from fixed seeds (a model's from
the CRC-32 of its name): 64 calibration samples, and 128 fresh ones passed as --eval, so the report measures on them,
and compared again here with onnxruntime: cosine of every output (per sample; over the batch for an output of one
value per sample, whose per-sample cosine is only its sign) and arg-max agreement where the report calls the task
output class scores. Without labels the scores mean fidelity to FP32, not accuracy.

    python bench/architectures.py [--budgets 8 4 3] [--models unet vit ...]
Writes docs/bench/architectures.json and .md. Skips everything when torch is not installed; a failed export or an
exit other than 0 is a row with its one-line error, not a stop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import logging
import tempfile
import warnings
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import datasets  # noqa: E402

TOKENS, VOCABULARY = 32, 1000
CALIBRATION, TEST = 64, 128
DYNAMO = {"gru", "unet_op", "vit", "tokens", "dscnn", "multiout"}


def zoo():
    """name: (constructor, {input: per-sample shape}, output names, input scale). Inside a function so that a
    missing torch is a message, not an ImportError at import."""
    import torch
    from torch import nn
    F = nn.functional

    class UNet(nn.Module):
        def __init__(self, output_padding: bool):
            super().__init__()
            self.e1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
            self.e2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
            self.e3 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
            if output_padding:
                self.u3 = nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1)
                self.u2 = nn.ConvTranspose2d(64, 16, 3, stride=2, padding=1, output_padding=1)
            else:
                self.u3, self.u2 = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ConvTranspose2d(64, 16, 2, 2)
            self.d2, self.head = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU()), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            a = self.e1(x)
            b = self.e2(a)
            u = torch.cat([F.relu(self.u3(self.e3(b))), b], 1)
            return self.head(self.d2(torch.cat([F.relu(self.u2(u)), a], 1)))

    class Recurrent(nn.Module):
        def __init__(self, front, rnn, head, last: bool):
            super().__init__()
            self.front, self.rnn, self.head, self.last = front, rnn, head, last

        def forward(self, x):
            out, _ = self.rnn(self.front(x).transpose(1, 2))
            return self.head(out[:, -1] if self.last else out.mean(1))

    def audio(rnn):
        front = nn.Sequential(nn.Conv1d(1, 32, 400, stride=160, padding=200), nn.ReLU(),
                              nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.ReLU())
        return Recurrent(front, rnn(64, 96, batch_first=True), nn.Linear(96, 12), last=False)

    class Block(nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.n1, self.attention = nn.LayerNorm(d), nn.MultiheadAttention(d, 4, batch_first=True)
            self.n2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x, pad=None):
            y = self.n1(x)
            x = x + self.attention(y, y, y, key_padding_mask=pad, need_weights=False)[0]
            return x + self.mlp(self.n2(x))

    class ViT(nn.Module):
        def __init__(self, d=128):
            super().__init__()
            self.patches = nn.Conv2d(3, d, 16, stride=16)
            self.cls, self.pos = nn.Parameter(torch.randn(1, 1, d) * .02), nn.Parameter(torch.randn(1, 17, d) * .02)
            self.blocks, self.norm, self.head = nn.Sequential(*[Block(d) for _ in range(4)]), nn.LayerNorm(d), \
                nn.Linear(d, 10)

        def forward(self, x):
            t = self.patches(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
            return self.head(self.norm(self.blocks(t))[:, 0])

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3,
                                     padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.vec = nn.Sequential(nn.Linear(10, 32), nn.ReLU())
            self.fc = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 5))

        def forward(self, image, vec):
            return self.fc(torch.cat([self.cnn(image), self.vec(vec)], 1))

    class Tokens(nn.Module):
        def __init__(self, d=96):
            super().__init__()
            self.embed, self.pos = nn.Embedding(VOCABULARY, d), nn.Embedding(64, d)
            self.blocks, self.norm, self.tok = nn.ModuleList([Block(d), Block(d)]), nn.LayerNorm(d), nn.Linear(d, 9)

        def forward(self, input_ids, attention_mask):
            x = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1]).unsqueeze(0))
            for block in self.blocks:
                x = block(x, attention_mask == 0)
            x, m = self.norm(x), attention_mask.unsqueeze(-1).to(x.dtype)
            return (x * m).sum(1) / m.sum(1).clamp(min=1), self.tok(x)

    class SqueezeExcite(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.b(F.silu(self.a(F.adaptive_avg_pool2d(x, 1)))))

    def separable(ci, co, stride, act):
        return nn.Sequential(nn.Conv2d(ci, ci, 3, stride, 1, groups=ci), nn.BatchNorm2d(ci), act(), SqueezeExcite(ci),
                             nn.Conv2d(ci, co, 1), nn.BatchNorm2d(co), act())

    class MultiOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 128), nn.ReLU())
            self.cls, self.box, self.score = nn.Linear(128, 20), nn.Linear(128, 4), nn.Linear(128, 1)

        def forward(self, x):
            h = self.f(x)
            return self.cls(h), torch.sigmoid(self.box(h)) * 32, torch.sigmoid(self.score(h)).squeeze(1)

    def conv3d():
        return nn.Sequential(nn.Conv3d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
                             nn.Conv3d(16, 32, 3, padding=1), nn.BatchNorm3d(32), nn.ReLU(), nn.MaxPool3d(2),
                             nn.Conv3d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                             nn.Linear(64, 7))

    def dscnn():
        return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.Hardswish(),
                             separable(16, 32, 1, nn.Hardswish), separable(32, 64, 2, nn.SiLU),
                             separable(64, 128, 2, nn.SiLU), separable(128, 128, 1, nn.Hardswish),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))

    def features_lstm():
        front = nn.Sequential(nn.Conv1d(40, 64, 5, padding=2), nn.ReLU())
        rnn = nn.LSTM(64, 128, batch_first=True, num_layers=2, bidirectional=True)
        return Recurrent(front, rnn, nn.Linear(256, 10), last=True)

    image = {"x": (3, 64, 64)}
    return {"unet": (lambda: UNet(False), {"x": (3, 32, 32)}, ["y"], 1.0),
            "unet_op": (lambda: UNet(True), {"x": (3, 32, 32)}, ["y"], 1.0),
            "gru": (lambda: audio(nn.GRU), {"x": (1, 16000)}, ["logits"], 0.3),
            "lstm_raw": (lambda: audio(nn.LSTM), {"x": (1, 16000)}, ["logits"], 0.3),
            "lstm": (features_lstm, {"x": (40, 100)}, ["logits"], 1.0),
            "vit": (ViT, image, ["logits"], 1.0),
            "twoin": (TwoInputs, {"image": (3, 32, 32), "vec": (10,)}, ["logits"], 1.0),
            "conv3d": (conv3d, {"x": (1, 8, 32, 32)}, ["logits"], 1.0),
            "tokens": (Tokens, {"input_ids": (TOKENS,), "attention_mask": (TOKENS,)}, ["pooled", "token_logits"], 1.0),
            "dscnn": (dscnn, image, ["logits"], 1.0),
            "multiout": (MultiOut, image, ["scores", "boxes", "objectness"], 1.0)}


def samples(inputs: dict, scale: float, count: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    if "input_ids" in inputs:  # right-padded sequences of 4..32 real tokens, padding id 0
        mask = (np.arange(TOKENS)[None] < rng.integers(4, TOKENS + 1, (count, 1))).astype(np.int64)
        return {"input_ids": rng.integers(1, VOCABULARY, (count, TOKENS)) * mask, "attention_mask": mask}
    return {name: (rng.standard_normal((count, *shape)) * scale).astype(np.float32) for name, shape in inputs.items()}


def export(name: str, spec: tuple, work: str) -> dict:
    """{exporter: model path or the export's one-line error}; writes work/name-{calib,test}.npz."""
    import torch

    build, inputs, outputs, scale = spec
    torch.manual_seed(zlib.crc32(name.encode()))
    model = build().eval()
    for norm in (m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d))):
        # fresh BatchNorms are the identity: random statistics give the folding into the Conv something to do
        norm.running_mean.uniform_(-.5, .5)
        norm.running_var.uniform_(.5, 2)
        norm.weight.data.uniform_(.5, 1.5)
        norm.bias.data.uniform_(-.2, .2)
    for split, count, seed in (("calib", CALIBRATION, 1), ("test", TEST, 2)):
        np.savez(os.path.join(work, f"{name}-{split}.npz"), **samples(inputs, scale, count, seed))
    example = tuple(torch.from_numpy(v) for v in samples(inputs, scale, 2, 99).values())
    axes = {n: {0: "N", 1: "T"} if name == "tokens" and n != "pooled" else {0: "N"} for n in [*inputs, *outputs]}
    paths = {}
    for exporter in ("legacy", "dynamo") if name in DYNAMO else ("legacy",):
        path = os.path.join(work, f"{name}-{exporter}-fp32.onnx")
        dynamo = exporter == "dynamo"
        try:
            with warnings.catch_warnings():  # deprecation and dynamic_axes advice, the same for every model
                warnings.simplefilter("ignore")
                # dynamo's lowest opset is 18: asked for 17 it converts down, for some models only
                torch.onnx.export(model, example, path, input_names=list(inputs), output_names=outputs,
                                  dynamic_axes=axes, opset_version=18 if dynamo else 17, dynamo=dynamo,
                                  external_data=False, verbose=False)
            paths[exporter] = path
        except Exception as error:  # noqa: BLE001 - an exporter's failure is a finding, the other runs go on
            paths[exporter] = f"export failed: {str(error).strip().splitlines()[0][:200]}"
    return paths


def outputs_of(path: str, feed: dict) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the machine is shared; 128 tiny samples do not need more
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def compare(fp32: dict, quant: dict, task: str, kind: str | None) -> dict:
    cosines = {}
    for name, ref in fp32.items():
        a, b = ref.reshape(len(ref), -1).astype(np.float64), quant[name].reshape(len(ref), -1).astype(np.float64)
        if a.shape[1] == 1:  # one value per sample: its own cosine is only its sign, so the batch is the vector
            a, b = a.T, b.T
        cosines[name] = float(((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                                           1e-30)).mean())
    agreement = None
    if kind == "class-scores":
        agreement = 100 * float((fp32[task].argmax(-1) == quant[task].argmax(-1)).mean())
    return {"cosine": cosines[task], "agreement": agreement, "outputs": cosines}


def run(name: str, exporter: str, model: str, bits: str, work: str) -> dict:
    row = {"model": name, "exporter": exporter, "bits": bits, "exit": 0, "error": None}
    calib, test = (os.path.join(work, f"{name}-{split}.npz") for split in ("calib", "test"))
    tag = f"{name}-{exporter}-{bits}"
    try:
        report = datasets.run_cli(model, work, calib, test, tag, ["--avg-bits", bits])
    except SystemExit as failed:  # run_cli's message: "<name>: exit <code>: <stderr tail>"
        code, _, stderr = str(failed).split(": exit ", 1)[1].partition(": ")
        return {**row, "exit": int(code), "error": stderr.strip().splitlines()[-1][:240]}
    evaluation = report["evaluation"]
    test_feed = dict(np.load(test))
    check = compare(outputs_of(model, test_feed), outputs_of(os.path.join(work, tag + ".onnx"), test_feed),
                    evaluation["task_output"], evaluation.get("kind"))
    return {**row, "warnings": report["warnings"], "task_output": evaluation["task_output"],
            "kind": evaluation.get("kind"), "report_cosine": evaluation["cosine"],
            "report_agreement": evaluation.get("agreement"), "cosine": check["cosine"],
            "agreement": check["agreement"], "output_cosines": check["outputs"],
            "centred_cosines": datasets.centred_cosines(evaluation),
            "avg_weight_bits": report["avg_weight_bits"], "bytes": report["size_bytes"]["file"],
            "fp32_bytes": os.path.getsize(model),
            "latency_ratio": report["latency_ms"]["output"] / report["latency_ms"]["fp32"],
            "quantized_layers": report["quantized_layers"],
            "left_in_float": sorted({entry["node"] for entry in report["left_in_float"]})}


def row(r: dict) -> str:
    def number(value, form):
        return "-" if value is None else format(value, form)

    head = f"| {r['model']} | {r['exporter']} | {r['bits']} | {r['exit']} |"
    if r["exit"] != 0:
        return head + " |" * 8 + " " + r["error"].replace("|", "/") + " |"
    notes = "; ".join(w[:120] for w in r["warnings"]).replace("|", "/")  # the JSON keeps them whole
    return (f"{head} {number(r['report_cosine'], '.4f')} / {number(r['cosine'], '.4f')} | "
            f"{number(r['report_agreement'], '.1f')} / {number(r['agreement'], '.1f')} | "
            f"{min(r['output_cosines'].values()):.4f} | {r['avg_weight_bits']:.2f} | {r['bytes']:,} / "
            f"{r['fp32_bytes']:,} | {r['latency_ratio']:.2f} | {r['quantized_layers']} | {len(r['left_in_float'])} | "
            f"{notes} |")


def save(out: str, stem: str, results: list, model_column: str, bits_column: str, row=row) -> None:
    """The rows as `row` (this one, or one that rewrites its first column) writes them, under the header that
    names its columns."""
    datasets.save_table(out, stem, results,
                        [f"| {model_column} | exporter | {bits_column} | exit | task cosine report / ORT "
                         "| agreement report / ORT | lowest output cosine (ORT) | avg bits | bytes / FP32 "
                         "| latency / FP32 | quantized | float | warnings or error |",
                         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"], row)


def sweep(names, export_one, convert, budgets, prefix: str) -> list:
    """Every model through every exporter and budget: export_one(name, work) -> {exporter: path or the one-line
    reason it failed}, convert(name, exporter, path, budget, work) -> a row. Rows print as they come."""
    results = []
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        for name in names:
            for exporter, model in export_one(name, work).items():
                if not model.endswith(".onnx"):
                    results.append({"model": name, "exporter": exporter, "bits": "", "exit": None, "error": model})
                    continue
                for budget in budgets:
                    results.append(convert(name, exporter, model, budget, work))
                    print(json.dumps(results[-1]), flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["8", "4", "3"])
    parser.add_argument("--models", nargs="+", default=None, help="a subset of the 11 (default: all)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("skipped: torch not installed (pip install torch==2.13.0)")
        return 0
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # dynamo's notes on torchvision ops it skips
    torch.set_num_threads(1)  # exporting these takes seconds; leave the other core to whoever shares the machine
    models = zoo()
    if set(args.models or []) - set(models):
        parser.error(f"--models: choose from {', '.join(models)}")
    results = sweep(args.models or models, lambda name, work: export(name, models[name], work), run, args.budgets,
                    "msq-architectures-")
    save(args.out, "architectures", results, "model", "bits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
