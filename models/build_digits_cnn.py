"""Build the bundled example classifier: a small CNN on scikit-learn's digits.

Data: ``sklearn.datasets.load_digits`` (1,797 8x8 images, pixel values 0..16),
shipped with scikit-learn, so no network is needed. Model input is float32
``[N, 1, 8, 8]`` = pixel / 16.

Split (stratified by label, ``SEED``), three disjoint sets:
  * train        1,000 samples  -> used only to fit the weights
  * calibration    300 samples  -> ``digits_calib.npz`` (never seen in training)
  * evaluation     497 samples  -> ``digits_eval.npz`` (the rest)

The ONNX graph is written directly with ``onnx.helper`` from the trained
weights (opset 17, dynamic batch, input ``input``, output ``logits``) rather
than through ``torch.onnx.export``: this avoids the exporter's optional
onnxscript dependency and gives byte-identical output on every run.

Usage: ``python models/build_digits_cnn.py`` (writes next to this file).
"""

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
N_TRAIN, N_CALIB = 1000, 300
EPOCHS, BATCH, LR = 40, 32, 2e-3
OPSET, IR_VERSION = 17, 8  # IR 8 is the version that introduced opset 17
OUT = Path(__file__).resolve().parent


def load_splits():
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(
        x, y, train_size=N_TRAIN, stratify=y, random_state=SEED)
    x_cal, x_ev, y_cal, y_ev = train_test_split(
        x_rest, y_rest, train_size=N_CALIB, stratify=y_rest, random_state=SEED)
    return (x_tr, y_tr), (x_cal, y_cal), (x_ev, y_ev)


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),  # depthwise
            nn.Conv2d(16, 32, 1), nn.ReLU(),                         # pointwise
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def train(x, y):
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(x), generator=gen).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def to_onnx(model):
    """Mirror DigitsCNN layer by layer as an ONNX graph."""
    nodes, inits, cur = [], [], "input"

    def add(op, inputs, name, out=None, **attrs):
        nonlocal cur
        cur_in, cur = cur, out or name
        nodes.append(helper.make_node(op, [cur_in, *inputs], [cur], name=name, **attrs))

    def params(name, layer):
        w = numpy_helper.from_array(layer.weight.detach().numpy(), f"{name}.weight")
        b = numpy_helper.from_array(layer.bias.detach().numpy(), f"{name}.bias")
        inits.extend([w, b])
        return [w.name, b.name]

    f, c = model.features, model.classifier
    for name, conv in [("conv1", f[0]), ("dwconv", f[2]), ("pwconv", f[4])]:
        k = conv.kernel_size[0]
        add("Conv", params(name, conv), name, kernel_shape=[k, k],
            pads=[k // 2] * 4, group=conv.groups)
        add("Relu", [], f"{name}_relu")
    add("MaxPool", [], "pool", kernel_shape=[2, 2], strides=[2, 2])
    add("Conv", params("conv2", f[7]), "conv2", kernel_shape=[3, 3], pads=[1] * 4)
    add("Relu", [], "conv2_relu")
    add("Flatten", [], "flatten", axis=1)
    add("Gemm", params("fc1", c[1]), "fc1", transB=1)
    add("Relu", [], "fc1_relu")
    add("Gemm", params("fc2", c[3]), "fc2", out="logits", transB=1)

    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits)
    m = helper.make_model(graph, producer_name="msq-onnx-models",
                          opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    return m


def save_npz(path, x, y):
    # npz members carry a write timestamp; keep an identical file untouched so
    # a rebuild does not dirty the work tree.
    if path.exists():
        with np.load(path, allow_pickle=False) as old:
            if np.array_equal(old["input"], x) and np.array_equal(old["labels"], y):
                return
    np.savez_compressed(path, input=x, labels=y)


def main():
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    (x_tr, y_tr), (x_cal, y_cal), (x_ev, y_ev) = load_splits()
    print(f"split: train={len(y_tr)} calib={len(y_cal)} eval={len(y_ev)}")

    t0 = time.perf_counter()
    model = train(x_tr, y_tr)
    print(f"training: {time.perf_counter() - t0:.1f} s")

    with torch.no_grad():
        ref = model(torch.from_numpy(x_ev)).numpy()

    onnx_model = to_onnx(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x_ev})[0]
    diff = float(np.abs(logits - ref).max())
    assert diff <= 1e-4, f"onnxruntime vs torch max |diff| = {diff}"
    one = sess.run(["logits"], {"input": x_ev[:1]})[0]  # dynamic batch works
    assert np.allclose(one, logits[:1], atol=1e-5)

    onnx.save(onnx_model, OUT / "digits_cnn.onnx")
    save_npz(OUT / "digits_calib.npz", x_cal, y_cal)
    save_npz(OUT / "digits_eval.npz", x_ev, y_ev)

    acc_torch = float((ref.argmax(1) == y_ev).mean())
    acc = float((logits.argmax(1) == y_ev).mean())
    print(f"onnxruntime vs torch max |diff|: {diff:.2e}")
    print(f"FP32 eval accuracy: torch {acc_torch:.4f}, onnxruntime {acc:.4f} "
          f"({int((logits.argmax(1) == y_ev).sum())}/{len(y_ev)})")


if __name__ == "__main__":
    main()
