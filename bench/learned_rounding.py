"""Issue "three bits and below": does learned rounding (AdaRound) lift EfficientNet-Lite0 at msq-onnx's 3-bit
allocation? A measurement, not a feature: the network in torch (onnx2torch), weights per channel at each layer's
allocated width, activations float; each layer in turn, on the quantized network's own inputs against the FP32
layer's outputs (AdaRound's asymmetric reconstruction): rounding variables with AdaRound's rectified sigmoid and
annealed regularizer, and a learned bias. Top-1 on the 1,000 evaluation images (bench/datasets.py's split).

  --start grid  each layer on a clipping-searched uniform grid of its own (the allocation of a default conversion)
  --start msq   from msq-onnx's own written rounding (--uniform-levels --activations weight-only: uniform grids,
                bias-corrected biases, an int8 weight folded into a Cast and a Mul), a layer keeping the learned
                rounding only where it lowers its reconstruction error on the calibration images

  --scope block BRECQ's unit instead of the layer: the layers between two points every path of the network passes
                (a residual block with its Add, or a bottleneck up to its linear projection) rounded together,
                on the quantized network's own block input, against the FP32 block's output

  --fitted-levels  --start msq from the default conversion's fitted level sets: each weight's rounding chooses
                between the two levels of its layer's set around it (the uniform grid's floor and ceiling)

    python bench/learned_rounding.py --start grid|msq [--fitted-levels] [--scope layer|block [--soft-start]
        [--fisher] [--from-block K] [--bias-only] [--flip]] [--avg-bits 3] [--iters 300] [--images 128] [--seed 0]
        [--model lite1.onnx --size 240]

Needs ../shared, torch==2.13.0 and onnx2torch (`pip install --no-deps onnx2torch`: its torchvision import, only for
detection ops, is stubbed here); skips cleanly without them. Round 27: grid 76.9% in 18 min, msq 79.0 -> 79.2% in 16.
Round 33 (--scope block, 128 images): msq 79.0 -> 79.4% (200 steps, 12 min), --soft-start 78.5% (400, 19 min), with
--fisher 78.0%; grid 78.1% (600, 22 min). On all 300 images: --soft-start 80.3% / 79.3% (seeds 0 / 1, 20-21 min),
with --fisher 79.2%. docs/BENCHMARKS.md, round 33. Round 34: 800 steps 79.3%; the head convolution and the
classifier alone (--from-block 16) 79.8 / 79.4% at 3 bits, 76.6 / 75.9% at 2.5 (whole network 77.3 / 77.7%).
Round 35 (--fitted-levels, written 78.1% at 3 bits, 75.3% at 2.5): the tail 78.7 / 78.5% and 75.6 / 75.5%, with
--flip 75.6%; the whole network at 2.5 bits 77.3% (20 min).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import datasets  # noqa: E402
import numpy as np  # noqa: E402

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid
RATIOS = np.linspace(1.0, 0.2, 17)


def _onnx2torch():
    """onnx2torch's convert, with torchvision (imported for NMS and RoIAlign only) stubbed where it is missing."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        stub = types.ModuleType("torchvision")
        stub.ops = types.ModuleType("torchvision.ops")
        for name in ("nms", "batched_nms", "roi_align", "roi_pool", "ps_roi_align", "deform_conv2d"):
            setattr(stub.ops, name, None)
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, stub.ops
    from onnx2torch import convert
    return convert


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", choices=("grid", "msq"), required=True)
    parser.add_argument("--avg-bits", default="3")
    parser.add_argument("--scope", choices=("layer", "block"), default="layer")
    parser.add_argument("--soft-start", action="store_true",
                        help="block scope, --start msq: the written grids and biases, but the rounding variables "
                             "started at the FP32 weight's fraction (AdaRound's start) instead of the written rounding")
    parser.add_argument("--fisher", action="store_true",
                        help="block scope: each output value's squared error weighed by the square of the task "
                             "loss's gradient there (KL of the quantized network's logits to the FP32 ones; BRECQ's "
                             "diagonal Fisher), normalised to a mean of 1")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="the steps' batches (block scope) and torch's seed")
    parser.add_argument("--from-block", type=int, default=0,
                        help="block scope: learn only the blocks from this index on (0: the stem; -3: the last three "
                             "blocks); the earlier ones keep the written rounding, to tell which blocks a gain comes "
                             "from")
    parser.add_argument("--bias-only", action="store_true",
                        help="block scope, --start msq: keep the written weights and learn only each layer's bias "
                             "shift, to tell the rounding's share of a gain from the biases'")
    parser.add_argument("--model", help="another EfficientNet-Lite ONNX file (default: ../shared's Lite0), e.g. "
                                        "bench/unseen_models.py's Lite1 export in its wheel cache. In torch's export "
                                        "a shape value (the batch size, for the last Reshape) stays alive through the "
                                        "network, so the blocks found there are two: all up to the classifier, and "
                                        "the classifier")
    parser.add_argument("--size", type=int, default=224,
                        help="the model's input size (Lite1: 240), preprocessed as datasets.efficientnet_preprocess")
    parser.add_argument("--fitted-levels", action="store_true",
                        help="--start msq: start from the default conversion's fitted level sets (no "
                             "--uniform-levels); each weight's rounding then chooses between the two levels of its "
                             "layer's set around it")
    parser.add_argument("--flip", action="store_true",
                        help="reconstruct on the calibration images and their mirror images (twice the rows, from "
                             "the same images), to tell whether the 300 images limit the learned rounding")
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED)
    args = parser.parse_args(argv)
    model_path = args.model or datasets.shared_model(args.shared, "efficientnet-lite0.onnx")
    if model_path is None:
        return 0
    try:
        import onnx
        import torch
        convert = _onnx2torch()
    except ImportError as exc:
        print(f"skipped: {exc}")
        return 0
    from run_bench import _work_folder

    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.load import load_model

    work = _work_folder()
    calib, evaluation = datasets.imagenet_split(args.shared, work)
    written, report = os.path.join(work, "msq.onnx"), os.path.join(work, "msq.json")
    extra = ([] if args.fitted_levels else ["--uniform-levels"]) + ["--activations", "weight-only"] \
        if args.start == "msq" else []
    subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), model_path, written, "--calib", calib, "--eval",
                    evaluation, "--avg-bits", args.avg_bits, "--report", report, "--quiet",
                    *datasets.efficientnet_args(args.size), *extra], check=True)
    started = time.perf_counter()
    loaded = load_model(model_path)
    pre = Preprocess(**datasets.efficientnet_preprocess(args.size))

    def images(path):
        samples = open_samples(path, loaded.inputs, pre)
        return torch.from_numpy(np.concatenate([b["input"] for b in samples.batches(50)])), np.asarray(samples.labels)

    x_calib, x_eval, labels = images(calib)[0][:args.images], *images(evaluation)
    if args.flip:
        x_calib = torch.cat([x_calib, x_calib.flip(3)])
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    fp32, quantized = convert(onnx.load(model_path)).eval(), convert(onnx.load(model_path)).eval()
    written_layers = json.load(open(report))["layers"]
    widths = {layer["name"]: layer["bits"] for layer in written_layers}
    level_sets = {layer["name"]: layer.get("level_set") for layer in written_layers}
    by_weight = {_signature(loaded.weight(layer)): layer for layer in loaded.layers}

    def layers(model):  # (module, its msq-onnx layer), matched by their FP32 weights
        return [(m, by_weight[_signature(m.weight.detach().numpy())]) for m in model.modules()
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

    @torch.no_grad()
    def top1(model) -> float:
        return 100.0 * sum(int((model(x_eval[i:i + 100]).argmax(1).numpy() == labels[i:i + 100]).sum())
                           for i in range(0, len(x_eval), 100)) / len(x_eval)

    matched, references = layers(quantized), layers(fp32)  # before the written weights replace the FP32 ones
    starts = _written_grids(written, matched, widths, level_sets) if args.start == "msq" else {}
    result = {"start": args.start, "fitted_levels": args.fitted_levels, "scope": args.scope,
              "avg_bits": args.avg_bits, "fp32_top1": top1(fp32),
              "start_top1": top1(quantized) if starts else None, "iters": args.iters, "images": args.images,
              "flip": args.flip}
    grids = {module: (starts.get(layer.name) or _searched_grid(reference.weight.detach(), widths[layer.name]),
                      reference)
             for (module, layer), (reference, _) in zip(matched, references) if widths[layer.name] < 8}
    if args.scope == "block":
        result.update(soft_start=args.soft_start, fisher=args.fisher, seed=args.seed, from_block=args.from_block,
                      bias_only=args.bias_only)
        result["blocks"] = _reconstruct_blocks(quantized, fp32, grids, x_calib, args.iters,
                                               keep_only_better=args.start == "msq", soft_start=args.soft_start,
                                               fisher=args.fisher, seed=args.seed, from_block=args.from_block,
                                               bias_only=args.bias_only)
    else:
        for module, (grid, reference) in grids.items():
            _reconstruct(module, reference, grid, _inputs(quantized, module, x_calib)[0],
                         _inputs(fp32, reference, x_calib)[1], args.iters, keep_only_better=args.start == "msq")
    result.update(learned_top1=top1(quantized), minutes=round((time.perf_counter() - started) / 60, 1))
    print(json.dumps(result))
    return 0


def _signature(weight: np.ndarray) -> bytes:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(weight, np.float32).tobytes()).digest()


def _searched_grid(weight, bits: int):
    """(step per output channel, each channel's integers, starting rounding per weight): the ratio of each
    channel's peak with the least squared error on the two's-complement grid, rounded to nearest."""
    import torch

    low, high = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    flat = weight.reshape(weight.shape[0], -1)
    peak = flat.abs().amax(1).clamp_min(1e-12)
    errors = torch.stack([((torch.clamp(torch.round(flat / (peak * r / high)[:, None]), low, high)
                            * (peak * r / high)[:, None] - flat) ** 2).sum(1) for r in RATIOS])
    step = (peak * torch.as_tensor(RATIOS, dtype=weight.dtype)[errors.argmin(0)] / high).reshape(
        -1, *([1] * (weight.dim() - 1)))
    return step, torch.arange(low, high + 1, dtype=weight.dtype).expand(weight.shape[0], -1), None


def _written_grids(path: str, matched, widths: dict, level_sets: dict) -> dict:
    """msq-onnx's written layers as grids: layer -> (step, each channel's sorted integers, its rounding), and each
    module given the written weight and bias. Reads the int8 -> Cast -> Mul(scale) folds of the convolutions and
    the classifier's DequantizeLinear -> MatMul -> Add. A layer with fitted levels (`level_sets`, the report's)
    has one set of integers, mirrored on the channels whose integers it does not hold."""
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def weight_sources(node):  # the initializers the node's weight is made of, through its Mul or DequantizeLinear
        maker = producers.get(node.input[1])
        return [] if maker is None else [producers[i].input[0] if i in producers else i for i in maker.input]

    grids = {}
    for module, layer in matched:
        node = next(n for n in graph.node if n.op_type in ("Conv", "MatMul") and any(
            name.startswith(layer.weight_name + "_msq") for name in weight_sources(n)))
        sources = [values[name] for name in weight_sources(node) if name in values]
        integers = next(a for a in sources if a.dtype == np.int8).astype(np.float32)
        scale = next(a for a in sources if a.dtype == np.float32).reshape(-1)
        bias = values.get(node.input[2]) if node.op_type == "Conv" and len(node.input) > 2 else None
        if node.op_type == "MatMul":  # [in, out] -> torch's [out, in]; the bias is the Add after it
            integers = integers.T
            add = next(n for n in graph.node if n.op_type == "Add" and node.output[0] in n.input)
            bias = next(values[i] for i in add.input if i in values)
        integers = torch.from_numpy(np.ascontiguousarray(integers).reshape(module.weight.shape))
        step = torch.from_numpy(scale).reshape(-1, *([1] * (module.weight.dim() - 1)))
        rows = integers.reshape(len(integers), -1)
        if level_sets.get(layer.name):
            level_set = torch.tensor(sorted(level_sets[layer.name]), dtype=torch.float32)
            held = torch.isin(rows, level_set).all(1, keepdim=True)
            codes = torch.where(held, level_set, torch.flip(-level_set, (0,)))
            assert bool(torch.isin(rows, codes).all()), layer.name
        else:
            half = 2 ** (widths[layer.name] - 1)
            mirrored = (rows.amax(1, keepdim=True) >= half).float()
            codes = torch.arange(-half, half, dtype=torch.float32) + mirrored
        with torch.no_grad():
            module.weight.copy_(integers * step)
            if bias is not None:
                module.bias.copy_(torch.from_numpy(bias))
        grids[layer.name] = (step, codes, integers)
    return grids


def _inputs(model, module, images):
    """The module's input and output for every image, the run stopped at the module."""
    import torch

    got = {}

    def hook(_, inputs, output):
        got["x"], got["y"] = inputs[0].detach(), output.detach()
        raise StopIteration

    handle = module.register_forward_hook(hook)
    xs, ys = [], []
    with torch.no_grad():
        for i in range(0, len(images), 32):
            try:
                model(images[i:i + 32])
            except StopIteration:
                pass
            xs.append(got["x"])
            ys.append(got["y"])
    handle.remove()
    return torch.cat(xs), torch.cat(ys)


class _Rounding:
    """One layer's AdaRound state on its grid: a rounding variable per weight between the two integers of its
    channel's set around the FP32 weight (the uniform grid's floor and ceiling; one integer past the set's ends),
    started from the written rounding, or from the weight's fraction where there is none or `soft_start`; the
    bias it started with and a learned shift of it."""

    def __init__(self, module, reference, grid, soft_start: bool = False):
        import torch

        self.module, (self.step, codes, written) = module, grid
        self.start_weight = module.weight.detach().clone()
        value = (reference / self.step).reshape(len(codes), -1)
        index = torch.searchsorted(codes.contiguous(), value.contiguous(), right=True) - 1
        low = codes.gather(1, index.clamp(0, codes.shape[1] - 1))
        high = torch.where(index < 0, low, codes.gather(1, (index + 1).clamp(0, codes.shape[1] - 1)))
        self.base, self.gap = low.reshape(reference.shape), (high - low).reshape(reference.shape)
        gap = self.gap.clamp_min(1e-12)
        start = (((reference / self.step - self.base) / gap).clamp(0.01, 0.99) if written is None or soft_start
                 else torch.clamp((written - self.base) / gap, 0, 1) * 0.5 + 0.25)
        self.variables = (-torch.log((ZETA - GAMMA) / (start - GAMMA) - 1)).requires_grad_(True)
        self.bias = (module.bias if module.bias is not None else torch.zeros(reference.shape[0])).detach().clone()
        self.shift = torch.zeros_like(self.bias, requires_grad=True)

    def soft(self):
        import torch

        return torch.clamp(torch.sigmoid(self.variables) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def weight(self, h):
        return (self.base + h * self.gap) * self.step

    def hard_weight(self):
        return self.weight((self.soft() >= 0.5).float())

    def penalty(self, exponent: float):
        """AdaRound's regularizer, pushing every rounding variable to 0 or 1."""
        return (1 - (2 * self.soft() - 1).abs().pow(exponent)).sum()

    def run(self, x, weight, bias):
        import torch
        import torch.nn.functional as functional

        if isinstance(self.module, torch.nn.Conv2d):
            return functional.conv2d(x, weight, bias, self.module.stride, self.module.padding, self.module.dilation,
                                     self.module.groups)
        return functional.linear(x, weight, bias)

    def run_soft(self, x):
        """The module's forward on the soft weight: gradients reach the variables through a block."""
        return self.run(x, self.weight(self.soft()), self.bias + self.shift)

    def run_written(self, x):
        """The module's forward on the weight it started with and the shifted bias."""
        return self.run(x, self.start_weight, self.bias + self.shift)

    def keep(self, weight, bias) -> None:
        import torch

        with torch.no_grad():
            self.module.weight.copy_(weight)
            if self.module.bias is not None:
                self.module.bias.copy_(bias)


def _annealed_exponent(index: int, iters: int) -> float | None:
    """The regularizer's exponent at a step, 20 -> 2 from a fifth of the steps on; None before."""
    return 20 + (2 - 20) * (index / iters - 0.2) / 0.8 if index > iters // 5 else None


def _reconstruct(module, reference, grid, inputs, targets, iters: int, keep_only_better: bool) -> None:
    """AdaRound on one layer, and a learned bias: 32 images a step; the rounding then hardened."""
    import torch

    rounding = _Rounding(module, reference.weight.detach(), grid)
    optimizer = torch.optim.Adam([rounding.variables, rounding.shift], lr=1e-2)
    for index in range(iters):
        batch = torch.randint(0, len(inputs), (32,))
        loss = ((rounding.run_soft(inputs[batch]) - targets[batch]) ** 2).sum(1).mean()
        exponent = _annealed_exponent(index, iters)
        if exponent is not None:
            loss = loss + 0.01 * rounding.penalty(exponent)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hard, learned_bias = rounding.hard_weight(), rounding.bias + rounding.shift
        if keep_only_better:
            before = float(((rounding.run(inputs, module.weight, rounding.bias) - targets) ** 2).sum(1).mean())
            after = float(((rounding.run(inputs, hard, learned_bias) - targets) ** 2).sum(1).mean())
            if after >= before:
                return
    rounding.keep(hard, learned_bias)


def _block_ends(model) -> list:
    """Indices of the graph's nodes that end a block: the only value alive at that point, neither an activation nor
    read by one (so a bottleneck ends at its linear projection or at its residual Add), and the last node."""
    import torch

    nodes = list(model.graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    last_use = {node: max((order[user] for user in node.users), default=-1) for node in nodes}
    activations = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Hardtanh, torch.nn.SiLU, torch.nn.Sigmoid)

    def activation(node) -> bool:
        return node.op == "call_module" and isinstance(model.get_submodule(node.target), activations)

    ends, alive = [], set()
    for i, node in enumerate(nodes):
        if node.op in ("get_attr", "output"):
            continue
        alive = {n for n in alive if last_use[n] > i} | ({node} if node.users else set())
        if i and alive == {node} and not activation(node) and not any(activation(u) for u in node.users):
            ends.append(i)
    last = next(i for i in range(len(nodes) - 1, -1, -1) if nodes[i].op not in ("output", "get_attr"))
    return ends if ends and ends[-1] == last else ends + [last]


def _run_segment(model, start: int, end: int, x):
    """The graph's nodes after `start` up to `end`, on x as the value of node `start`."""
    import torch

    nodes = list(model.graph.nodes)
    interpreter = torch.fx.Interpreter(model, garbage_collect_values=False)
    interpreter.env = {n: interpreter.run_node(n) for n in nodes if n.op == "get_attr"}
    interpreter.env[nodes[start]] = x
    for node in nodes[start + 1:end + 1]:
        interpreter.env[node] = interpreter.run_node(node)
    return interpreter.env[nodes[end]]


def _reconstruct_blocks(quantized, fp32, grids: dict, images, iters: int, keep_only_better: bool,
                        soft_start: bool = False, fisher: bool = False, seed: int = 0, from_block: int = 0,
                        bias_only: bool = False) -> list:
    """BRECQ-style: the rounding variables and biases of each block's layers in `grids` (module -> (grid, its FP32
    module)) learned together, 32 images a step, on the quantized network's input to the block against the FP32
    block's output; the regularizer and its annealing as in _reconstruct. The blocks before `from_block` keep their
    rounding; `bias_only` keeps every written weight and learns the bias shifts alone. Returns each block's output
    error before and after, on all the images."""
    import torch

    nodes, ends = list(quantized.graph.nodes), _block_ends(quantized)
    from_block = max(0, len(ends) + from_block) if from_block < 0 else from_block
    x_quantized = x_fp32 = images
    report = []
    with torch.no_grad():
        fp32_logits = torch.cat([fp32(images[i:i + 32]) for i in range(0, len(images), 32)])
    for start, end in zip([0] + ends[:-1], ends):
        with torch.no_grad():
            target = torch.cat([_run_segment(fp32, start, end, x_fp32[i:i + 32]) for i in range(0, len(images), 32)])
        learned = len(report) >= from_block
        weights = _fisher(quantized, start, end, ends[-1], x_quantized, fp32_logits) if fisher and learned else None

        def weighted(out, batch):
            squared = (out - target[batch]) ** 2 * (weights[batch] if weights is not None else 1)
            return squared.flatten(2).sum(1).mean() if squared.dim() > 2 else squared.sum(1).mean()

        def block_error() -> float:
            with torch.no_grad():
                return float(sum(weighted(_run_segment(quantized, start, end, x_quantized[i:i + 32]),
                                          torch.arange(i, min(i + 32, len(images)))) * min(32, len(images) - i)
                                 for i in range(0, len(images), 32)) / len(images))

        started, before = time.perf_counter(), block_error()
        roundings = [_Rounding(m, grids[m][1].weight.detach(), grids[m][0], soft_start)
                     for n in nodes[start + 1:end + 1] if n.op == "call_module"
                     for m in quantized.get_submodule(n.target).modules() if m in grids] if learned else []
        after = before
        if roundings:
            for rounding in roundings:
                rounding.module.forward = rounding.run_written if bias_only else rounding.run_soft
            optimizer = torch.optim.Adam([v for r in roundings for v in ((r.shift,) if bias_only
                                                                          else (r.variables, r.shift))], lr=1e-2)
            generator = torch.Generator().manual_seed(seed * 1000 + len(report))
            for index in range(iters):
                batch = torch.randint(0, len(images), (32,), generator=generator)
                loss = weighted(_run_segment(quantized, start, end, x_quantized[batch]), batch)
                exponent = None if bias_only else _annealed_exponent(index, iters)
                if exponent is not None:
                    loss = loss + 0.01 * sum(r.penalty(exponent) for r in roundings)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            for rounding in roundings:
                del rounding.module.forward
                with torch.no_grad():
                    rounding.keep(rounding.start_weight if bias_only else rounding.hard_weight(),
                                  rounding.bias + rounding.shift)
            after = block_error()
            if keep_only_better and after >= before:
                for rounding in roundings:
                    rounding.keep(rounding.start_weight, rounding.bias)
                after = before
        report.append({"end": nodes[end].name, "layers": len(roundings), "error_before": before, "error_after": after,
                       "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(report[-1]), flush=True)
        with torch.no_grad():
            x_quantized = torch.cat([_run_segment(quantized, start, end, x_quantized[i:i + 32])
                                     for i in range(0, len(images), 32)])
            x_fp32 = target
    return report


def _fisher(quantized, start: int, end: int, last: int, inputs, fp32_logits):
    """Per image and output value of the block: the squared gradient there of the KL divergence from the FP32
    logits to the quantized network's (this block and those after it as they stand), over its mean."""
    import torch
    import torch.nn.functional as functional

    squares = []
    for i in range(0, len(inputs), 32):
        with torch.no_grad():
            out = _run_segment(quantized, start, end, inputs[i:i + 32])
        out.requires_grad_(True)
        logits = _run_segment(quantized, end, last, out)
        loss = functional.kl_div(functional.log_softmax(logits, 1), functional.softmax(fp32_logits[i:i + 32], 1),
                                 reduction="sum")
        squares.append(torch.autograd.grad(loss, out)[0] ** 2)
    squares = torch.cat(squares)
    return squares / squares.mean().clamp_min(1e-30)


if __name__ == "__main__":
    sys.exit(main())
