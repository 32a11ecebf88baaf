"""Stateful models whose inputs take no samples along axis 0: silero-vad's voice activity detectors, as PyPI ships them.

Their inputs are a window of audio [batch, 576] (512 new samples after 64 of context, 16 kHz), the recurrent state
[2, batch, 128] with its batch axis second, and (in two exports) the sample rate as a scalar; the OpenVINO export
fixes them at [1, 576] and [2, 1, 128]. msq-onnx is given each run's inputs whole (sample_axes).

Audio: ../shared holds none, so speech is synthesized by espeak-ng (a Debian package: `apt-get install espeak-ng`)
from Debian package descriptions of ../shared, one sentence an utterance, between stretches of silence, under white
noise at 10-30 dB SNR. A 512-sample window is speech where the clean speech's energy in it is over 1e-4 of full
scale. 40 calibration clips and 20 held-out clips (other descriptions). Calibration samples are each window of the
calibration clips with the state FP32 carries to it; the tool's held-out check uses the held-out clips the same way,
and feeds the written model its own state where a window continues the one before (fidelity.StateLinks); with
--calib-only it is given no --eval and holds out stretches of the calibration windows itself.
The bench then streams every held-out clip through FP32 and the written model, each carrying its own state, and
reports how often the written model's decision (probability over 0.5) is FP32's, and each one's accuracy against the
windows' speech labels.

    python bench/silero_vad.py [--shared ../shared] [--cache ~/.cache/msq-onnx-bench] [--budgets 8 4]
                               [--models EXPORT ...] [--calib-only]
A budget is --avg-bits B, or, starting with "--", the conversion's flags as they are ("--avg-bits 4 --allocator
sensitivity", "--min-cosine 0.95").
Writes docs/bench/silero-vad.json and .md; skips cleanly without espeak-ng, the wheel or ../shared.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import wave

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import datasets  # noqa: E402
from unseen_models import fetch_wheel  # noqa: E402

WHEEL = "silero-vad==6.2.3"
EXPORTS = ["silero_vad_16k_op15", "silero_vad_half", "silero_vad_openvino_16k", "silero_vad"]
RATE, WINDOW, CONTEXT = 16000, 512, 64
SPEECH_ENERGY = 1e-4


def _sentences(shared: str, count: int, skip: int) -> list[str]:
    path = os.path.join(shared, datasets.DEBIAN_TSV)
    datasets._raise_csv_field_limit()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    texts = [row["text"].split(".")[0][:160] for row in rows[skip::7]]
    return [t for t in texts if len(t.split()) >= 4][:count]


def _speak(text: str, work: str, index: int) -> np.ndarray:
    from scipy.signal import resample_poly

    path = os.path.join(work, f"say{index}.wav")
    subprocess.run(["espeak-ng", "-w", path, "-s", "160", text], check=True, capture_output=True)
    with wave.open(path) as handle:
        rate, frames = handle.getframerate(), handle.readframes(handle.getnframes())
    voice = np.frombuffer(frames, np.int16).astype(np.float32) / 32768.0
    return resample_poly(voice, RATE, rate).astype(np.float32)


def _clips(texts: list[str], work: str, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(noisy audio, each window's speech label) per clip: silence, an utterance, silence, all under noise."""
    rng = np.random.default_rng(seed)
    clips = []
    for index, text in enumerate(texts):
        voice = _speak(text, work, index)
        before, after = (np.zeros(int(RATE * rng.uniform(0.3, 1.0)), np.float32) for _ in range(2))
        clean = np.concatenate([before, voice, after])
        clean = clean[:len(clean) // WINDOW * WINDOW]
        power = float(np.mean(voice ** 2))
        noise = rng.normal(0, np.sqrt(power / 10 ** (rng.uniform(10, 30) / 10)), clean.shape).astype(np.float32)
        labels = (clean.reshape(-1, WINDOW) ** 2).mean(axis=1) > SPEECH_ENERGY
        clips.append((clean + noise, labels))
    return clips


def _feeds(audio: np.ndarray):
    """Each window with the 64 samples before it, as silero-vad's own wrapper feeds it."""
    context = np.zeros(CONTEXT, np.float32)
    for start in range(0, len(audio), WINDOW):
        window = audio[start:start + WINDOW]
        yield np.concatenate([context, window])[None]
        context = window[-CONTEXT:]


def _stream(session, audio: np.ndarray, rate_input: bool, collect: list | None = None) -> np.ndarray:
    """The probability of each window, the state carried from window to window; collect gets each run's inputs."""
    state, probabilities = np.zeros((2, 1, 128), np.float32), []
    for window in _feeds(audio):
        feed = {"input": window, "state": state}
        if rate_input:
            feed["sr"] = np.array(RATE, np.int64)
        if collect is not None:
            collect.append(feed)
        probability, state = session.run(None, feed)
        probabilities.append(float(probability.ravel()[0]))
    return np.array(probabilities)


def _samples(session, clips, rate_input: bool, path: str) -> str:
    feeds = []
    for audio, _ in clips:
        _stream(session, audio, rate_input, feeds)
    arrays = {"input": np.concatenate([f["input"] for f in feeds]), "state": np.stack([f["state"] for f in feeds])}
    if rate_input:
        arrays["sr"] = np.full(len(feeds), RATE, np.int64)
    np.savez(path, **arrays)
    return path


def _teacher_forced(fp32, written, held: str, rate_input: bool) -> float:
    """The share of held-out windows whose decision (probability over 0.5) the written model keeps when both are
    fed FP32's states, as the tool's held-out check feeds them."""
    arrays, same = np.load(held), []
    for index in range(len(arrays["input"])):
        feed = {"input": arrays["input"][index:index + 1], "state": arrays["state"][index]}
        if rate_input:
            feed["sr"] = np.asarray(arrays["sr"][index])
        same.append((fp32.run(None, feed)[0].item() > 0.5) == (written.run(None, feed)[0].item() > 0.5))
    return float(np.mean(same))


def main(argv=None) -> int:
    args = datasets.wheel_bench_arguments(__doc__.splitlines()[0], argv, EXPORTS, lambda parser: parser.add_argument(
        "--calib-only", action="store_true", help="convert without --eval: the tool holds out part of --calib"))
    if shutil.which("espeak-ng") is None:
        print("skipped: no espeak-ng to synthesize speech (apt-get install espeak-ng)")
        return 0
    if not os.path.isfile(os.path.join(args.shared, datasets.DEBIAN_TSV)):
        print(f"skipped: no Debian descriptions under {args.shared}")
        return 0
    folder = fetch_wheel(WHEEL, args.cache)
    if folder is None:
        return 0
    import onnxruntime as ort

    results = []
    with tempfile.TemporaryDirectory(prefix="msq-vad-") as work:
        calib_clips = _clips(_sentences(args.shared, 40, 0), work, 0)
        held_clips = _clips(_sentences(args.shared, 20, 3), work, 1)
        for export in args.models:
            model = os.path.join(folder, "silero_vad", "data", export + ".onnx")
            fp32 = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            rate_input = "sr" in {i.name for i in fp32.get_inputs()}
            calib = _samples(fp32, calib_clips, rate_input, os.path.join(work, export + "-calib.npz"))
            held = _samples(fp32, held_clips, rate_input, os.path.join(work, export + "-eval.npz"))
            reference = [_stream(fp32, audio, rate_input) for audio, _ in held_clips]
            labels = np.concatenate([labels for _, labels in held_clips])
            for budget in args.budgets:
                flags = datasets.budget_flags(budget)
                name = f"{export}-{len(results)}"
                out, report_path = os.path.join(work, name + ".onnx"), os.path.join(work, name + ".json")
                done = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), model, out, "--calib", calib,
                                       *([] if args.calib_only else ["--eval", held]), *flags,
                                       "--report", report_path, "--quiet"],
                                      capture_output=True, text=True)
                row = {"model": export, "budget": budget, "exit": done.returncode}
                if done.returncode not in (0, 3):
                    row["said"] = done.stderr.strip().splitlines()[-1][:300]
                    results.append(row)
                    print(row, flush=True)
                    break  # a refusal does not depend on the budget
                with open(report_path) as handle:
                    report = json.load(handle)
                written = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
                streamed = np.concatenate([_stream(written, audio, rate_input) for audio, _ in held_clips])
                forced = _teacher_forced(fp32, written, held, rate_input)  # as the tool's check feeds them
                want = np.concatenate(reference)
                row.update({"windows": int(len(want)), "speech_share": float(labels.mean()),
                            "decisions_agree_fp32_states": forced,
                            "decisions_agree": float(np.mean((streamed > 0.5) == (want > 0.5))),
                            "fp32_accuracy": float(np.mean((want > 0.5) == labels)),
                            "written_accuracy": float(np.mean((streamed > 0.5) == labels)),
                            "streamed_max_abs": float(np.abs(streamed - want).max()),
                            "outputs": {k: v["cosine"] for k, v in report["evaluation"]["outputs"].items()},
                            "tool_streamed": report["evaluation"].get("streamed"),
                            "tool_held_out": report["evaluation"]["samples"],
                            "modes": report["modes"], "avg_bits": report["avg_weight_bits"],
                            "bits": [layer["bits"] for layer in report["layers"]],
                            "seconds": report["timings_s"]["total"], "reallocation": report.get("reallocation"),
                            "bytes": report["size_bytes"],
                            "warnings": report["warnings"]})
                results.append(row)
                print(row, flush=True)
    if not results:
        return 0

    def line(r) -> str:
        if "windows" not in r:
            return f"| {r['model']} | {r['budget']} | exit {r['exit']}: {r['said']} | | | | | | | | |"
        outputs = ", ".join(f"{k} {v:.4f}" for k, v in r["outputs"].items())
        return (f"| {r['model']} | {r['budget']} | {outputs} | {100 * r['decisions_agree_fp32_states']:.1f}% | "
                f"{100 * r['decisions_agree']:.1f}% | "
                f"{100 * r['fp32_accuracy']:.1f}% / {100 * r['written_accuracy']:.1f}% | "
                f"{datasets.modes_text(r['modes'])} | {len(r['warnings'])} | {r['streamed_max_abs']:.3f} | "
                f"{r['seconds']:.1f} | {datasets.reallocation_text(r.get('reallocation'))} |")

    datasets.save_table(args.out, args.name or "silero-vad", results,
                        ["| export | budget | held-out cosine (the tool's check, streamed) | decisions as FP32's, FP32's states "
                         "| decisions as FP32's, streamed | accuracy FP32 / written, streamed | modes | warnings "
                         "| largest probability change | conversion s | allocated again after a collapse: kept, time |",
                         "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---|"], line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
