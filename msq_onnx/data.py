"""Calibration and evaluation samples: read lazily, validated, batched.

Formats (the same for --calib and --eval):
  * a folder of class subfolders of images (ImageFolder: label = index of the
    subfolder name in sorted order, images at any depth under it; --eval's classes take the calibration set's
    numbering, see number_classes_like);
  * a folder with labels.csv (``file,label``; files beside it or in images/),
    or such a CSV file itself (paths relative to the CSV's folder);
  * an .npz file or a folder of .npz files; arrays named after the model's
    inputs (a single-input model also accepts one unnamed array) and an
    optional integer ``labels`` array. Loaded with allow_pickle=False.
    Sequence inputs may differ in length from file to file: batches are
    right-padded with 0 to their longest sample;
  * text for transformer-style models (.tsv, .jsonl, .txt, and .csv given a
    tokenizer), tokenized with a HF tokenizer.json: see text.py;
  * in memory, an ONNX Runtime CalibrationDataReader (from_data_reader).
Images are decoded one batch at a time so memory does not grow with the set.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .errors import BadData, one_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_LABEL_COLUMN = "label"
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # Pillow's one-channel modes of more than 8 bits


@dataclass(frozen=True)
class Preprocess:
    """Images: resize short side, center crop, (x - mean) / std on 0..255. Text: tokenizer and columns."""

    resize: int | None = None  # short side; None: crop / 0.875, the usual ImageNet ratio
    crop: int | None = None  # None: the model's input height/width
    mean: tuple = (0.0,)
    std: tuple = (1.0,)
    channel_order: str = "rgb"
    layout: str = "auto"  # nchw, nhwc, or auto from the model's input shape
    interpolation: str = "bilinear"
    tokenizer: str | None = None  # path to a HF tokenizer.json
    text_column: str = "text"
    label_column: str = DEFAULT_LABEL_COLUMN  # a missing default column means unlabelled; any other is an error


def _image_layout(shape, layout: str):
    """Return (layout, channels, height, width) for a rank-4 image input."""
    if len(shape) != 4:
        raise BadData(f"image data needs a rank-4 model input, the model's input has shape {shape}; "
                      "give the samples as .npz instead.")
    if layout == "auto":
        layout = "nhwc" if shape[3] in _IMAGE_MODES and shape[1] not in _IMAGE_MODES else "nchw"
    channels, height, width = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
    if channels is not None and channels not in _IMAGE_MODES:
        raise BadData(f"image files give 1 (gray), 3 (RGB) or 4 (RGBA) channels, but the model's input {shape} takes "
                      f"{channels} ({layout}); give the samples as .npz, or --layout if the channels sit elsewhere.")
    return layout, channels or 3, height, width


_IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> the Pillow mode that gives them


class SampleSet:
    """An ordered set of samples; yields feed dicts batch by batch."""

    class_names: list[str] | None = None  # label index -> name, when the data named its classes
    # whether batches() reads nothing from disk: then the batches' shapes cost little to learn before the pass
    # (instrument.estimated_rows); images and .npz files are read again to learn them
    held_in_memory = False
    # the inputs each sample gives whole, with no axis of the input's own for samples (sample_axes): the model
    # is read with one added, and the set is read against the inputs that gives (respec)
    whole: frozenset = frozenset()

    def __init__(self, count: int, labels: np.ndarray | None, source: str):
        self.count = count
        self.labels = labels
        self.source = source

    def respec(self, inputs) -> None:
        """Read the samples against `inputs` from now on: the model's inputs once it has its sample axes. Their
        arrays are the same; only the specs' first axis (1) and what follows from it change."""
        self.inputs = inputs

    def batches(self, batch_size: int):  # pragma: no cover - interface
        raise NotImplementedError

    def uniform_shapes(self) -> dict | None:
        """{input: its dims past the batch axis}, where every sample has the same and the set tells them without
        reading its samples' values; None otherwise."""
        return None

    def keep_decoded(self, mask: np.ndarray | None = None) -> None:
        """Keep what reading the samples (those where `mask` is true) costs to repeat, for a set read more than
        once (the held-out samples: the FP32 reference, then each candidate). Nothing to keep where reading
        is cheap."""

    def chosen_feeds(self, mask: np.ndarray, batch_size: int):
        """Feeds of the samples where `mask` is true, in order (any sizes; _Subset regroups them). Streams
        every sample and drops the others; a set that can skip a sample without reading it says so."""
        offset = 0
        for feed in self.batches(batch_size):
            count = _sample_count(feed)
            chosen = mask[offset:offset + count]
            offset += count
            if chosen.any():
                yield {k: v[chosen] for k, v in feed.items()}


class ImageSamples(SampleSet):
    def __init__(self, files: list[str], labels: np.ndarray | None, source: str, input_spec, preprocess: Preprocess):
        super().__init__(len(files), labels, source)
        self.files = files
        self.input = input_spec
        self.pre = preprocess
        for name, value in (("crop", preprocess.crop), ("resize", preprocess.resize)):
            if value is not None and value < 1:
                raise BadData(f"--{name} {value} is not a positive pixel count; give a size such as 224.")
        self.layout, self.channels, height, width = _image_layout(input_spec.shape, preprocess.layout)
        self._kept_files, self._kept, self._kept_bytes = set(), {}, 0  # path -> decoded crop (uint8): keep_decoded
        crop = preprocess.crop or height or width
        if not crop:
            raise BadData("the model's input height/width are not fixed; pass --crop SIZE for image data.")
        self.size = (preprocess.crop or height or crop, preprocess.crop or width or crop)
        for name, values in (("mean", preprocess.mean), ("std", preprocess.std)):
            if len(values) not in (1, self.channels):
                raise BadData(f"--{name} has {len(values)} values but the model takes {self.channels} channels; "
                              f"give 1 or {self.channels}.")
        if any(s == 0 for s in preprocess.std):
            raise BadData("--std contains 0; every std value must be non-zero.")
        if np.dtype(input_spec.dtype).kind in "iu":
            self._check_integer_input()

    def _check_integer_input(self) -> None:
        """Pixels are 0..255 integers: an integer input (a TF-style uint8 image) takes them only while --mean/--std
        keep them integers in its range, since the cast to its dtype would wrap them or cut their fractions."""
        dtype = np.dtype(self.input.dtype)
        info = np.iinfo(dtype)
        pixels = np.arange(256, dtype=np.float32)[:, None]
        values = (pixels - np.asarray(self.pre.mean, np.float32)) / np.asarray(self.pre.std, np.float32)
        low, high = values.min(), values.max()
        if (values != np.round(values)).any():
            problem = "non-integer values"
        elif low < info.min or high > info.max:
            problem = f"values in [{low:g}, {high:g}], beyond [{info.min}, {info.max}]"
        else:
            return
        if tuple(self.pre.mean) == (0.0,) and tuple(self.pre.std) == (1.0,):  # no --mean/--std: raw pixels
            raise BadData(f"pixels 0..255 do not fit the model's {dtype} input '{self.input.name}'; shift them with "
                          f"--mean {-info.min} (0..255 -> {info.min}..{255 + info.min}).")
        raise BadData(f"--mean/--std make pixels 0..255 {problem}, but the model's input '{self.input.name}' is "
                      f"{dtype}; leave --mean/--std out for a model that takes raw pixels (it normalizes inside).")

    def keep_decoded(self, mask: np.ndarray | None = None) -> None:
        """Decoding is most of an image sample's cost (EfficientNet-Lite0: 3.6 ms an image, against 4.5 ms for
        its quantized model's run): the chosen files' crops are kept as uint8 once decoded, up to
        KEPT_PIXELS_BYTES (60 held-out 224 x 224 images: 9 MB)."""
        self._kept_files = set(self.files if mask is None else (f for f, keep in zip(self.files, mask) if keep))

    def _decode(self, path: str) -> np.ndarray:
        kept = self._kept.get(path)
        if kept is None:
            kept = self._read(path)
            if path in self._kept_files and self._kept_bytes + kept.nbytes <= KEPT_PIXELS_BYTES:
                self._kept[path] = kept
                self._kept_bytes += kept.nbytes
        return kept.astype(np.float32)

    def _read(self, path: str) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as image:
                if image.mode in _WIDE_MODES:
                    image = self._wide_to_8_bit(path, image)
                image = image.convert(_IMAGE_MODES[self.channels])
                return self._resize_crop(image)
        except (MemoryError, BadData):
            raise
        except Exception as exc:  # UnidentifiedImageError, OSError, DecompressionBombError, and on broken
            # files also SyntaxError, struct.error, EOFError, ... from Pillow's decoders
            raise BadData(f"cannot read image '{path}' ({type(exc).__name__}); remove or replace it.") from None

    @staticmethod
    def _wide_to_8_bit(path: str, image):
        """A 16-bit image scaled to the 0..255 that --mean/--std are given for (value / 257, as torchvision users
        convert one): Pillow's convert clips such values at 255, and every pixel came out white."""
        from PIL import Image

        values = np.asarray(image)
        if image.mode == "I" and image.format not in ("PNG", "PPM"):  # 32-bit integers (a 16-bit PNG or PGM opens
            # as "I"): no known scale
            low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
            if low < 0 or high > 255:
                raise BadData(f"image '{path}' holds 32-bit integer pixels in [{low}, {high}], of no known bit "
                              "depth; save it as an 8- or 16-bit image.")
            pixels = values.astype(np.uint8)
        else:
            pixels = np.round(values.astype(np.float32) / 257).astype(np.uint8)
        return Image.fromarray(pixels, "L")

    def _resize_crop(self, image) -> np.ndarray:
        from PIL import Image

        crop_h, crop_w = self.size
        short = self.pre.resize or int(round(max(crop_h, crop_w) / 0.875))
        width, height = image.size
        scale = short / min(width, height)
        new_w, new_h = max(crop_w, round(width * scale)), max(crop_h, round(height * scale))
        method = Image.BICUBIC if self.pre.interpolation == "bicubic" else Image.BILINEAR
        image = image.resize((new_w, new_h), method)
        left, top = (new_w - crop_w) // 2, (new_h - crop_h) // 2
        pixels = np.asarray(image.crop((left, top, left + crop_w, top + crop_h)))  # uint8: _decode makes it float
        return pixels.reshape(crop_h, crop_w, -1)

    def _to_tensor(self, pixels: np.ndarray) -> np.ndarray:
        if self.channels in (3, 4) and self.pre.channel_order == "bgr":  # BGRA keeps its alpha last
            pixels = np.concatenate([pixels[..., 2::-1], pixels[..., 3:]], axis=-1)
        mean = np.asarray(self.pre.mean, np.float32)
        std = np.asarray(self.pre.std, np.float32)
        pixels = (pixels - mean) / std
        if self.layout == "nchw":
            pixels = pixels.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(pixels, dtype=self.input.dtype)

    def batches(self, batch_size: int):
        return self._batches_of(self.files, batch_size)

    def chosen_feeds(self, mask: np.ndarray, batch_size: int):
        # Decoding is most of an image's cost: a held-out fifth no longer decodes the other four.
        return self._batches_of([f for f, keep in zip(self.files, mask) if keep], batch_size)

    def _batches_of(self, files: list[str], batch_size: int):
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            pixels = np.stack([self._decode(f) for f in chunk])
            yield {self.input.name: self._to_tensor(pixels)}


def _read_labels_csv(csv_path: str, text_column: str | None = None) -> tuple[list[str], list[str]]:
    """(image paths, raw labels); `text_column`: a header naming it says the CSV is text given no tokenizer."""
    base = os.path.dirname(os.path.abspath(csv_path))
    files, labels = [], []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # Excel's "CSV UTF-8" starts with a BOM
            for row_number, row in enumerate(csv.reader(handle), start=1):
                if not row or (row_number == 1 and row[0].strip().lower() in ("file", "filename", "path")):
                    continue
                if len(row) < 2:
                    raise BadData(f"{csv_path}:{row_number}: expected 'file,label', got {','.join(row)!r}.")
                name = row[0].strip()
                candidates = [name] if os.path.isabs(name) else [os.path.join(base, name),
                                                                   os.path.join(base, "images", name)]
                found = next((c for c in candidates if os.path.isfile(c)), None)
                if found is None and row_number == 1 and text_column in (field.strip() for field in row):
                    raise BadData(f"{csv_path} has a '{text_column}' column: text data, which needs the model's "
                                  "tokenizer.json: pass --tokenizer (without it a .csv is a 'file,label' image list).")
                if found is None:
                    raise BadData(f"{csv_path}:{row_number}: image {name!r} does not exist; "
                                  "fix the path or remove the row.")
                files.append(found)
                labels.append(row[1].strip())
    except UnicodeDecodeError:
        raise BadData(f"{csv_path} is not a UTF-8 text CSV; write it as 'file,label' lines.") from None
    except csv.Error as exc:
        raise BadData(f"{csv_path} is not a readable CSV ({' '.join(str(exc).split())[:200]}); write it as "
                      "'file,label' lines.") from None
    except OSError as exc:
        raise BadData(f"cannot read {csv_path} ({type(exc).__name__}); check the file.") from None
    return files, labels


_INT64 = np.iinfo(np.int64)


def _parse_int_labels(raw: list[str], where: str) -> np.ndarray:
    values = []
    for text in raw:
        try:
            value = int(text)
        except ValueError:
            raise BadData(f"{where}: label {text!r} is not an integer class index; write labels as "
                          "0, 1, 2, ...") from None
        if not _INT64.min <= value <= _INT64.max:
            raise BadData(f"{where}: label {value} is out of range; labels are class indices 0, 1, 2, ...")
        values.append(value)
    return np.array(values, dtype=np.int64)


def _image_folder(path: str) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    """(files, labels or None, class names or None)."""
    csv_path = os.path.join(path, "labels.csv")
    if os.path.isfile(csv_path):
        files, raw = _read_labels_csv(csv_path)
        return files, _parse_int_labels(raw, csv_path), None
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    files, labels = [], []
    if classes:
        for index, cls in enumerate(classes):
            # every image under the class folder, at any depth, as torchvision's ImageFolder takes them (a class
            # kept in subfolders gave none: 2 of 42 images were read, a hunting subagent's), through linked
            # folders too, as it does; a link back to a folder already walked is not walked again (a loop), and
            # unlike torchvision, a link into the data folder or another class's is not walked: its images would
            # count twice, under two labels
            walked = {os.path.realpath(path)} | {os.path.realpath(os.path.join(path, other)) for other in classes
                                                 if other != cls}
            for folder, subfolders, names in os.walk(os.path.join(path, cls), followlinks=True):
                if os.path.realpath(folder) in walked:
                    subfolders[:] = []
                    continue
                walked.add(os.path.realpath(folder))
                subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # walked in this order
                for name in sorted(names):
                    if name.lower().endswith(IMAGE_SUFFIXES):
                        files.append(os.path.join(folder, name))
                        labels.append(index)
        return files, np.array(labels, dtype=np.int64), classes
    files = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.lower().endswith(IMAGE_SUFFIXES)]
    return files, None, None


def _map_inputs(where: str, names, inputs) -> dict:
    """Model input name -> data name; a single-input model takes one array of any name."""
    data_names = [n for n in names if n != "labels"]
    input_names = [s.name for s in inputs]
    unknown = [n for n in data_names if n not in input_names]
    if len(inputs) == 1 and len(data_names) == 1 and unknown:
        return {input_names[0]: data_names[0]}
    if unknown:
        raise BadData(f"{where}: array(s) {unknown} name no model input; the model's inputs are {input_names}.")
    missing = [n for n in input_names if n not in data_names]
    if missing:
        raise BadData(f"{where}: no array for model input(s) {missing}; name one array after each input.")
    return {n: n for n in input_names}


def _fit_shape(spec, array: np.ndarray) -> np.ndarray:
    return array[:, None] if _lacks_channel_axis(spec, array.shape) else array


def _lacks_channel_axis(spec, shape) -> bool:
    """[N,H,W] for a [N,1,H,W] input: the channel axis users leave out."""
    return len(shape) == len(spec.shape) - 1 and len(spec.shape) == 4 and spec.shape[1] == 1


def _check_array(where: str, spec, array: np.ndarray) -> bool:
    """Dtype, rank, fixed dims and values of one input's samples against the model input. True where each
    sample is the input whole (sample_axes): the model is then run one sample at a time."""
    if array.dtype.kind not in "fiub":
        raise BadData(f"{where}: input '{spec.name}' has dtype {array.dtype}; give numeric samples.")
    if spec.dtype.kind == "f" and array.dtype.kind not in "fiu":
        raise BadData(f"{where}: input '{spec.name}' has dtype {array.dtype}, the model takes {spec.dtype}.")
    if spec.dtype.kind in "iu" and array.dtype.kind == "f" and array.size and (
            not np.isfinite(array).all() or not (array == np.round(array)).all()):
        raise BadData(f"{where}: input '{spec.name}' has non-integer values, the model takes {spec.dtype}; "
                      "give integer samples.")
    whole_shape = [d if d is not None else "?" for d in spec.shape]
    # Each sample fits the input whole: one it cannot take along its first axis (a scalar, an RNN state), one with
    # a fixed first axis other than 1 (torchvision's detectors' image [3, H, W]), or a 1-D one of any length (a
    # waveform). A batch of 1 or a dynamic one fed an extra axis is the samples' mistake.
    whole = array.ndim == len(spec.shape) + 1 and all(
        want is None or want == got for want, got in zip(spec.shape, array.shape[1:])) and bool(
        spec.unbatched or (spec.shape and spec.shape[0] not in (None, 1))
        or (spec.own_first_axis and array.shape[1] != 1))
    one_run = ["N"] + [1 if axis in spec.batch_axes else size for axis, size in enumerate(whole_shape)]
    if spec.unbatched and not whole:
        raise BadData(f"{where}: input '{spec.name}' has shape {list(array.shape)}; it {spec.unbatched}, so "
                      f"msq-onnx feeds it one whole sample a run: give an array [{', '.join(map(str, one_run))}]"
                      " with one sample per entry of its first axis.")
    crowded = [axis for axis in spec.batch_axes if whole and array.shape[1 + axis] != 1]
    if crowded:
        raise BadData(f"{where}: input '{spec.name}' has shape {list(array.shape)}: {array.shape[1 + crowded[0]]} on "
                      f"its axis {crowded[0]}, the batch the other inputs have first; given whole, each entry is a "
                      f"run of one sample: give an array [{', '.join(map(str, one_run))}].")
    if array.ndim == 0:
        raise BadData(f"{where}: input '{spec.name}' is a single value; give an array with one entry per "
                      "sample along its first axis.")
    shaped = _fit_shape(spec, array)
    expected = ["N"] + whole_shape[1:]
    ok = whole or shaped.ndim == len(spec.shape) and all(
        want is None or want == got for want, got in zip(spec.shape[1:], shaped.shape[1:]))
    if not ok:
        whole_too = f", or one whole sample a run {['N'] + whole_shape}" if spec.shape and spec.shape[0] not in (
            None, 1) else ""
        raise BadData(f"{where}: input '{spec.name}' has shape {list(array.shape)}, the model takes "
                      f"{expected}{whole_too}; reshape the samples.")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadData(f"{where}: input '{spec.name}' contains NaN or Inf; clean the samples.")
    if array.size and array.dtype != spec.dtype and spec.dtype.kind in "fiu" and array.dtype.kind in "fiu":
        info = np.finfo(spec.dtype) if spec.dtype.kind == "f" else np.iinfo(spec.dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise BadData(f"{where}: input '{spec.name}' has values in [{low}, {high}], beyond the range of the "
                          f"model's {spec.dtype} input; rescale the samples.")
    return whole


# Names exporters make up one per axis (torch.onnx's list-form dynamic_axes and its outputs' <node>_dim_<k>,
# tf2onnx's unk__<n>): they do not say that two axes are independent, so such an axis counts as unnamed.
_GENERATED_AXIS_NAME = re.compile(r"(_dynamic_axes_\d+|^unk__\d+|_dim_\d+)$")


def axis_name(name: str | None) -> str | None:
    """A dim_param as a model's own name for its axis: None where it has none, or one an exporter made up."""
    return None if not name or _GENERATED_AXIS_NAME.search(name) else name


def _sequence_axis_name(spec) -> str | None:
    return axis_name(spec.axis_names[1] if spec.axis_names and len(spec.axis_names) > 1 else None)


def _check_sequence_lengths(where: str, inputs, shapes: dict) -> None:
    """Inputs whose dynamic axis 1 is the same axis (the sequence axis of ids, masks, ...) must agree on its length.

    Padding each input on its own would pair token i of one input with
    padding of another, so a mismatch is refused rather than repaired. The
    model's dim_param names say which axes are one: a cross-attention
    model's query [N, Q, d] and memory [N, K, d] differ in length by
    design. An unnamed axis may be any of them, so it must agree with all.
    """
    groups, unnamed = {}, {}
    for spec in inputs:
        if spec.name in shapes and len(spec.shape) >= 2 and spec.shape[1] is None and len(shapes[spec.name]) >= 2:
            name = _sequence_axis_name(spec)
            (groups.setdefault(name, {}) if name else unnamed)[spec.name] = shapes[spec.name][1]
    for axis, lengths in (groups or {None: {}}).items():
        lengths = {**lengths, **unnamed}
        if len(set(lengths.values())) > 1:
            described = ", ".join(f"{name} {length}" for name, length in lengths.items())
            shared = (f"which share the model's axis '{axis}'" if axis and not unnamed else
                      "whose sequence axes the model does not name apart")
            raise BadData(f"{where}: sequence lengths differ between inputs ({described}), {shared}; pad them to "
                          "one length (independent axes need different dim_param names in the model).")


def _check_feed(where: str, inputs, mapping: dict, get, one_run: bool = False) -> tuple[dict, int, frozenset]:
    """Check one group of samples (an .npz file, a reader's feed) and return (arrays fitted to the inputs, count,
    the inputs each sample gives whole).

    `get(name)` reads the array that `mapping` names for an input. one_run: the group is one run's feed as the
    model takes it (a CalibrationDataReader's), so an input with no sample axis has none in it either.
    """
    fitted, count, whole = {}, None, set()
    arrays = {spec.name: get(mapping[spec.name]) for spec in inputs} if one_run else {}
    # a run of one sample, told by an input that takes its samples first: [2, 1, 128] beside it is one whole
    single = one_run and any(not spec.unbatched and spec.shape and spec.shape[0] in (None, 1) and
                             arrays[spec.name].ndim and len(arrays[spec.name]) == 1 for spec in inputs)
    for spec in inputs:
        array = arrays[spec.name] if one_run else get(mapping[spec.name])
        if one_run and array.ndim == len(spec.shape) and (spec.unbatched or spec.own_first_axis or (
                single and spec.shape and spec.shape[0] not in (None, 1))):
            array = array[None]
        if _check_array(where, spec, array):
            whole.add(spec.name)
        if count is not None and len(array) != count:
            raise BadData(f"{where}: the input arrays hold different numbers of samples; "
                          "give every input the same first dimension.")
        count = len(array)
        fitted[spec.name] = _fit_shape(spec, array)
    _check_sequence_lengths(where, inputs, {name: array.shape for name, array in fitted.items()
                                            if name not in whole})
    return fitted, count, frozenset(whole)


def _sample_count(feed: dict) -> int:
    return len(next(iter(feed.values())))


def pad_and_stack(feeds: list[dict], pad_values: dict | None = None, length: int | None = None) -> dict:
    """Join feeds {input name: array} along the batch axis, right-padding axis 1 (the sequence axis) to the
    longest among them, or to `length` if that is longer.

    Padding uses pad_values.get(name, 0); 0 is right for attention masks (padding
    is masked out), token type ids and the usual [PAD] id. Axes past 1 must agree.
    """
    pad_values = pad_values or {}
    merged = {}
    for name in feeds[0]:
        parts = [feed[name] for feed in feeds]
        if parts[0].ndim < 2:
            merged[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            continue
        target = max([part.shape[1] for part in parts] + [length or 0])
        if all(part.shape[1] == target for part in parts):
            merged[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            continue
        out = np.full((sum(len(part) for part in parts), target) + parts[0].shape[2:], pad_values.get(name, 0),
                      dtype=np.result_type(*parts))
        row = 0
        for part in parts:
            out[row:row + len(part), :part.shape[1]] = part
            row += len(part)
        merged[name] = out
    return merged


def _rebatch(feeds, batch_size: int):
    """Regroup feeds of any sizes into batches of batch_size (the last may be smaller), padded by pad_and_stack.

    A feed whose shape past the sequence axis differs from the pending ones
    (dynamic-size images, say) starts a new batch: only sequences are padded.
    """
    pending, pending_count = [], 0
    for feed in feeds:
        if pending and any(feed[k].shape[2:] != pending[0][k].shape[2:] for k in feed):
            yield pad_and_stack(pending)
            pending, pending_count = [], 0
        count = _sample_count(feed)
        start = 0
        while start < count:
            take = min(count - start, batch_size - pending_count)
            pending.append({k: v[start:start + take] for k, v in feed.items()})
            pending_count += take
            start += take
            if pending_count == batch_size:
                yield pad_and_stack(pending)
                pending, pending_count = [], 0
    if pending:
        yield pad_and_stack(pending)


class ArraySamples(SampleSet):
    """Samples from .npz files, read one file at a time."""

    def __init__(self, files: list[str], inputs, source: str):
        self.files = files
        self.inputs = inputs
        self.mapping = None  # model input name -> array name, fixed by the first file
        counts, labels, wholes = [], [], set()
        for path in files:
            with self._open(path) as arrays:
                mapping = _map_inputs(path, arrays.files, inputs)
                if self.mapping is not None and mapping != self.mapping:
                    raise BadData(f"{path}: its arrays are named differently from {files[0]}; use one naming.")
                self.mapping = mapping
                _, count, whole = _check_feed(path, inputs, mapping, lambda name: self._array(path, arrays, name))
                wholes.add(whole)
                if "labels" in arrays.files:
                    labels.append(self._labels(path, self._array(path, arrays, "labels"), count))
            counts.append(count)
        if labels and len(labels) != len(files):
            raise BadData(f"{source}: some .npz files have 'labels' and some not; label all or none.")
        super().__init__(sum(counts), np.concatenate(labels) if labels else None, source)
        if self.count == 0:
            raise BadData(f"{source} holds no samples; give at least one.")
        self.whole = _one_whole(wholes, source)

    @staticmethod
    def _open(path: str):
        try:
            arrays = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "pickle" in str(exc):  # neither zip nor .npy: numpy would unpickle it
                raise BadData(f"'{path}' is not an .npz archive (numpy could only read it as a pickle, which is "
                              "refused); write it with numpy.savez.") from None
            raise BadData(f"cannot read '{path}' as .npz (ValueError); write it with numpy.savez.") from None
        except MemoryError:
            raise
        except Exception as exc:
            raise BadData(f"cannot read '{path}' as .npz ({type(exc).__name__}); write it with numpy.savez.") from None
        if not isinstance(arrays, np.lib.npyio.NpzFile):  # an .npy file renamed to .npz
            raise BadData(f"'{path}' is a single .npy array, not an .npz archive; save it with "
                          "numpy.savez(path, <input name>=array).")
        return arrays

    @staticmethod
    def _array(path: str, arrays, name: str) -> np.ndarray:
        try:
            array = arrays[name]
        except ValueError as exc:
            if "allow_pickle" in str(exc) or "pickle" in str(exc):
                raise BadData(f"{path}: array '{name}' holds Python objects; refusing to unpickle it. "
                              "Save plain numeric arrays.") from None
            raise BadData(f"{path}: array '{name}' cannot be read (ValueError); the file is corrupt.") from None
        except MemoryError:
            raise
        except Exception as exc:
            raise BadData(f"{path}: array '{name}' cannot be read ({type(exc).__name__}); the file is corrupt.") \
                from None
        if not isinstance(array, np.ndarray):  # NpzFile hands back a member without a .npy header as raw bytes
            raise BadData(f"{path}: member '{name}' is not a .npy array (raw bytes, no .npy header); write the file "
                          "with numpy.savez.")
        return array

    @staticmethod
    def _labels(path: str, file_labels: np.ndarray, count: int) -> np.ndarray:
        if file_labels.ndim != 1 or len(file_labels) != count or file_labels.dtype.kind not in "iu":
            raise BadData(f"{path}: 'labels' must be a 1-D integer array with one entry per sample "
                          f"({count}); got {file_labels.dtype} {file_labels.shape}.")
        if file_labels.dtype == np.uint64 and len(file_labels) and file_labels.max() > _INT64.max:
            raise BadData(f"{path}: label {int(file_labels.max())} is out of range; labels are class indices "
                          "0, 1, 2, ...")
        return file_labels.astype(np.int64)

    def uniform_shapes(self) -> dict | None:
        """From the arrays' .npy headers (the zip's members are not read further): one shape per input across the
        files, after _fit_shape's channel axis."""
        found = {}
        for path in self.files:
            with self._open(path) as arrays:
                for spec in self.inputs:
                    shape = _header_shape(arrays, self.mapping[spec.name])
                    if shape is None:
                        return None
                    if _lacks_channel_axis(spec, shape):
                        shape = shape[:1] + (1,) + shape[1:]
                    if found.setdefault(spec.name, shape[1:]) != shape[1:]:
                        return None
        return found

    def _chunks(self, batch_size: int):
        for path in self.files:
            with self._open(path) as arrays:
                columns = {spec.name: _fit_shape(spec, self._array(path, arrays, self.mapping[spec.name]))
                           for spec in self.inputs}
            for start in range(0, _sample_count(columns), batch_size):
                yield {spec.name: np.ascontiguousarray(columns[spec.name][start:start + batch_size], dtype=spec.dtype)
                       for spec in self.inputs}

    def batches(self, batch_size: int):
        # Batches span files: a folder of one-sample files still runs batch_size samples at a time.
        return _rebatch(self._chunks(batch_size), batch_size)


def _header_shape(arrays, name: str) -> tuple | None:
    """The shape an .npz member's .npy header gives, its data left unread; None where the header is not one numpy
    reads publicly (format 1.0 or 2.0)."""
    try:
        with arrays.zip.open(f"{name}.npy") as member:
            version = np.lib.format.read_magic(member)
            reader = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            return None if reader is None else tuple(reader(member)[0])
    except (KeyError, ValueError, OSError):
        return None


def open_samples(path: str, inputs, preprocess: Preprocess, role: str = "calibration") -> SampleSet:
    """Open a sample set in any supported format; raise BadData naming the problem."""
    samples = _open_samples(path, inputs, preprocess, role)
    if role == "calibration" and samples.count < 2:
        raise BadData(f"{role} data '{path}' holds {samples.count} sample; the layer predictors need at least 2 "
                      "(a few hundred is typical): add samples.")
    return samples


_FORMATS = "a folder of images, a labels.csv, .npz, or text (.tsv, .jsonl, .txt; .csv with --tokenizer)"


def _open_samples(path: str, inputs, preprocess: Preprocess, role: str) -> SampleSet:
    if not path or not os.path.exists(path):
        raise BadData(f"{role} data '{path}' does not exist; give {_FORMATS}.")
    if not os.path.isfile(path) and not os.path.isdir(path):
        raise BadData(f"{role} data '{path}' is neither a regular file nor a folder; give {_FORMATS}.")
    if os.path.isfile(path):
        suffix = os.path.splitext(path.lower())[1]
        if suffix == ".npz":
            return ArraySamples([path], inputs, path)
        if suffix == ".npy":
            raise BadData(f"{role} data '{path}' is a single .npy array; save it as .npz with "
                          "numpy.savez(path, <input name>=array, labels=...) and pass that.")
        # A .csv is an image list unless a tokenizer says the data is text.
        if preprocess.tokenizer or suffix in (".tsv", ".jsonl", ".txt"):
            from .text import TextSamples  # imports tokenizers only for text data

            return TextSamples(path, inputs, preprocess, role)
        if suffix == ".csv":
            files, raw = _read_labels_csv(path, preprocess.text_column)
            return _image_set(files, _parse_int_labels(raw, path), path, inputs, preprocess, role)
        raise BadData(f"{role} data '{path}' is a file but not .npz, .csv or text; give {_FORMATS}.")
    npz_files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(".npz"))
    if npz_files:
        return ArraySamples(npz_files, inputs, path)
    files, labels, class_names = _image_folder(path)
    samples = _image_set(files, labels, path, inputs, preprocess, role)
    samples.class_names = class_names
    return samples


def _image_set(files, labels, path, inputs, preprocess, role) -> ImageSamples:
    if not files:
        raise BadData(f"{role} data '{path}' holds no images or .npz files; add samples "
                      f"(image suffixes: {', '.join(IMAGE_SUFFIXES)}).")
    if len(inputs) != 1:
        raise BadData(f"the model has {len(inputs)} inputs; images feed only single-input models: use .npz "
                      "with one array per input.")
    return ImageSamples(files, labels, path, inputs[0], preprocess)


class _FeedSamples(SampleSet):
    """Validated feeds held in memory."""

    held_in_memory = True

    def __init__(self, feeds: list[dict], source: str):
        super().__init__(sum(_sample_count(feed) for feed in feeds), None, source)
        self.feeds = feeds

    def batches(self, batch_size: int):
        return _rebatch(self.feeds, batch_size)


def from_data_reader(reader, inputs, source: str = "CalibrationDataReader") -> SampleSet:
    """Read an onnxruntime.quantization.CalibrationDataReader (any object whose get_next() returns a feed dict,
    then None) to its end into memory, each feed checked like an .npz file's arrays; no labels."""
    if not callable(getattr(reader, "get_next", None)):
        raise BadData(f"{source}: {type(reader).__name__} has no get_next(); give an "
                      "onnxruntime.quantization.CalibrationDataReader.")
    feeds, number, wholes = [], 0, set()
    while True:
        number += 1
        where = f"{source} feed {number}"
        try:
            feed = reader.get_next()
        except MemoryError:
            raise
        except Exception as exc:
            raise BadData(f"{where}: get_next() raised {type(exc).__name__} ({one_line(exc)}); fix the reader.") \
                from None
        if feed is None:
            break
        if not isinstance(feed, Mapping):
            raise BadData(f"{where} is a {type(feed).__name__}, not a dict of model input name -> array; "
                          "return such a dict from get_next().")
        try:
            arrays = {name: np.asarray(value) for name, value in feed.items()}
        except ValueError as exc:  # ragged nested lists
            raise BadData(f"{where}: cannot make arrays of its values ({one_line(exc)}); give numpy arrays.") \
                from None
        fitted, count, whole = _check_feed(where, inputs, _map_inputs(where, arrays, inputs), arrays.__getitem__,
                                           one_run=True)
        wholes.add(whole)
        if count:
            feeds.append({spec.name: np.ascontiguousarray(fitted[spec.name], dtype=spec.dtype) for spec in inputs})
    if not feeds:
        raise BadData(f"{source} gave no samples before get_next() returned None; give at least one feed.")
    samples = _FeedSamples(feeds, source)
    samples.whole = _one_whole(wholes, source)
    return samples


def _one_whole(wholes: set, source: str) -> frozenset:
    """The inputs every file or feed gives whole: one reading for the whole set."""
    if len(wholes) > 1:
        first, other = sorted(wholes, key=sorted)[:2]
        differ = sorted(first ^ other)
        raise BadData(f"{source}: input '{differ[0]}' is given whole, [N, *its shape], in some files or feeds and "
                      "with samples along its own first axis in others; give it one way throughout.")
    return next(iter(wholes), frozenset())


def check_labels(samples: SampleSet, num_classes: int | None, role: str) -> None:
    if samples.labels is None:
        return
    labels = samples.labels
    if labels.min() < 0 or (num_classes and labels.max() >= num_classes):
        bad = int(labels.max() if labels.min() >= 0 else labels.min())
        raise BadData(f"{role} data '{samples.source}': label {bad} is out of range for a model with "
                      f"{num_classes} outputs; labels must be 0..{(num_classes or 1) - 1}.")
    if role == "calibration" and len(np.unique(labels)) < 2:
        raise BadData(f"{role} data '{samples.source}' has only one class among its labels; imprinting needs "
                      "at least two (or drop the labels to use the model's own predictions).")


def number_classes_like(samples: SampleSet, reference: SampleSet, role: str = "evaluation") -> None:
    """Renumber `samples`' named classes (class subfolders, label names) by their places in `reference`'s.

    Each set numbers its names in its own sorted order, so an --eval set
    missing one calibration class would shift every class after it and be
    scored against the wrong outputs. A class the reference does not name
    has no known index and is refused.
    """
    if samples.class_names is None or reference.class_names is None or samples.labels is None:
        return
    index = {name: i for i, name in enumerate(reference.class_names)}
    used = set(np.unique(samples.labels).tolist())  # an empty class folder names a class no sample has
    unknown = [name for i, name in enumerate(samples.class_names) if name not in index and i in used]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise BadData(f"{role} data '{samples.source}' has class(es) {shown} that the calibration data "
                      f"'{reference.source}' does not name; classes are numbered by the calibration set's class "
                      "names, so add samples of them to the calibration data or drop them from the "
                      f"{role} data.")
    samples.labels = np.array([index.get(name, -1) for name in samples.class_names], dtype=np.int64)[samples.labels]
    samples.class_names = list(reference.class_names)


KEPT_PIXELS_BYTES = 64 * 1024**2  # decoded crops kept for sets read more than once (keep_decoded)


class _Subset(SampleSet):
    """The samples of another set where `mask` is true, streamed through its batches."""

    def __init__(self, parent: SampleSet, mask: np.ndarray, role: str):
        labels = parent.labels[mask] if parent.labels is not None else None
        super().__init__(int(mask.sum()), labels, f"{parent.source} [{role} samples]")
        self.parent, self.mask = parent, mask
        self.class_names = parent.class_names
        self.whole = parent.whole

    def batches(self, batch_size: int):
        return _rebatch(self.parent.chosen_feeds(self.mask, batch_size), batch_size)

    def chosen_feeds(self, mask: np.ndarray, batch_size: int):
        return self.parent.chosen_feeds(self._within(mask), batch_size)

    def keep_decoded(self, mask: np.ndarray | None = None) -> None:
        self.parent.keep_decoded(self.mask if mask is None else self._within(mask))

    @property
    def held_in_memory(self) -> bool:
        return self.parent.held_in_memory

    def uniform_shapes(self) -> dict | None:
        return self.parent.uniform_shapes()

    def _within(self, mask: np.ndarray) -> np.ndarray:
        within = self.mask.copy()
        within[within] = mask  # a subset of a subset: the parent's samples chosen by both
        return within


def first_samples(samples: SampleSet, count: int) -> SampleSet:
    """The set's first `count` samples (all of them where it holds no more)."""
    if samples.count <= count:
        return samples
    return _Subset(samples, np.arange(samples.count) < count, f"first {count}")


def split_holdout(samples: SampleSet, fraction: float, streams: bool = False) -> tuple[SampleSet, SampleSet]:
    """Hold out every k-th sample (k = 1/fraction) and calibrate on the rest, never on both.

    Every k-th, not the last ones: an ImageFolder lists samples class by
    class, so its last samples would be its last classes only. streams: the
    samples continue one another (a recorded state), and the last fifth of up
    to k stretches spread over them is held out (one stretch per k^2 samples),
    so that the check carries the written model's own state from sample to
    sample there (fidelity.StateLinks).
    """
    step = max(2, int(round(1 / fraction)))
    order = np.arange(samples.count)
    if streams:
        stretches = max(1, min(step, samples.count // step ** 2))
        stretch = order * stretches // max(samples.count, 1)
        starts = np.searchsorted(stretch, np.arange(stretches + 1))
        lengths = np.diff(starts)[stretch]
        held = order - starts[stretch] >= lengths - np.maximum(lengths // step, 1)
    else:
        held = order % step == step - 1
    if held.sum() < 1 or samples.count - held.sum() < 2:
        raise BadData(f"calibration data '{samples.source}' has {samples.count} samples: too few to hold out "
                      f"{fraction:.0%} for --max-drop; give --eval or more samples.")
    return _Subset(samples, ~held, "calibration"), _Subset(samples, held, "held-out")
