"""Where a conversion's time goes, by function: one msq-onnx conversion (the compare_ort.py command: 300
samples, --avg-bits 4) under py-spy, which samples every thread's Python stack 100 times a second, ORT's runs
included (a thread inside Session.run counts there). Prints and writes the functions with the most samples on
top of the stack (self) and anywhere in it (inclusive), in thread-seconds: with two cores busy, a conversion's
thread-seconds exceed its wall time.

    python bench/profile_conversion.py [--model efficientnet minilm] [--rate 100]

Writes docs/bench/profile-<model>.md. Needs py-spy (pip install -e ".[bench]") and ../shared (or MSQ_SHARED);
skips cleanly without either.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys

import datasets
import run_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAME = re.compile(r"(?P<function>\S+) \((?P<file>[^:]+):\d+\)")


def frame_name(frame: str) -> str:
    """'function (file)' with the site-packages prefix dropped, lines merged."""
    match = FRAME.match(frame)
    if not match:
        return frame
    return f"{match['function']} ({match['file'].split('site-packages/')[-1]})"


def aggregate(raw_path: str, rate: int) -> tuple[float, collections.Counter, collections.Counter]:
    """(thread-seconds sampled, self seconds, inclusive seconds) per function from py-spy's raw output."""
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    with open(raw_path) as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            frames = [frame_name(f) for f in stack.split(";")]
            samples = int(count)
            total += samples
            own[frames[-1]] += samples
            for name in set(frames):
                inclusive[name] += samples
    return total / rate, _seconds(own, rate), _seconds(inclusive, rate)


def _seconds(counter: collections.Counter, rate: int) -> collections.Counter:
    return collections.Counter({name: samples / rate for name, samples in counter.items()})


def command(model_name: str, shared: str, work: str, output: str) -> list[str]:
    if model_name == "efficientnet":
        model = os.path.join(shared, "models", "efficientnet-lite0.onnx")
        calib, _ = datasets.imagenet_split(shared, work)
        extra = datasets.EFFICIENTNET_ARGS
    else:
        folder = os.path.join(shared, "models", "minilm-l6")
        model = os.path.join(folder, "model.onnx")
        calib, _ = datasets.debian_split(shared, work, limit=1)
        extra = ["--tokenizer", os.path.join(folder, "tokenizer.json"), "--label-column", "label"]
    return [sys.executable, os.path.join(ROOT, "cli.py"), model, output, "--calib", calib, "--avg-bits", "4",
            "--quiet", *extra]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("efficientnet", "minilm"), nargs="+", default=["efficientnet", "minilm"])
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED)
    parser.add_argument("--rate", type=int, default=100, help="samples per second and thread")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    args = parser.parse_args(argv)
    if not os.path.isdir(args.shared):
        print(f"skipped: shared data folder '{args.shared}' not found (set --shared or MSQ_SHARED)")
        return 0
    spy = shutil.which("py-spy")
    if spy is None:
        print('skipped: py-spy not installed (pip install -e ".[bench]")')
        return 0
    for model_name in args.model:
        work = run_bench._work_folder()
        raw = os.path.join(work, "profile.txt")
        convert = command(model_name, args.shared, work, os.path.join(work, "out.onnx"))
        subprocess.run([spy, "record", "-r", str(args.rate), "-f", "raw", "-o", raw, "--nonblocking", "--",
                        *convert], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        total, own, inclusive = aggregate(raw, args.rate)
        ours = collections.Counter({k: v for k, v in inclusive.items() if "msq_onnx/" in k})
        lines = [f"# Where a conversion's time goes: {model_name} (`python bench/profile_conversion.py --model "
                 f"{model_name}`)", "", f"py-spy at {args.rate} Hz, every thread: {total:.1f} thread-seconds sampled.",
                 "", "| self (s) | function |", "|---:|---|"]
        lines += [f"| {seconds:.2f} | `{name}` |" for name, seconds in own.most_common(args.top)]
        lines += ["", "| inclusive (s) | msq-onnx function |", "|---:|---|"]
        lines += [f"| {seconds:.2f} | `{name}` |" for name, seconds in ours.most_common(args.top)]
        text = "\n".join(lines) + "\n"
        print(text)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"profile-{model_name}.md"), "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
