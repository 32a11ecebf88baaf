"""Stage: how faithful the written model is to FP32, for every graph output.

Both models run on the held-out samples. Every float output gets its mean
per-sample cosine and its SQNR; the task output (--output) also gets what
its users measure: for class scores, top-1 agreement with FP32 and top-1
against labels; for embeddings, nearest-class-mean top-1 against labels
(class means from the same model's embeddings of the even held-out samples,
scored on the odd ones) and, without labels, how often a sample's nearest
neighbour stays the same. Accuracy is measured on the real output model with
ORT's full optimizations, never on an instrumented copy.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .errors import BadData, BadOption, one_line
from .data import axis_name
from .instrument import batch_of, ordered_runs, padded_batches, progress, run_threads
from .load import producer_map
from .verify import session

CACHE_LIMIT = 256 * 1024**2  # FP32 outputs kept in memory for repeated comparisons (a --max-drop search)
KEEP_LIMIT = 8192  # widest per-sample task output kept for top-1 / neighbour measures
CENTRED_LIMIT = 1 << 20  # values a sample that each get their own mean over the samples (CentredSums); wider: per channel
# An output's axes judged channel by channel (ChannelSums) hold at most this many: a COCO detector's
# [N, 4 + 80, anchors] went unjudged at 64 (a hunting subagent's: classes down to 0.34 under a cosine of 0.99998),
# and ADE20K's 150 classes at 128 (a review's); COCO-stuff has 182.
MAX_CHANNELS = 256
# A channel is judged when its FP32 values reach this share of the output's largest: a class no sample scores is
# noise, but at 1e-3 a detector's boxes in pixels (peak 642) left out every class scoring under 0.64, 19 of 20.
LIVE_CHANNEL = 1e-4
NEIGHBOUR_SAMPLES = 4000
# An output this far from FP32 (the task output's cosine, channels or drop where no gate judges them) is called
# collapsed on stderr and in the report.
COLLAPSE_COSINE = 0.9
COLLAPSE_DROP = 10.0
# An input is taken for the output of the sample before it where they differ by at most this share of the output's
# norm: exact where FP32 recorded the states on ONNX Runtime, within float noise where another runtime did
STATE_MATCH = 1e-3
STATE_PROBE = 8  # samples run to see whether they continue one another, where nothing else needs them run
# The collapse warning's advice where every output it names is off for its output grid alone
GRID_ADVICE = "try --activations dynamic (no --avg-bits moves the grid it is written on)"


def _relative_errors(xx: np.ndarray, yy: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Per channel, from its sums of x*x, y*y and x*y: the noise energy (y - x)^2 over FP32's x^2."""
    return np.maximum(xx + yy - 2 * xy, 0.0) / np.maximum(xx, 1e-30)


class ChannelSums:
    """Per channel of an [N, A, ..., B] output's channel axis (channel_axis), when it holds 2 to MAX_CHANNELS: a
    detector's [N, 4 + classes, anchors] holds boxes in pixels beside scores in [0, 1], and its one cosine is
    the boxes' (a hunting subagent's YOLOv8 at 3 bits: cosine 0.997, the score rows' 0.22, 1 detection left
    of 89); a segmentation's class map goes the same way. One channel is the whole output."""

    def __init__(self):
        self.sums: tuple | None = None  # (axis, sums of xx, yy, xy and the peak |x| per channel); (): none judged

    def add(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        if self.sums == () or reference.size == 0:  # an empty batch (a detector that found nothing) adds nothing
            return
        axis = channel_axis(reference.shape)
        if not 2 <= reference.shape[axis] <= MAX_CHANNELS or (self.sums is not None and (
                self.sums[0] != axis or len(self.sums[1]) != reference.shape[axis])):
            self.sums = ()  # no channel axis, or not the same one in every batch
            return
        other = tuple(a for a in range(reference.ndim) if a != axis)
        x, y = reference.astype(np.float64), quantized.astype(np.float64)
        sums = [(x * x).sum(axis=other), (y * y).sum(axis=other), (x * y).sum(axis=other), np.abs(x).max(axis=other)]
        if self.sums is None:
            self.sums = (axis, *sums)
        else:
            _, xx, yy, xy, peak = self.sums
            self.sums = (axis, xx + sums[0], yy + sums[1], xy + sums[2], np.maximum(peak, sums[3]))

    def _live(self) -> tuple | None:
        """(axis, live channels, their sums of xx, yy and xy), or None where no channel is judged."""
        if not self.sums:
            return None
        axis, xx, yy, xy, peak = self.sums
        live = np.flatnonzero(peak >= LIVE_CHANNEL * float(peak.max())) if peak.size and peak.max() > 0 else []
        if not len(live):  # all zeros in FP32 (an additive mask without padding): no channel to judge
            return None
        return axis, live, xx[live], yy[live], xy[live]

    def relative_errors(self) -> np.ndarray | None:
        """Each live channel's noise energy over its FP32 energy; None where no channel is judged."""
        live = self._live()
        return None if live is None else _relative_errors(*live[2:])

    def weakest(self) -> dict | None:
        """The live channel least like FP32's (a channel whose values stay under LIVE_CHANNEL of the output's
        largest, a class never scored, is not judged): its axis, index, cosine, relative error (noise energy over
        FP32's), scale (its norm over FP32's) and likeness, the lower of its cosine and 1 / sqrt(1 + relative
        error), the cosine noise alone would leave at that error. A cosine is blind to scale: YOLOv8n's class
        scores at 0.58-0.8x of FP32's (a passing --min-cosine 0.95 search at 4.5 bits) kept cosines of 0.908 and
        more, and 26 of its 29 detections over 0.25 were gone."""
        live = self._live()
        if live is None:
            return None
        axis, live, xx, yy, xy = live
        cosines = xy / np.maximum(np.sqrt(xx * yy), 1e-30)
        errors = _relative_errors(xx, yy, xy)
        likeness = np.minimum(cosines, 1 / np.sqrt(1 + errors))
        worst = int(np.argmin(likeness))
        return {"axis": axis, "index": int(live[worst]), "cosine": round(float(cosines[worst]), 6),
                "relative_error": round(float(errors[worst]), 6),
                "scale": round(float(np.sqrt(yy[worst] / max(xx[worst], 1e-30))), 6),
                "likeness": round(float(likeness[worst]), 6)}


class CentredSums:
    """An output centred on its mean over the samples, for the correlation of its variation with FP32's: where every
    sample shares a large part (a landmark regressor's mean shape in its bias, a depth map's distance, an
    all-positive pooled embedding), the cosine is that part's, and the variation that tells one input from another
    can be gone under it (round 35's hunt: cosines of 0.99994, 0.999997 and 0.996 over correlations of 0.879, 0.820
    and 0.387). The mean is per value of a sample while every batch gives samples of one shape (at most
    CENTRED_LIMIT values), else per channel (channel_axis), else per entry of the last axis (the features of tokens
    whose count varies), else one."""

    def __init__(self):
        self.keys: list | None = None  # the first batch's key of each kind of mean, finest first (None: unavailable)
        self.sums: dict = {}  # per kind of mean still kept: sums of x, y and the values counted, per mean
        self.xx = self.yy = self.xy = 0.0

    @staticmethod
    def _keys(shape) -> list:
        values = ("value", tuple(shape[1:])) if int(np.prod(shape[1:])) <= CENTRED_LIMIT else None
        channel = ("channel", channel_axis(shape), shape[channel_axis(shape)]) if len(shape) >= 3 else None
        last = ("channel", len(shape) - 1, shape[-1]) if len(shape) >= 2 else None
        return [values] + [key if key and key[2] <= CENTRED_LIMIT else None for key in (channel, last)] + [("whole",)]

    @staticmethod
    def _reduced(values: np.ndarray, key: tuple, leading: int) -> np.ndarray:
        """values summed down to one entry per mean of `key`; `leading` axes (the samples) come before its axes."""
        if key[0] == "value":
            return values.sum(axis=tuple(range(leading)))
        if key[0] == "channel":
            axis = key[1] - 1 + leading
            return values.sum(axis=tuple(a for a in range(values.ndim) if a != axis))
        return np.asarray(values.sum())

    def add(self, reference: np.ndarray, quantized: np.ndarray, real: np.ndarray | None = None) -> None:
        """real: 1 where a value counts, 0 where it is padding (already zero in both), broadcastable to them."""
        x, y = np.asarray(reference, np.float64).ravel(), np.asarray(quantized, np.float64).ravel()
        self.xx += float(np.dot(x, x))
        self.yy += float(np.dot(y, y))
        self.xy += float(np.dot(x, y))
        x, y = x.reshape(reference.shape), y.reshape(reference.shape)
        keys = self._keys(x.shape)
        if self.keys is None:
            self.keys = keys
        # a batch of another shape: the means it cannot share are dropped for good (a shape that comes back would
        # bring them back on its own batches: a review's), the coarser ones kept
        kept = [k for k, key in enumerate(keys) if key is not None and key == self.keys[k]
                and (not self.sums or k in self.sums)]
        self.sums = {k: sums for k, sums in self.sums.items() if k in kept}
        counted = None if real is None else np.broadcast_to(real, x.shape)
        # Each mean's sums from the finest reduction made of this batch, not the batch again (a 10M-value map a
        # sample: 0.5 s a batch summed from the whole each time)
        finest = None
        for k in kept:
            key = self.keys[k]
            if key[0] == "whole" and finest is not None:
                batch = [np.asarray(v.sum()) for v in finest]
            elif finest is not None and 0 in kept:  # from the per-value sums
                batch = [self._reduced(v, key, 0) for v in finest]
            else:
                batch = [self._reduced(v, key, 1) for v in (x, y)]
                batch.append(self._reduced(counted, key, 1) if counted is not None else
                             np.full(batch[0].shape, x.size / max(batch[0].size, 1)))
            if finest is None:
                finest = batch
            self.sums[k] = batch if k not in self.sums else [a + b for a, b in zip(self.sums[k], batch)]

    def _moments(self) -> tuple[float, float, float, float]:
        """(FP32's variance sum, the written model's, their covariance sum, values counted)."""
        x, y, n = self.sums[min(self.sums)]
        used = n > 0
        x, y, n = x[used], y[used], n[used]
        return (self.xx - float((x * x / n).sum()), self.yy - float((y * y / n).sum()),
                self.xy - float((x * y / n).sum()), float(n.sum()))

    def correlation(self) -> float | None:
        """The correlation of the written model's values with FP32's, each centred on its own means; None where
        FP32's values barely vary about theirs (a spread of 1e-4 of its size, or a single sample: no correlation to
        speak of, and the uncentred measures stand)."""
        if not self.sums:
            return None
        var_x, var_y, covariance, _ = self._moments()
        if var_x <= 1e-8 * max(self.xx, 1e-30):
            return None
        return float(covariance / np.sqrt(var_x * var_y)) if var_y > 0 else 0.0

    def variance(self) -> float:
        """FP32's variance about its means, per value."""
        if not self.sums:
            return 0.0
        var_x, _, _, counted = self._moments()
        return max(var_x, 0.0) / max(counted, 1.0)


@dataclass
class _OutputSums:
    signal: float = 0.0
    noise: float = 0.0
    cosine_sum: float = 0.0
    cosine_min: float = 1.0
    samples: int = 0
    kept_fp32: list = field(default_factory=list)
    kept_quant: list = field(default_factory=list)
    unkept: bool = False  # the task output is too wide to keep, or its width varies between samples: no [N, C]
    integer: bool = False
    positions: int = 0  # a sequence of class scores [N, T, C] or of labels [N, T] (or a label map): positions seen ...
    agreeing: int = 0  # ... and those whose arg-max over C (or label) agrees with FP32's
    probabilities: bool = True  # every FP32 row over the last axis is a probability distribution (or its log)
    nonpositive: bool = True  # ... and no FP32 value is above 0 (log-probabilities, where they are distributions)
    rows: int = 0  # an [N, C] float output's samples ...
    rows_agreeing: int = 0  # ... and those whose arg-max agrees with FP32's
    masked: bool = False  # padded positions were left out
    label_map: bool = False  # integer values a position that are class ids (label_outputs), not measured values
    picked_fp32: list = field(default_factory=list)  # a score per token [N, T]: each sample's arg-max over its
    picked_quant: list = field(default_factory=list)  # real tokens (a QA head's answer start)
    scalar: bool | None = None  # one value a sample in every batch (a regression, a sigmoid head)
    centred: CentredSums = field(default_factory=CentredSums)  # of float outputs but a selection's rows
    channels: ChannelSums = field(default_factory=ChannelSums)
    selected: bool = False  # its length follows a selection (NMS): its rows are what was kept, not samples
    lengths_differ: int = 0  # samples whose output had another shape than FP32's (compared padded_alike)
    paired: bool = False  # a selection's rows were paired with FP32's by their boxes (matched_rows) in some run
    pooled: np.ndarray = field(default_factory=lambda: np.zeros(2))  # of a selection's rows: sums of yy and xy

    def add(self, reference: np.ndarray, quantized: np.ndarray, keep: bool, real: np.ndarray | None = None,
            kept_other_length: bool | None = None) -> None:
        """real: [N, T] True at real tokens (its attention mask, output_masks) for an output whose first two axes
        are [N, T]: padded positions then count in nothing, as they count in no use of the model. keep: the task
        output, kept whole for its [N, C] measures while each sample's is one width of at most KEEP_LIMIT values.
        kept_other_length: whether the run kept another number of rows than FP32 (a selection's rows matched by
        matched_rows have another shape than the run gave); None: their shapes say."""
        self.integer = not np.issubdtype(reference.dtype, np.floating)
        if reference.shape != quantized.shape if kept_other_length is None else kept_other_length:
            self.lengths_differ += len(reference)
        self.paired |= kept_other_length is not None
        if reference.shape != quantized.shape:
            reference, quantized = padded_alike(reference, quantized)
        if real is not None and (reference.shape[:2] != real.shape or (self.integer and reference.ndim != 2)):
            real = None
        # [N, C, 1] is no sequence; nor is what a selection kept, whose rows are detections, not positions
        sequence = reference.ndim == 3 and reference.shape[-1] >= 2 and not self.selected
        # labels per token [N, T], or per pixel [N, H, W] where an in-graph ArgMax made them (a cosine of class ids
        # said 0.99 for 67% of the pixels, a hunting subagent's): agreement per position. Other integer maps (a
        # uint8 image, 61% of whose pixels move by a grey level at 8 bits) are values, judged by cosine.
        label_map = self.integer and not self.selected and (
            reference.ndim == 2 and reference.shape[1] > 1 or reference.ndim > 2 and self.label_map
            and int(np.prod(reference.shape[1:])) > 1)  # a selection's padded rows would count as label 0
        if (sequence and not self.integer) or label_map:
            where = np.ones(reference.shape if self.integer else reference.shape[:2], bool) if real is None else real
            self.positions += int(where.sum())
            same = reference == quantized if self.integer else reference.argmax(-1) == quantized.argmax(-1)
            self.agreeing += int((same & where).sum())
            if not self.integer:
                self.probabilities &= distributions(reference)
                self.nonpositive &= bool(np.all(reference <= 0))
        if real is None and reference.ndim == 2 and reference.shape[1] >= 2 and not self.integer and not self.selected:
            self.rows += len(reference)
            self.rows_agreeing += int((reference.argmax(1) == quantized.argmax(1)).sum())
            self.probabilities &= distributions(reference)
            self.nonpositive &= bool(np.all(reference <= 0))
        if real is not None and reference.ndim == 2 and not self.integer:
            # Its decision is the arg-max over real tokens; zeroed padding would win it where every real score is
            # negative (log-probabilities), and its rows, masked or not, are no [N, C] to keep (a review's).
            self.picked_fp32.append(np.where(real, reference, -np.inf).argmax(1))
            self.picked_quant.append(np.where(real, quantized, -np.inf).argmax(1))
            keep, self.unkept, self.kept_fp32, self.kept_quant = False, True, [], []
        if real is not None:
            self.masked = True
            real = real.reshape(real.shape + (1,) * (reference.ndim - 2))
            reference, quantized = reference * real, quantized * real
        if reference.ndim >= 3 and not self.integer and not self.selected:
            self.channels.add(reference, quantized)
        ref = reference.reshape(len(reference), -1).astype(np.float64)
        out = quantized.reshape(len(quantized), -1).astype(np.float64)
        if not self.integer and not self.selected:  # the float64 copies above, in the output's own shape
            self.centred.add(ref.reshape(reference.shape), out.reshape(quantized.shape), real)
        self.signal += float((ref ** 2).sum())
        if self.selected:
            self.pooled += [float((out * out).sum()), float((ref * out).sum())]
        self.noise += float(((out - ref) ** 2).sum())
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
        both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(out, axis=1) == 0)
        cosine = np.where(both_zero, 1.0, (ref * out).sum(axis=1) / np.maximum(norms, 1e-30))
        self.cosine_sum += float(cosine.sum())
        self.cosine_min = min(self.cosine_min, float(cosine.min()))
        self.samples += len(ref)
        one = ref.shape[1] == 1 and not self.selected
        self.scalar = one if self.scalar is None else self.scalar and one
        if keep and not self.unkept:
            if ref.shape[1] > KEEP_LIMIT or (self.kept_fp32 and self.kept_fp32[0].shape[1] != ref.shape[1]):
                self.unkept, self.kept_fp32, self.kept_quant = True, [], []
            else:  # integer outputs (predicted labels) stay integers: output_kind reads the dtype
                kept = reference.dtype if self.integer else np.float32
                self.kept_fp32.append(ref.astype(kept))
                self.kept_quant.append(out.astype(kept))

    def weakest_channel(self) -> dict | None:
        return self.channels.weakest()

    def spread(self) -> float:
        """FP32's standard deviation about its means over the samples (of a one-value output: over the samples)."""
        return float(np.sqrt(self.centred.variance()))

    def across_samples(self) -> tuple[float, float | None] | None:
        """(cosine, SQNR dB) of a one-value output over the held-out samples, both centred on FP32's mean: a
        sample's own cosine is the sign of its value (1.0 for a regression that lost everything but its offset,
        a hunting subagent's: correlation 0.78 reported as cosine 1.0), and an offset would fill the signal.
        None where FP32's values barely vary (a constant output: no correlation to speak of; the uncentred
        measures stand)."""
        cosine = self.centred.correlation()
        if cosine is None:
            return None
        variance = self.centred.variance() * self.samples
        return cosine, (10 * np.log10(variance / self.noise) if self.noise > 0 else None)


def output_masks(loaded) -> dict:
    """output -> the attention-mask input (an integer [N, T] input named *mask*) whose padding it leaves out: the
    mask whose sequence axis has the output's axis-1 name; where that axis has no name of its own (unnamed, made
    up by the exporter, fixed) and the output is not a fixed [N, C] of another width, the first mask, applied
    where a run's shapes match. An output named apart from every mask gets none: a seq2seq model's decoder logits
    [N, t, V] were masked by the encoder's [N, s] mask (600 positions counted for 480 real ones at batch 2, a
    hunting subagent's)."""
    masks = [spec for spec in loaded.inputs if spec.dtype.kind in "iub" and len(spec.shape) == 2
             and "mask" in spec.name.lower()]
    if not masks:
        return {}
    named = {spec.name: axis_name(spec.axis_names[1] if spec.axis_names else None) for spec in masks}
    result = {}
    for value in loaded.model.graph.output:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if len(dims) < 2:
            continue
        own = axis_name(dims[1].dim_param)
        same = [spec.name for spec in masks if own is not None and named[spec.name] == own]
        if same:
            result[value.name] = same[0]
        elif own is None and not (len(dims) == 2 and dims[1].HasField("dim_value")
                                  and dims[1].dim_value != masks[0].shape[1]):
            result[value.name] = masks[0].name
    return result


class StateLinks:
    """Which inputs carry an output of the sample before them: a recurrent state, as a stateful model's samples
    are recorded by streaming FP32 (silero-vad's state, an LSTM's h and c). Found in the samples themselves:
    sample k continues sample k - 1 where each such input equals FP32's output of k - 1. The check then feeds the
    written model its own output there, as it runs when deployed. Fed FP32's instead (teacher-forced), an error
    that grows as the state is carried over is not seen: silero-vad's default export at 3.0 bits kept 98.7% of
    FP32's decisions fed FP32's states, 83.9% streamed (round 41), with no warning.

    An input is a state where it continues the output on at least half of the samples, varies from sample to
    sample, and is not its own sample's output: a constant input that a saturated output equals now and then, or
    a pass-through, is none (a review's: a constant gain of 1.0 and a sigmoid at 1.0 moved a class-ordered
    split)."""

    def __init__(self, outputs: list):
        self.outputs = outputs  # the outputs a state may come from: a sample's own, not a selection's rows
        self.pairs = None  # (input, output) of one float size a sample, from the first run
        self.matched = {}  # sample -> the pairs whose input was the output of the sample before
        self.counts = Counter()  # pair -> samples it continued
        self.own = Counter()  # pair -> samples whose input equalled their own output
        self.varies = set()  # inputs whose value moved between two samples
        self.previous = None
        self.index = 0
        self.one_a_run = True
        self._links = None

    @classmethod
    def of(cls, loaded, names: list) -> "StateLinks":
        """The links to look for in a model whose outputs are `names`: none where a state cannot be (a single
        input, or no float one); a selection's rows are no sample's own, so never a state."""
        if len(loaded.inputs) < 2 or not any(spec.dtype.kind == "f" for spec in loaded.inputs):
            return cls([])
        return cls([name for name in names if name not in loaded.selected])

    def add(self, feed: dict, count: int, outputs: dict) -> None:
        if self.pairs is None:
            self.pairs = [(name, output) for name, value in feed.items() if np.ndim(value) > 0 and _is_float(value)
                          for output in self.outputs if _is_float(outputs[output])
                          and np.size(value) // max(len(value), 1) == np.size(outputs[output]) //
                          max(len(outputs[output]), 1)]
        if not self.pairs:
            return
        self._links = None
        rows = np.shape(feed[self.pairs[0][0]])[0]
        self.one_a_run = self.one_a_run and rows == 1
        for row in range(count):
            current = {pair: (np.asarray(feed[pair[0]])[row], np.asarray(outputs[pair[1]])[row])
                       for pair in self.pairs if row < len(outputs[pair[1]])}
            for pair, (value, own) in current.items():
                self.own[pair] += _same_values(value, own)
            if self.previous is not None:
                self.varies.update(name for name, value in self.previous[0].items()
                                   if name in feed and not _same_shape_values(np.asarray(feed[name])[row], value))
                hits = {pair for pair, (value, _) in current.items()
                        if pair[1] in self.previous[1] and _same_values(value, self.previous[1][pair[1]])}
                if hits:
                    self.matched[self.index] = hits
                    self.counts.update(hits)
            self.previous = ({name: np.array(np.asarray(feed[name])[row]) for name, _ in self.pairs},
                             {pair[1]: np.array(own) for pair, (_, own) in current.items()})
            self.index += 1

    @property
    def links(self) -> dict:
        """input -> the output it carries on (the first such output, where two hold the same values: an LSTM's
        Y of one step and its Y_h)."""
        if self._links is None:
            transitions = max(self.index - 1, 1)
            self._links = {}
            for pair in self.pairs or ():
                if (pair[0] not in self._links and pair[0] in self.varies and 2 * self.counts[pair] >= transitions
                        and self.own[pair] < self.counts[pair]):
                    self._links[pair[0]] = pair[1]
        return self._links

    @property
    def streamed(self) -> bool:
        """Whether the check feeds back: links found, and one sample a run (a run of several would hold a sample
        beside the one it continues)."""
        return bool(self.links) and self.one_a_run

    def continues(self, index: int) -> bool:
        """Whether sample `index` takes every state from the sample before it."""
        matched = self.matched.get(index, ())
        return bool(self.links) and all(pair in matched for pair in self.links.items())


def carries_state(fp32_path: str, loaded, samples, runs: int = STATE_PROBE) -> bool:
    """Whether the first `runs` samples continue one another (StateLinks), on FP32 one sample a run: only for a
    model with a float input beside another, as a state is."""
    names = [o.name for o in loaded.model.graph.output if o.type.HasField("tensor_type")]
    states = StateLinks.of(loaded, names)
    if not states.outputs:
        return False
    try:
        runner = session(fp32_path, silent=True)
        for index, batch in enumerate(padded_batches(samples, loaded, 1)):
            if index == runs:
                break
            outputs = _run_checked(runner, names, *batch, samples, "FP32 evaluation", loaded.selected)
            states.add(batch[0], batch[1], dict(zip(names, outputs)))
    except Exception:  # the held-out check runs them again, and names what fails there in one line
        return False
    return bool(states.links)


def _is_float(value) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def _same_values(value: np.ndarray, before: np.ndarray) -> bool:
    """Within STATE_MATCH of a non-zero `before`, value for value (a state [N, 8] fed, given as [1, N, 8])."""
    if value.size != before.size:
        return False
    value, before = value.reshape(-1).astype(np.float64), before.reshape(-1).astype(np.float64)
    norm = float(np.linalg.norm(before))
    return norm > 0 and float(np.linalg.norm(value - before)) <= STATE_MATCH * norm


def _same_shape_values(value: np.ndarray, before: np.ndarray) -> bool:
    return value.shape == before.shape and np.array_equal(value, before)


class Reference:
    """FP32 outputs on the held-out samples: computed once and cached when small, else recomputed."""

    def __init__(self, fp32_path: str, loaded, samples, batch_size: int, quiet: bool, workers: int = 1,
                 stop: threading.Event | None = None, keep_session: bool = False):
        """stop: set by another thread to end the runs early (Cancelled). keep_session: keep the FP32 session
        where it ran on one thread (single_thread_session), for the latency timing."""
        self.path, self.loaded, self.samples, self.batch_size = fp32_path, loaded, samples, batch_size
        self.paired = workers  # runs at once (instrument.run_workers)
        self.stop, self.keep_session = stop, keep_session
        self.single_thread_session = None  # the FP32 session of the first runs, where it ran on one thread each
        # a sequence or map output has no values to compare element by element
        self.names = [o.name for o in loaded.model.graph.output if o.type.HasField("tensor_type")]
        self.masks = output_masks(loaded)
        self.label_maps = label_outputs(loaded.model.graph)
        self.selected = loaded.selected
        self.cache = []
        self.states = StateLinks.of(loaded, self.names)
        size = 0
        for feed, count, outputs in self._run("FP32 evaluation", quiet, workers):
            self.states.add(feed, count, dict(zip(self.names, outputs)))
            size += sum(o.nbytes for o in outputs)
            if size > CACHE_LIMIT:
                self.cache = None
            if self.cache is None:
                # the runs are repeated where compared; they go on here only to find the samples a state links
                if not self.states.pairs or (self.states.index >= STATE_PROBE and not self.states.links):
                    break
                continue
            self.cache.append(outputs)

    def _run(self, description: str, quiet: bool, workers: int):
        threads = run_threads(workers)
        runner = session(self.path, threads=threads)
        if self.keep_session and threads == 1 and self.single_thread_session is None:
            # kept for the latency timing, which times FP32 on one thread: one MiniLM-L6 session build (0.25-0.4 s)
            # fewer, its ~55 MB below the peak the yardstick sets earlier
            self.single_thread_session = runner
        run = lambda batch: _run_checked(runner, self.names, *batch, self.samples, description,  # noqa: E731
                                         self.selected)
        with progress(self.samples.count, description, quiet) as bar:
            for (feed, count), outputs in ordered_runs(run, padded_batches(self.samples, self.loaded,
                                                                           self.batch_size), workers):
                if self.stop is not None and self.stop.is_set():
                    raise Cancelled("the FP32 evaluation was stopped")
                yield feed, count, outputs
                bar.update(count)

    @property
    def workers(self) -> int:
        """Runs at once of a model compared against this reference: one when the FP32 runs are repeated
        beside them (no cache), which would otherwise put two of each in flight."""
        return self.paired if self.cache is not None and not self.states.streamed else 1

    def batches(self, quiet: bool):
        if self.cache is None:
            yield from self._run("FP32 evaluation", quiet, 1)
            return
        for (feed, count), outputs in zip(padded_batches(self.samples, self.loaded, self.batch_size), self.cache):
            yield feed, count, outputs


class Cancelled(Exception):
    """Runs ended early on request: never reaches a user (the conversion that asked for it has already failed)."""


_SHAPE_ONLY = ("Cast", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Identity", "Flatten")


def label_outputs(graph) -> set:
    """The graph's outputs that hold class ids: an ArgMax's or ArgMin's, or TopK's indices, through ops that only
    reshape or cast them."""
    producers = {out: node for node in graph.node for out in node.output}
    found = set()
    for value in graph.output:
        name = value.name
        node = producers.get(name)
        while node is not None and node.op_type in _SHAPE_ONLY:
            name = node.input[0]
            node = producers.get(name)
        if node is not None and (node.op_type in ("ArgMax", "ArgMin")
                                 or node.op_type == "TopK" and len(node.output) > 1 and node.output[1] == name):
            found.add(value.name)
    return found


def channel_axis(shape) -> int:
    """Where an output's channels are: of [N, A, B] the shorter axis (A of equals); of a map, axis 1 (ONNX's NCHW),
    or the last where the two before it are a square that it is not ([N, S, S, C], a pose model's [N, 9, 9, 17])
    or axis 1 holds more than MAX_CHANNELS ([N, H, W, C]). A map's spatial axes are no channels: judged, an empty
    margin's columns on a uint8 output grid measured 0.0 under a mask that held (a review's)."""
    if len(shape) == 3:
        return 1 if shape[1] <= shape[2] else 2
    last = len(shape) - 1
    return last if shape[1] == shape[2] != shape[last] or shape[1] > MAX_CHANNELS else 1


def batch_first(output: np.ndarray, rows: int) -> np.ndarray:
    """An output with its samples on axis 0. A rank-0 output (a mean over the batch) is one value a run, not one
    a sample. Where axis 0 is not the batch and exactly one other axis is as long as the batch fed, that axis
    is: torch's CTC layout [T, N, C] at batch 1 was read as its first time step alone (one position of 32 judged,
    a hunting subagent's OCR head at 3 bits: 100% agreement reported, 79.8% measured)."""
    if output.ndim == 0:
        return output.reshape(1)
    if output.shape[0] == rows:
        return output
    axes = [axis for axis in range(1, output.ndim) if output.shape[axis] == rows]
    return np.moveaxis(output, axes[0], 0) if len(axes) == 1 else output


def padded_alike(reference: np.ndarray, quantized: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two runs' outputs of one selection (the boxes an NMS kept) at one shape, the longer's on every axis, zeros
    where a run has no row: what one run kept and the other did not is all error. (Extreme integers there made
    an integer output's cosine -0.3; its count is judged as its length_agreement.) Of one shape, as they are."""
    if reference.shape == quantized.shape:
        return reference, quantized
    if reference.ndim != quantized.ndim:
        raise BadData(f"an output has rank {reference.ndim} in FP32 and {quantized.ndim} in the written model; "
                      "nothing can be compared element by element (report this model).")
    shape = tuple(max(a, b) for a, b in zip(reference.shape, quantized.shape))

    def padded(values, fill):
        out = np.full(shape, fill, values.dtype)
        out[tuple(slice(0, n) for n in values.shape)] = values
        return out

    return padded(reference, 0), padded(quantized, 0)


PAIRING_LIMIT = 4_000_000  # box pairs a run (2,000 x 2,000): beyond, rows are compared in the order kept


def _row_axis(value: np.ndarray, rows: int) -> int | None:
    """The axis past the sample axis that holds a selection's `rows` ([1, K, 4] boxes, [1, K] or [1, 1, K] scores)."""
    return next((axis for axis in range(1, value.ndim) if value.shape[axis] == rows), None)


def _pairing(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each row of `a`, the row of `b` paired with it (-1: none), closest pairs first; then `b`'s unpaired."""
    distance = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    partner, taken, pairs = np.full(len(a), -1), np.zeros(len(b), bool), 0
    for i, j in zip(*np.unravel_index(np.argsort(distance, axis=None, kind="stable"), distance.shape)):
        if partner[i] < 0 and not taken[j]:
            partner[i], taken[j], pairs = j, True, pairs + 1
            if pairs == min(len(a), len(b)):
                break
    return np.concatenate([partner, np.flatnonzero(~taken)])


def matched_rows(names, reference: list, quantized: list, selected) -> tuple[list, dict]:
    """One run's outputs of a selection (an NMS's kept boxes, scores and labels) with the written model's rows put
    beside the FP32 rows they are nearest: pairs of boxes taken closest first (Euclidean, over the 4 values: no box
    format assumed), the written model's rows left over after FP32's, and FP32's left over faced by zeros. In the
    order kept, one box gained early (or two of near-tied scores kept the other way round) shifted every later row
    onto another box. A selection's boxes are its float output whose rows hold 4 values ([K, 4], [1, K, 4]); its
    other outputs (selected[name] names the selection) follow their order, and so do those of a selection with no
    boxes of its own whose rows number the same (torchvision's labels, kept by another NonZero of the same boxes).
    Returns the outputs and {name: whether the run kept another number of rows than FP32} for those paired."""
    lengths = {}
    result = list(quantized)

    boxes = {}  # selection -> the index of its boxes
    for i, name in enumerate(names):
        if name in selected and selected[name] not in boxes and np.issubdtype(reference[i].dtype, np.floating) \
                and reference[i].ndim >= 3 and reference[i].shape[-1] == 4 and quantized[i].shape[-1] == 4 \
                and len(reference[i]) == 1:
            boxes[selected[name]] = i
    for selection, b in boxes.items():
        axis = reference[b].ndim - 2
        a_rows, b_rows = reference[b].shape[axis], quantized[b].shape[axis]
        if not a_rows or not b_rows or a_rows * b_rows > PAIRING_LIMIT:
            continue  # nothing to pair (what one run kept is all error as it stands), or too many pairs to weigh
        a, q = (np.moveaxis(v[0], axis - 1, 0).reshape(v.shape[axis], -1).astype(np.float64) for v in
                (reference[b], quantized[b]))
        if a.shape[1] != 4:
            continue
        order = _pairing(a, q)
        for i, name in enumerate(names):
            if name not in selected or (selected[name] != selection and selected[name] in boxes):
                continue
            ref, out = reference[i], quantized[i]
            axis_i = axis if i == b else _row_axis(ref, a_rows) if ref.ndim == out.ndim and len(ref) == 1 else None
            if axis_i is None or out.shape[axis_i] != b_rows or name in lengths:
                continue
            lengths[name] = a_rows != b_rows
            zero = np.zeros_like(np.take(out, [0], axis=axis_i))
            result[i] = np.concatenate([zero if j < 0 else np.take(out, [j], axis=axis_i) for j in order],
                                       axis=axis_i)
    return result, lengths


def _run_checked(runner, names, feed, count, samples, description, selected=frozenset()) -> list:
    """The outputs `names` of one run, samples first; one of `selected` (ops.selected_outputs) is at batch 1 the
    run's one sample whatever its shape: torchvision's detectors give boxes [K, 4], no axis per sample, and K
    detections read as K samples were judged on their first alone."""
    try:
        outputs = runner.run(names, feed)
    except Exception as exc:
        raise BadData(f"the model cannot run on '{samples.source}' ({one_line(exc)}); check the data's shape "
                      "and dtype against the model's inputs.") from None
    # the batch fed, padding included (a rank-0 input, a threshold fed once a run, has none)
    rows = next((np.shape(value)[0] for value in feed.values() if np.ndim(value) > 0), count)
    for name, value in zip(names, outputs):
        if name in selected and rows > 1 and (np.ndim(value) == 0 or np.shape(value)[0] != rows):
            raise BadOption(f"output '{name}' ({selected[name]} decides its length) has no axis per sample at "
                            f"batch {rows}; run with --batch-size 1, or re-export a model of fixed batch {rows} "
                            "with batch 1.")
    outputs = [np.asarray(o)[None] if name in selected and rows == 1 else batch_first(np.asarray(o), rows)[:count]
               for name, o in zip(names, outputs)]
    for name, value in zip(names, outputs):
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise BadData(f"{description}: output '{name}' is NaN or Inf on '{samples.source}'; check the samples' "
                          "scale and preprocessing (--mean, --std).")
    return outputs


DECISION_KINDS = ("class-scores", "labels")  # outputs judged by the decision they make (top-1), not by cosine


OUTPUT_KINDS = ("class-scores", "embedding", "tensor")  # what --output-kind may declare
# An [N, C] output's name says what it holds when its values cannot: a box regression or a mean-pooled hidden
# state is no class score, though neither is unit-normalized. Checked in this order ("bbox_pred" is boxes).
_NAMED_KINDS = (("tensor", ("box", "coord", "offset", "regress", "landmark", "keypoint", "depth", "disp")),
                ("class-scores", ("logit", "prob", "score", "class", "cls", "label", "pred", "softmax")),
                ("embedding", ("embed", "hidden", "pool", "feature", "vector", "encod", "latent")))


def _named_kind(name: str) -> str | None:
    lowered = name.lower()
    return next((kind for kind, hints in _NAMED_KINDS if any(hint in lowered for hint in hints)), None)


def distributions(values: np.ndarray) -> bool:
    """Whether every row over the last axis is a probability distribution, or its logarithm (a LogSoftmax, as
    CTC recognizers output: named 'output', its log-probabilities were judged as a tensor, whose cosine their
    large negative values keep high, 0.9987 where 79.8% of the positions agreed; a hunting subagent's)."""
    if np.all(values >= 0):
        return bool(np.allclose(values.sum(-1), 1.0, atol=1e-3))
    return bool(np.all(values <= 0) and np.allclose(np.exp(values).sum(-1), 1.0, atol=1e-3))


def sequence_kind(name: str, declared: str | None, probabilities: bool) -> str:
    """A [N, T, C] output: a sequence of class scores (a language model's, a CTC recognizer's, a token
    classifier's logits), judged position by position, when --output-kind, its name or its probability rows say
    so; else a tensor."""
    if declared is not None:
        return "class-scores" if declared == "class-scores" else "tensor"
    return "class-scores" if probabilities or _named_kind(name) == "class-scores" else "tensor"


def output_kind(fp32: np.ndarray | None, labels: np.ndarray | None, sample_shape=None, name: str = "",
                declared: str | None = None) -> str:
    """labels, class-scores, embedding or tensor, from the kept FP32 task output [N, C] and one sample's own
    shape (a [C, H, W] map flattened to [N, C*H*W] is still a map; [C, 1, 1] logits are still class scores; one
    integer a sample is a predicted label, as scikit-learn's converted classifiers output). `declared`
    (--output-kind) decides for an [N, C] float output; else rows that are probabilities are class scores,
    labels beyond C make it an embedding, then the output's name, then unit-normalized rows an embedding."""
    dims = list(fp32.shape[1:] if sample_shape is None else sample_shape) if fp32 is not None else []
    while dims and dims[-1] == 1:
        dims.pop()
    if fp32 is not None and np.issubdtype(fp32.dtype, np.integer) and not dims:
        return "labels"
    if fp32 is None or len(dims) != 1 or fp32.shape[1] < 2:
        return "tensor"
    if declared is not None:
        return declared
    if distributions(fp32):
        return "class-scores"
    if labels is not None and labels.max() >= fp32.shape[1]:
        return "embedding"
    named = _named_kind(name)
    if named is not None:
        return named
    norms = np.linalg.norm(fp32, axis=1)
    return "embedding" if np.allclose(norms, 1.0, atol=1e-3) else "class-scores"


def nearest_class_mean_top1(embeddings: np.ndarray, labels: np.ndarray) -> float | None:
    """Top-1 of the odd samples against class means of the even ones: the highest dot product of the
    L2-normalized embedding with a mean of normalized embeddings (the means are not re-normalized, as in
    ../shared's MiniLM protocol, where FP32 scores 69.84%)."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    build, score = np.arange(len(unit)) % 2 == 0, np.arange(len(unit)) % 2 == 1
    classes = np.unique(labels[build])
    if len(classes) < 2 or not score.any():
        return None
    means = np.stack([unit[build & (labels == c)].mean(axis=0) for c in classes])
    predicted = classes[(unit[score] @ means.T).argmax(axis=1)]
    return float((predicted == labels[score]).mean() * 100.0)


def neighbour_agreement(fp32: np.ndarray, quant: np.ndarray) -> float:
    """% of samples whose nearest other sample (cosine) is the same under both models."""
    def nearest(x):
        unit = x[:NEIGHBOUR_SAMPLES] / np.maximum(np.linalg.norm(x[:NEIGHBOUR_SAMPLES], axis=1, keepdims=True), 1e-12)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.argmax(axis=1)
    return float((nearest(fp32) == nearest(quant)).mean() * 100.0)


def compare(reference: Reference, quant_path: str, task_output: str, labels: np.ndarray | None,
            quiet: bool = False, declared_kind: str | None = None, optimized_path: str | None = None,
            sessions: dict | None = None) -> dict:
    """Per-output fidelity of the model at quant_path, and the task output's accuracy figures. sessions: given,
    it gets the session at quant_path where it ran on one intra-op thread (one a latency timing can use), and ORT
    writes the graph it runs at optimized_path."""
    threads = run_threads(reference.workers)
    kept = sessions is not None and threads == 1
    runner = session(quant_path, optimized_path if kept else None, threads=threads)
    if kept:
        sessions[quant_path] = runner
    sums = {name: _OutputSums(label_map=name in reference.label_maps, selected=name in reference.selected)
            for name in reference.names}
    samples = reference.samples
    task_shape = None
    states = reference.states if reference.states.streamed else None
    carried = {"sample": 0, "outputs": None, "fed_back": 0}  # where a state is fed back: runs one at a time, in order

    def run(batch):
        feed, count = batch[0], batch[1]
        if states is not None and carried["outputs"] is not None and states.continues(carried["sample"]):
            feed = dict(feed)
            for name, output in states.links.items():
                feed[name] = carried["outputs"][output].reshape(np.shape(feed[name])).astype(feed[name].dtype)
            carried["fed_back"] += 1
        outputs = _run_checked(runner, reference.names, feed, count, samples, "QDQ evaluation", reference.selected)
        carried["sample"] += count
        carried["outputs"] = dict(zip(reference.names, outputs))
        return outputs
    with progress(samples.count, "QDQ evaluation", quiet) as bar:
        for (feed, count, fp32), quant in ordered_runs(run, reference.batches(quiet), reference.workers):
            real = {mask: np.asarray(feed[mask])[:count] != 0 for mask in set(reference.masks.values()) if mask in feed}
            quant, other_length = matched_rows(reference.names, fp32, quant, reference.selected) \
                if reference.selected else (quant, {})
            for name, ref, out in zip(reference.names, fp32, quant):
                if ref.dtype == bool:  # a yes/no decision per sample or position: judged as labels 0 / 1
                    ref, out = ref.astype(np.uint8), out.astype(np.uint8)
                    sums[name].label_map = True
                if np.issubdtype(ref.dtype, np.number):
                    if name == task_output:
                        task_shape = ref.shape[1:]
                    sums[name].add(ref, out, name == task_output, real.get(reference.masks.get(name)),
                                   other_length.get(name))
            bar.update(count)
    if not sums[task_output].samples:
        raise BadOption(f"output '{task_output}' holds no numbers to compare with FP32; choose a numeric output "
                        "with --output.")
    correlations = {name: acc.across_samples() for name, acc in sums.items() if acc.scalar and not acc.integer}
    # Of wider outputs, beside their cosine: a cosine an offset shared by every sample holds up can hide the
    # variation that tells the samples apart
    varied = {name: acc.centred.correlation() for name, acc in sums.items()
              if not acc.scalar and not acc.integer and not acc.selected and acc.samples}
    # the written graph is read (its initializers parsed: 200 MB for a 100 MB model) only for an output to explain
    low = [name for name, centred in correlations.items() if centred is not None and centred[0] < COLLAPSE_COSINE]
    grid_steps = output_grid_steps(quant_path, low) if low else {}
    outputs = {}
    for name, acc in sums.items():
        if not acc.samples:
            continue
        sqnr = 10 * np.log10(acc.signal / acc.noise) if acc.noise > 0 else None
        outputs[name] = {"cosine": round(acc.cosine_sum / acc.samples, 6), "min_cosine": round(acc.cosine_min, 6),
                         "sqnr_db": None if sqnr is None else round(float(sqnr), 3)}
        if acc.selected:
            # One cosine over every sample's rows pooled: a run with no detection in either model, the most on
            # images without the model's objects, was a cosine of 1.0 a sample (YOLOv8n with its NMS at 4 bits,
            # 4 of 8 held-out detections lost: 0.924 as a mean of samples).
            yy, xy = acc.pooled
            both = acc.signal * yy
            pooled = round(xy / np.sqrt(both), 6) if both > 0 else float(acc.signal == yy)
            outputs[name].update(cosine=pooled, min_cosine=pooled,
                                 cosine_over="every held-out sample's rows pooled, " + (
                                     "the written model's rows paired with FP32's by their boxes" if acc.paired
                                     else "row by row in the order kept") + " (what a selection kept; a row one "
                                     "run lacks counts as zeros)")
        centred = correlations.get(name)
        if centred is not None:
            cosine, sqnr = centred
            outputs[name].update(cosine=round(cosine, 6), min_cosine=round(cosine, 6),
                                 sqnr_db=None if sqnr is None else round(float(sqnr), 3),
                                 cosine_over="held-out samples, centred (one value a sample: their correlation)")
            # Of one value only: a wider output's pooled spread would blame the grid for values that vary well
            # beyond a step beside many that do not vary at all (a review's)
            step = grid_steps.get(name)
            if step is not None and acc.spread() < step:
                outputs[name]["finer_than_its_grid"] = {"fp32_spread": round(acc.spread(), 6), "step": round(step, 6)}
        if varied.get(name) is not None:
            outputs[name]["centred_cosine"] = round(varied[name], 6)
        if acc.integer:
            outputs[name]["integer"] = True  # ids or labels: their cosine says little
        if acc.masked:
            outputs[name]["real_tokens_only"] = True
        if acc.selected or acc.lengths_differ:
            outputs[name]["length_agreement"] = round(100.0 * (1 - acc.lengths_differ / acc.samples), 4)
            if acc.selected:
                outputs[name]["selected_by"] = reference.selected[name]
        weakest = acc.weakest_channel()
        if weakest is not None:
            outputs[name]["weakest_channel"] = weakest
        decided = acc.positions or acc.rows
        scores = acc.probabilities and not acc.integer and (acc.nonpositive or _named_kind(name) == "class-scores")
        # or an ArgMax's label map (or yes/no decisions) beside its logits: 67% of its pixels agreed, unjudged
        if name != task_output and decided and (scores or acc.integer and acc.label_map and acc.positions):
            # another output of class scores (a LogSoftmax head beside an embedding, a hunting subagent's: cosine
            # 0.945 where 48% of the decisions held): its decisions are judged as the task's. Log-probability rows
            # say so; probability rows only with the name of scores, as attention or pooling weights are softmax
            # rows too, whose near ties make an arg-max flip (17.5% where the cosine was 0.99998, a review's).
            outputs[name]["agreement"] = round(100.0 * (acc.agreeing if acc.positions else acc.rows_agreeing)
                                               / decided, 4)
    task = sums[task_output]
    fp32 = np.concatenate(task.kept_fp32) if task.kept_fp32 else None
    quant = np.concatenate(task.kept_quant) if task.kept_quant else None
    sequence = task.positions > 0
    # One score a sample is a binary classifier's when declared so, given 0/1 labels, or named as scores and held
    # in [0, 1]; its decisions are then judged beside the correlation (collapse_warning reads both).
    binary = bool(task.scalar and not task.integer and fp32 is not None and (
        declared_kind == "class-scores" or (declared_kind is None and (
            (labels is not None and set(np.unique(labels).tolist()) <= {0, 1})
            or (_named_kind(task_output) == "class-scores" and np.all((fp32 >= 0) & (fp32 <= 1)))))))
    picked = task.picked_fp32 and task.picked_quant
    if task.selected:  # its rows are what a selection kept: values, compared padded_alike, and their count
        kind = "tensor"
    elif sequence:
        kind = (("tensor" if declared_kind == "tensor" else "labels") if task.integer
                else sequence_kind(task_output, declared_kind, task.probabilities))
    elif picked:  # a score per token: class scores over the sample's tokens when declared or named so
        kind = "class-scores" if (declared_kind or _named_kind(task_output)) == "class-scores" else "tensor"
    else:
        kind = "class-scores" if binary else output_kind(fp32, labels, task_shape, task_output, declared_kind)
    # Dynamic layers quantize each run's activations on that run's own range: at another batch size the same
    # samples give other outputs (a ViT at 4 bits: agreement 92.2% run one by one, 85.9% in one batch of 128).
    result = {"samples": int(samples.count), "source": samples.source, "task_output": task_output, "kind": kind,
              "batch": batch_of(reference.loaded, reference.batch_size), "outputs": outputs,
              "cosine": outputs[task_output]["cosine"], "sqnr_db": outputs[task_output]["sqnr_db"]}
    outputs[task_output]["kind"] = kind
    used = sorted({reference.masks[name] for name, acc in sums.items() if acc.masked})
    if used:
        result["positions"] = f"real tokens only ({', '.join(repr(mask) for mask in used)} != 0)"
    if sequence and kind in DECISION_KINDS:  # per position; a label per sample says nothing about positions
        result["agreement"] = 100.0 * task.agreeing / task.positions
        result["agreement_unit"] = f"positions ({task.positions:,})"
    elif picked and kind in DECISION_KINDS:  # which token each sample picks; labels name classes, not tokens
        fp32_top, quant_top = np.concatenate(task.picked_fp32), np.concatenate(task.picked_quant)
        result["agreement"] = float((fp32_top == quant_top).mean() * 100.0)
        result["agreement_unit"] = "samples (arg-max over real tokens)"
        result["flips"] = flips(fp32_top, quant_top, None)
    elif kind in DECISION_KINDS:
        if kind == "labels":
            fp32_top, quant_top = fp32.reshape(len(fp32)), quant.reshape(len(quant))
        elif binary:  # one score a sample: a probability decides at 0.5, a logit at 0
            threshold = 0.5 if np.all((fp32 >= 0) & (fp32 <= 1)) else 0.0
            fp32_top, quant_top = (fp32[:, 0] > threshold).astype(int), (quant[:, 0] > threshold).astype(int)
            result["decision"] = f"score > {threshold:g}"
        else:
            fp32_top, quant_top = fp32.argmax(axis=1), quant.argmax(axis=1)
        result["agreement"] = float((fp32_top == quant_top).mean() * 100.0)
        result["flips"] = flips(fp32_top, quant_top, labels)
        if labels is not None:
            result["fp32_top1"] = top1(fp32_top, labels)
            result["quant_top1"] = top1(quant_top, labels)
    elif kind == "embedding":
        result["agreement"] = neighbour_agreement(fp32, quant)
        if labels is not None:
            result["fp32_top1"] = nearest_class_mean_top1(fp32, labels)
            result["quant_top1"] = nearest_class_mean_top1(quant, labels)
            result["top1_method"] = "nearest class mean (means from even held-out samples, scored on odd ones)"
    if states is not None and carried["fed_back"]:
        result["streamed"] = {"states": states.links, "samples_fed_back": carried["fed_back"],
                              "chains": int(samples.count - carried["fed_back"])}
    elif reference.states.links:
        result["states_fed_as_given"] = reference.states.links
    if result.get("fp32_top1") is not None and result.get("quant_top1") is not None:
        result["drop"] = result["fp32_top1"] - result["quant_top1"]
    elif result.get("agreement") is not None:
        result["drop"] = 100.0 - result["agreement"]
    return result


_SHAPE_ONLY = {"Squeeze", "Unsqueeze", "Reshape", "Flatten", "Identity"}


def output_grid_steps(path: str, names: list) -> dict:
    """name -> the step of the per-tensor DequantizeLinear a graph output is written from, directly or
    through ops that only reshape it, for the outputs written so."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path, load_external_data=False).graph
    constants = {t.name: t for t in graph.initializer}
    producers = producer_map(graph.node)
    steps = {}
    for name in names:
        node = producers.get(name)
        while node is not None and node.op_type in _SHAPE_ONLY:
            node = producers.get(node.input[0])
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in constants:
            scale = numpy_helper.to_array(constants[node.input[1]])
            if scale.size == 1:
                steps[name] = abs(float(scale.reshape(())))
    return steps


def judged_channel(measured: dict) -> dict | None:
    """The task output's weakest channel, where its channels are judged: a map's or a detector's, whose one cosine
    can hold while a channel is gone; class scores and labels are judged by their decisions instead."""
    if measured["kind"] in DECISION_KINDS:
        return None
    return measured.get("outputs", {}).get(measured["task_output"], {}).get("weakest_channel")


def channel_floor(min_cosine: float) -> float:
    """What --min-cosine asks of the task output's weakest channel: the gate's own cosine, or the collapse line
    where that is lower. A channel's cosine runs below the whole output's (a small channel is the noisier), so
    the whole's C held to every channel would buy bits the user did not ask for; a collapsed channel under a
    mean that passes (YOLOv8n at 3 bits: 0.997 whole, a class's scores at 0.49) is a broken model all the same."""
    return min(min_cosine, COLLAPSE_COSINE)


def collapse_warning(measured: dict, gated: frozenset = frozenset()) -> str | None:
    """One line when the task output or any other float output is far from FP32. `gated`: what an accuracy gate
    judges of the task output ("cosine": --min-cosine, its weakest channel too; "drop": --max-drop), which this
    check leaves to the gate; what no gate judges is still said.

    Class scores are judged by their decisions (top-1 drop, or disagreement without labels): the logits of
    1,000 classes lose cosine long before top-1 moves (EfficientNet-Lite0 at 3 bits: cosine 0.74, 4.1 points
    lost). Embeddings and maps by cosine."""
    problems = []
    grid_caused = 0  # problems whose one reason is the output grid the written model puts that output on
    decisions = measured["kind"] in DECISION_KINDS
    task_output = measured.get("outputs", {}).get(measured["task_output"], {})
    if "cosine" not in gated:
        # one binary score a sample: its correlation with FP32 too (decisions at 0.5 hide a drifting score)
        if (not decisions or measured.get("decision")) and measured["cosine"] < COLLAPSE_COSINE:
            problems.append(f"cosine to FP32 {measured['cosine']:.3f} < {COLLAPSE_COSINE}{_grid_text(task_output)}")
            grid_caused += "finer_than_its_grid" in task_output
        weakest = judged_channel(measured)
        if weakest and weakest["likeness"] < COLLAPSE_COSINE <= measured["cosine"]:
            problems.append(_channel_text(weakest))
    # no gate judges it: --min-cosine keeps the meaning it has always had, the cosine
    if not decisions and _varied_lost(task_output):
        problems.append(_varied_text(task_output))
    if "drop" not in gated:
        if measured.get("fp32_top1") is not None and measured.get("drop", 0.0) > COLLAPSE_DROP:
            problems.append(f"top-1 {measured['fp32_top1']:.2f}% -> {measured['quant_top1']:.2f}%")
        elif decisions and measured.get("fp32_top1") is None and measured.get("drop", 0.0) > COLLAPSE_DROP:
            where = f" over {measured['agreement_unit']}" if measured.get("agreement_unit") else ""
            problems.append(f"top-1 agreement with FP32 {measured['agreement']:.1f}%{where}")
    # Every float output counts, not only the task's: a detector's boxes can break while its scores hold.
    low = [(name, out) for name, out in measured.get("outputs", {}).items()
           if name != measured["task_output"] and not out.get("integer") and out["cosine"] < COLLAPSE_COSINE]
    others = [f"'{name}' (cosine to FP32 {out['cosine']:.3f} < {COLLAPSE_COSINE}{_grid_text(out)})" for name, out in low]
    grid_caused += sum("finer_than_its_grid" in out for _, out in low)
    others += [f"'{name}' ({_varied_text(out)})" for name, out in measured.get("outputs", {}).items()
               if name != measured["task_output"] and _varied_lost(out)]
    others += [f"'{name}' (top-1 agreement with FP32 {out['agreement']:.1f}%)" for name, out in
               measured.get("outputs", {}).items() if name != measured["task_output"]
               and (out.get("integer") or out["cosine"] >= COLLAPSE_COSINE)
               and 100.0 - out.get("agreement", 100.0) > COLLAPSE_DROP]
    others += [f"'{name}' ({_channel_text(out['weakest_channel'])})" for name, out in measured.get("outputs", {}).items()
               if name != measured["task_output"] and out["cosine"] >= COLLAPSE_COSINE
               and out.get("weakest_channel", {}).get("likeness", 1.0) < COLLAPSE_COSINE]
    # What a selection (NMS) kept: a run whose length moved gained or lost a detection, a decision that moved
    moved: dict = {}
    for name, out in measured.get("outputs", {}).items():
        if 100.0 - out.get("length_agreement", 100.0) > COLLAPSE_DROP:
            moved.setdefault((out.get("selected_by"), out["length_agreement"]), []).append(f"'{name}'")
    if not problems and not others and not moved:
        return None
    parts = [f"output '{measured['task_output']}' collapsed ({'; '.join(problems)})"] if problems else []
    if others:
        parts.append(f"output{'s' if len(others) > 1 else ''} {', '.join(others)} collapsed")
    for (selection, agreement), names in moved.items():
        kept = f" (the rows {selection} keeps)" if selection else ""
        parts.append(f"output{'s' if len(names) > 1 else ''} {', '.join(names)}{kept} had FP32's length in only "
                     f"{agreement:.1f}% of the runs")
    # An output grid too coarse for its variation is no width's doing: only other activation modes move that grid
    advice = (GRID_ADVICE
              if grid_caused == len(problems) + len(others) and not moved
              else "raise --avg-bits, try --activations dynamic or --allocator sensitivity (each layer's error "
                   "measured end to end), or give --min-cosine without --avg-bits to search the smallest budget "
                   "that holds")
    return f"{'; '.join(parts)} on {measured['samples']} held-out samples: do not deploy this model; {advice}."


def weakest_figure(measured: dict, gated: frozenset = frozenset()) -> float:
    """The measurement's lowest figure on collapse_warning's scale, where COLLAPSE_COSINE is the line for each:
    the task output's cosine (where it is not judged by its decisions) and its weakest channel's likeness, the
    share of its decisions kept (1 - the top-1 drop, or the disagreement, in points over 100), every other float
    output's cosine and weakest channel, every other output's agreement, and each selection's runs that kept
    FP32's length. As collapse_warning, it leaves what a gate judges (`gated`) to the gate; and it leaves out an
    output's cosine that its output grid alone holds down (finer_than_its_grid), which no allocation moves. Of two
    models, the one whose figure is lower is the nearer to collapse.

    An output's variation (centred_cosine) is not among them: the probe that makes the second allocation weighs
    each output's error against its energy, and with the variation counted, the lowest of PicoDet's 24 figures on 32
    calibration images chose the first allocation at 3.5 and 3.0 bits, where the second was nearer FP32 held out on
    seven of its eight outputs' variations and every output's cosine (round 40)."""
    figures = []
    decisions = measured["kind"] in DECISION_KINDS
    outputs = measured.get("outputs", {})
    task_output = outputs.get(measured["task_output"], {})
    if "cosine" not in gated:
        if (not decisions or measured.get("decision")) and "finer_than_its_grid" not in task_output:
            figures.append(measured["cosine"])
        weakest = judged_channel(measured)
        if weakest:
            figures.append(weakest["likeness"])
    if "drop" not in gated and measured.get("drop") is not None and (
            measured.get("fp32_top1") is not None or decisions):
        figures.append(1.0 - max(measured["drop"], 0.0) / 100.0)
    for name, out in outputs.items():
        if name != measured["task_output"]:
            figures += [] if out.get("integer") or "finer_than_its_grid" in out else [out["cosine"]]
            figures += [out["agreement"] / 100.0] if "agreement" in out else []
            figures += [out["weakest_channel"]["likeness"]] if out.get("weakest_channel") else []
        figures += [out["length_agreement"] / 100.0] if "length_agreement" in out else []
    return float(min(figures)) if figures else 1.0


def _varied_lost(output: dict) -> bool:
    """An output whose cosine holds while its variation over the samples (CentredSums) is lost."""
    centred = output.get("centred_cosine")
    return centred is not None and centred < COLLAPSE_COSINE <= output["cosine"]


def _varied_text(output: dict) -> str:
    return (f"its variation over the samples correlates with FP32's at {output['centred_cosine']:.3f} < "
            f"{COLLAPSE_COSINE}, under a cosine of {output['cosine']:.3f} that what every sample shares holds up")


def _grid_text(output: dict) -> str:
    """Why a one-value output's correlation fell, where the written model's own output grid is the cause."""
    finer = output.get("finer_than_its_grid")
    return "" if not finer else (
        f"; FP32 varies by {finer['fp32_spread']:.3g} over the samples, under one {finer['step']:.3g} step of the "
        "grid the written model puts it on, which cannot keep that variation")


def channel_text(weakest: dict, line: float = COLLAPSE_COSINE, digits: int = 3) -> str:
    """What took a channel under `line`: its cosine, or its relative error (a scale that moved)."""
    where = f"channel {weakest['index']} of axis {weakest['axis']}"
    if weakest["likeness"] >= weakest["cosine"]:
        return f"{where} has cosine to FP32 {weakest['cosine']:.{digits}f} < {line:g}"
    return (f"{where} is off FP32 by a relative error of {weakest['relative_error']:.{digits}f}, as far as a cosine "
            f"of {weakest['likeness']:.{digits}f} < {line:g} (its scale {weakest['scale']:.2f}x FP32's, its own cosine "
            f"{weakest['cosine']:.{digits}f})")


def _channel_text(weakest: dict) -> str:
    return f"{channel_text(weakest)}, under a whole-output cosine its larger channels hold up"


def top1(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float((predicted == labels).mean() * 100.0)


def flips(fp32: np.ndarray, quant: np.ndarray, labels: np.ndarray | None) -> dict:
    """Predictions that changed: the noise floor for comparing two models on one set."""
    changed = fp32 != quant
    result = {"changed": int(changed.sum())}
    if labels is not None:
        result["fixed"] = int((changed & (quant == labels)).sum())
        result["broken"] = int((changed & (fp32 == labels)).sum())
    return result
