"""Fixed-seed calibration/evaluation splits of the real data in ../shared.

Benchmarks only: the package and its tests never need ../shared. The folder
comes from --shared or MSQ_SHARED (default ../shared beside the checkout).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SHARED = os.environ.get("MSQ_SHARED", os.path.join(HERE, "..", "..", "shared"))
WHEEL_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "msq-onnx-bench")  # models pip-downloaded for benches


def efficientnet_preprocess(size: int = 224) -> dict:
    """An EfficientNet-Lite's preprocessing at its input size, as msq_onnx.data.Preprocess's fields: the short side
    resized to size / 0.875 (bicubic), a centre crop of size, (x - 127) / 128. ../shared/README.md gives it for
    Lite0 at 224; Lite1 and Lite2 take 240 and 260."""
    return {"resize": round(size / 0.875), "crop": size, "interpolation": "bicubic", "mean": (127.0,), "std": (128.0,)}


def efficientnet_args(size: int = 224) -> list[str]:
    """efficientnet_preprocess as the CLI's flags."""
    pre = efficientnet_preprocess(size)
    return ["--resize", str(pre["resize"]), "--crop", str(pre["crop"]), "--interpolation", pre["interpolation"],
            "--mean", str(int(pre["mean"][0])), "--std", str(int(pre["std"][0]))]


EFFICIENTNET_ARGS = efficientnet_args()


def shared_model(shared: str, *parts: str) -> str | None:
    """The path of a model under the shared folder's models/, or None after printing the benchmark's skip line."""
    path = os.path.join(shared, "models", *parts)
    if os.path.exists(path):
        return path
    print(f"skipped: {path} not found (set --shared or MSQ_SHARED)")
    return None


def imagenet_split(shared: str, work: str, calib: int = 300, seed: int = 0) -> tuple[str, str]:
    """Write calib.csv / eval.csv (absolute paths) for the 1,300 ImageNet images."""
    root = os.path.abspath(os.path.join(shared, "data", "imagenet-val-1300"))
    with open(os.path.join(root, "labels.csv"), newline="") as handle:
        rows = [r for r in csv.DictReader(handle)]
    order = np.random.default_rng(seed).permutation(len(rows))
    paths = []
    for name, part in (("imagenet-calib.csv", order[:calib]), ("imagenet-eval.csv", order[calib:])):
        path = os.path.join(work, name)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "label"])
            for i in sorted(part):
                writer.writerow([os.path.join(root, "images", rows[i]["file"]), rows[i]["label"]])
        paths.append(path)
    return paths[0], paths[1]


def mnist_split(shared: str, work: str, calib: int = 500, seed: int = 0) -> tuple[str, str]:
    """Write mnist-calib.npz / mnist-eval.npz with the input named as mnist-8's (Input3)."""
    data = np.load(os.path.join(shared, "data", "mnist-t10k", "mnist-t10k.npz"), allow_pickle=False)
    order = np.random.default_rng(seed).permutation(len(data["labels"]))
    paths = []
    for name, part in (("mnist-calib.npz", order[:calib]), ("mnist-eval.npz", order[calib:])):
        path = os.path.join(work, name)
        part = np.sort(part)
        np.savez(path, Input3=data["images"][part][:, None].astype(np.float32), labels=data["labels"][part])
        paths.append(path)
    return paths[0], paths[1]


DEBIAN_TSV = os.path.join("data", "debian-descriptions", "descriptions.tsv")


def _raise_csv_field_limit() -> None:
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 28))  # the default 128 KiB is below some descriptions


def debian_split(shared: str, work: str, calib: int = 300, limit: int | None = None) -> tuple[str, str]:
    """Write debian-calib.tsv / debian-eval.tsv (columns text, label = section) in the file's row order.

    The first `calib` rows calibrate, every later row evaluates (`limit`: only the first `limit` of those,
    for smoke runs)."""
    _raise_csv_field_limit()
    with open(os.path.join(shared, DEBIAN_TSV), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    parts = {"debian-calib.tsv": rows[:calib],
             "debian-eval.tsv": rows[calib:] if limit is None else rows[calib:calib + limit]}
    paths = [_write_text_rows(os.path.join(work, name), [row["text"] for row in part], [row["section"] for row in part])
             for name, part in parts.items()]
    return paths[0], paths[1]


def _write_text_rows(path: str, texts: list[str], labels: list[str]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels))
    return path


def text_halves(path: str, work: str) -> tuple[str, str]:
    """The even and odd rows of a text,label .tsv (debian-eval.tsv: the tuning half and the report half of
    BENCHMARKS' rounds 18-19) as <stem>-even.tsv and <stem>-odd.tsv."""
    texts, labels = read_text_rows(path)
    stem = os.path.join(work, os.path.splitext(os.path.basename(path))[0])
    return (_write_text_rows(f"{stem}-even.tsv", texts[0::2], labels[0::2]),
            _write_text_rows(f"{stem}-odd.tsv", texts[1::2], labels[1::2]))


def joined_texts(path: str, out: str, seed: int) -> str:
    """Each row of a text,label .tsv joined with another row of its label, drawn with `seed`: texts about twice
    as long, enough rows a sample for MiniLM-L6's FFN-down inputs to reach GPTQ (round 19 used seed 1 for
    debian-calib.tsv and 2 / 3 for the even / odd halves)."""
    import random

    texts, labels = read_text_rows(path)
    rng = random.Random(seed)
    by_label: dict = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    joined = []
    for index, (text, label) in enumerate(zip(texts, labels)):
        others = [other for other in by_label[label] if other != index] or [index]
        joined.append(text + " " + texts[rng.choice(others)])
    return _write_text_rows(out, joined, labels)


def read_text_rows(path: str) -> tuple[list[str], list[str]]:
    """(texts, labels) of a text,label .tsv written by debian_split."""
    _raise_csv_field_limit()
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [row["text"] for row in rows], [row["label"] for row in rows]


def tokenize_rows(tokenizer_path: str, texts: list[str], length: int | None = None,
                  names: tuple[str, str, str] = ("input_ids", "attention_mask", "token_type_ids")) -> list[dict]:
    """One batch-1 feed per text: {ids, mask, type ids} int64 [1, n], named `names`.

    length None: each text its own length (the tokenizer.json's own truncation applies). length L: truncated
    to L tokens (the closing [SEP] kept) and right-padded to L with the pad id and mask 0."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    tokenizer.no_padding()
    pad_id = 0
    if tokenizer.padding:
        pad_id = tokenizer.padding["pad_id"]
    elif tokenizer.token_to_id("[PAD]") is not None:
        pad_id = tokenizer.token_to_id("[PAD]")
    if length is not None:
        tokenizer.enable_truncation(max_length=length)
    feeds = []
    for encoding in tokenizer.encode_batch(texts):
        columns = [list(encoding.ids), list(encoding.attention_mask), list(encoding.type_ids)]
        if length is not None:
            columns = [c + [pad] * (length - len(c)) for c, pad in zip(columns, (pad_id, 0, 0))]
        feeds.append({name: np.array([c], dtype=np.int64) for name, c in zip(names, columns)})
    return feeds


def run_cli(model: str, work: str, calib: str, evaluation: str, name: str, flags: list[str]) -> dict:
    """One conversion through cli.py (its own process, as a user runs it): the report it wrote. Exit 3 (a gate
    failed) still wrote one."""
    out, report = os.path.join(work, name + ".onnx"), os.path.join(work, name + ".json")
    command = [sys.executable, os.path.join(HERE, "..", "cli.py"), model, out, "--calib", calib, "--eval", evaluation,
               *flags, "--report", report, "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 3):
        raise SystemExit(f"{name}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    with open(report) as handle:
        return json.load(handle)


def centred_cosines(evaluation: dict) -> dict:
    """The report's centred cosine of each output that has one (the correlation of its variation over the samples
    with FP32's)."""
    return {name: out["centred_cosine"] for name, out in evaluation["outputs"].items() if "centred_cosine" in out}


def budget_flags(budget: str) -> list[str]:
    """A bench's budget as conversion flags: B is --avg-bits B; one starting with "--" is the flags as they are
    ("--avg-bits 4 --allocator sensitivity")."""
    import shlex

    return shlex.split(budget) if budget.startswith("--") else ["--avg-bits", budget]


def wheel_bench_arguments(description: str, argv=None, models: list | None = None, more=None):
    """The arguments of a bench on models pip downloads: --shared, --budgets (8 and 4), --cache, --out, and
    --models (all of `models` by default) where it names them; `more(parser)` adds a bench's own."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shared", default=DEFAULT_SHARED)
    parser.add_argument("--budgets", nargs="+", default=["8", "4"])
    parser.add_argument("--cache", default=WHEEL_CACHE)
    parser.add_argument("--out", default=os.path.join(HERE, "..", "docs", "bench"))
    parser.add_argument("--name", help="the table's file name in --out, without .json/.md (default: the bench's)")
    if models:
        parser.add_argument("--models", nargs="+", choices=models, default=models)
    if more:
        more(parser)
    return parser.parse_args(argv)


def modes_text(modes: dict) -> str:
    """A report's `modes` ({mode: layers}) as a table cell."""
    return ", ".join(f"{count} {mode}" for mode, count in modes.items())


def reallocation_text(reallocation: dict | None) -> str:
    """A report's `reallocation` (a collapse answered by allocating again) as a table cell: which was kept, in
    how long."""
    return "" if not reallocation else f"{reallocation['kept']}, {reallocation['seconds']:.1f} s"


def save_table(out: str, stem: str, results: list, header: list[str], row) -> None:
    """results as out/stem.json, and as the Markdown table out/stem.md (printed too): `header` is its first two
    lines, `row(result)` each following one."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, stem + ".json"), "w") as handle:
        json.dump(results, handle, indent=1)
    lines = header + [row(r) for r in results]
    with open(os.path.join(out, stem + ".md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))

