"""Calibration and evaluation samples: read lazily, validated, batched.

Formats (the same for --calib and --eval):
  * a folder of class subfolders of images (ImageFolder: label = index of the
    subfolder name in sorted order);
  * a folder with labels.csv (``file,label``; files beside it or in images/),
    or such a CSV file itself (paths relative to the CSV's folder);
  * an .npz file or a folder of .npz files; arrays named after the model's
    inputs (a single-input model also accepts one unnamed array) and an
    optional integer ``labels`` array. Loaded with allow_pickle=False.
Images are decoded one batch at a time so memory does not grow with the set.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from .errors import BadData

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing: resize short side, center crop, (x - mean) / std on 0..255."""

    resize: int | None = None  # short side; None: crop / 0.875, the usual ImageNet ratio
    crop: int | None = None  # None: the model's input height/width
    mean: tuple = (0.0,)
    std: tuple = (1.0,)
    channel_order: str = "rgb"
    layout: str = "auto"  # nchw, nhwc, or auto from the model's input shape
    interpolation: str = "bilinear"


def _image_layout(shape, layout: str):
    """Return (layout, channels, height, width) for a rank-4 image input."""
    if len(shape) != 4:
        raise BadData(f"image data needs a rank-4 model input, the model's input has shape {shape}; "
                      "give the samples as .npz instead.")
    if layout == "auto":
        layout = "nhwc" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "nchw"
    channels, height, width = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
    return layout, channels or 3, height, width


class SampleSet:
    """An ordered set of samples; yields feed dicts batch by batch."""

    def __init__(self, count: int, labels: np.ndarray | None, source: str):
        self.count = count
        self.labels = labels
        self.source = source

    def batches(self, batch_size: int):  # pragma: no cover - interface
        raise NotImplementedError


class ImageSamples(SampleSet):
    def __init__(self, files: list[str], labels: np.ndarray | None, source: str, input_spec, preprocess: Preprocess):
        super().__init__(len(files), labels, source)
        self.files = files
        self.input = input_spec
        self.pre = preprocess
        self.layout, self.channels, height, width = _image_layout(input_spec.shape, preprocess.layout)
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

    def _decode(self, path: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image = image.convert("L" if self.channels == 1 else "RGB")
                return self._resize_crop(image)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise BadData(f"cannot read image '{path}' ({type(exc).__name__}); remove or replace it.") from None

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
        pixels = np.asarray(image.crop((left, top, left + crop_w, top + crop_h)), dtype=np.float32)
        return pixels.reshape(crop_h, crop_w, -1)

    def _to_tensor(self, pixels: np.ndarray) -> np.ndarray:
        if self.channels == 3 and self.pre.channel_order == "bgr":
            pixels = pixels[..., ::-1]
        mean = np.asarray(self.pre.mean, np.float32)
        std = np.asarray(self.pre.std, np.float32)
        pixels = (pixels - mean) / std
        if self.layout == "nchw":
            pixels = pixels.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(pixels, dtype=self.input.dtype)

    def batches(self, batch_size: int):
        for start in range(0, self.count, batch_size):
            chunk = self.files[start:start + batch_size]
            pixels = np.stack([self._decode(f) for f in chunk])
            yield {self.input.name: self._to_tensor(pixels)}


def _read_labels_csv(csv_path: str) -> tuple[list[str], list[str]]:
    base = os.path.dirname(os.path.abspath(csv_path))
    files, labels = [], []
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            for row_number, row in enumerate(csv.reader(handle), start=1):
                if not row or (row_number == 1 and row[0].strip().lower() in ("file", "filename", "path")):
                    continue
                if len(row) < 2:
                    raise BadData(f"{csv_path}:{row_number}: expected 'file,label', got {','.join(row)!r}.")
                name = row[0].strip()
                candidates = [name] if os.path.isabs(name) else [os.path.join(base, name),
                                                                   os.path.join(base, "images", name)]
                found = next((c for c in candidates if os.path.isfile(c)), None)
                if found is None:
                    raise BadData(f"{csv_path}:{row_number}: image '{name}' does not exist; "
                                  "fix the path or remove the row.")
                files.append(found)
                labels.append(row[1].strip())
    except UnicodeDecodeError:
        raise BadData(f"{csv_path} is not a UTF-8 text CSV; write it as 'file,label' lines.") from None
    return files, labels


def _parse_int_labels(raw: list[str], where: str) -> np.ndarray:
    try:
        return np.array([int(v) for v in raw], dtype=np.int64)
    except ValueError:
        bad = next(v for v in raw if not v.lstrip("-").isdigit())
        raise BadData(f"{where}: label {bad!r} is not an integer class index.") from None


def _image_folder(path: str) -> tuple[list[str], np.ndarray | None]:
    csv_path = os.path.join(path, "labels.csv")
    if os.path.isfile(csv_path):
        files, raw = _read_labels_csv(csv_path)
        return files, _parse_int_labels(raw, csv_path)
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    files, labels = [], []
    if classes:
        for index, cls in enumerate(classes):
            for name in sorted(os.listdir(os.path.join(path, cls))):
                if name.lower().endswith(IMAGE_SUFFIXES):
                    files.append(os.path.join(path, cls, name))
                    labels.append(index)
        return files, np.array(labels, dtype=np.int64)
    files = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.lower().endswith(IMAGE_SUFFIXES)]
    return files, None


class ArraySamples(SampleSet):
    """Samples from .npz files, read one file at a time."""

    def __init__(self, files: list[str], inputs, source: str):
        self.files = files
        self.inputs = inputs
        self.mapping = None  # model input name -> array name, fixed by the first file
        counts, labels = [], []
        for path in files:
            arrays = self._open(path)
            mapping = self._map_inputs(path, arrays.files)
            if self.mapping is not None and mapping != self.mapping:
                raise BadData(f"{path}: its arrays are named differently from {files[0]}; use one naming.")
            self.mapping = mapping
            count = None
            for spec in inputs:
                array = self._array(path, arrays, mapping[spec.name])
                self._check(path, spec, array)
                if count is not None and len(array) != count:
                    raise BadData(f"{path}: the input arrays hold different numbers of samples; "
                                  "give every input the same first dimension.")
                count = len(array)
            if "labels" in arrays.files:
                file_labels = self._array(path, arrays, "labels")
                if file_labels.ndim != 1 or len(file_labels) != count or file_labels.dtype.kind not in "iu":
                    raise BadData(f"{path}: 'labels' must be a 1-D integer array with one entry per sample "
                                  f"({count}); got {file_labels.dtype} {file_labels.shape}.")
                labels.append(file_labels.astype(np.int64))
            counts.append(count)
        if labels and len(labels) != len(files):
            raise BadData(f"{source}: some .npz files have 'labels' and some not; label all or none.")
        super().__init__(sum(counts), np.concatenate(labels) if labels else None, source)
        if self.count == 0:
            raise BadData(f"{source} holds no samples; give at least one.")

    @staticmethod
    def _open(path: str):
        try:
            return np.load(path, allow_pickle=False)
        except Exception as exc:
            raise BadData(f"cannot read '{path}' as .npz ({type(exc).__name__}); write it with numpy.savez.") from None

    @staticmethod
    def _array(path: str, arrays, name: str) -> np.ndarray:
        try:
            return arrays[name]
        except ValueError:
            raise BadData(f"{path}: array '{name}' holds Python objects; refusing to unpickle it. "
                          "Save plain numeric arrays.") from None
        except Exception as exc:
            raise BadData(f"{path}: array '{name}' cannot be read ({type(exc).__name__}); the file is corrupt.") \
                from None

    def _map_inputs(self, path: str, names) -> dict:
        data_names = [n for n in names if n != "labels"]
        input_names = [s.name for s in self.inputs]
        unknown = [n for n in data_names if n not in input_names]
        if len(self.inputs) == 1 and len(data_names) == 1 and unknown:
            return {input_names[0]: data_names[0]}
        if unknown:
            raise BadData(f"{path}: array(s) {unknown} name no model input; the model's inputs are {input_names}.")
        missing = [n for n in input_names if n not in data_names]
        if missing:
            raise BadData(f"{path}: no array for model input(s) {missing}; name one array after each input.")
        return {n: n for n in input_names}

    @staticmethod
    def _fit_shape(spec, array: np.ndarray) -> np.ndarray:
        # [N,H,W] for a [N,1,H,W] input: the channel axis users leave out.
        if array.ndim == len(spec.shape) - 1 and len(spec.shape) == 4 and spec.shape[1] == 1:
            return array[:, None]
        return array

    def _check(self, path: str, spec, array: np.ndarray) -> None:
        if array.dtype.kind not in "fiub":
            raise BadData(f"{path}: input '{spec.name}' has dtype {array.dtype}; give numeric samples.")
        if spec.dtype.kind == "f" and array.dtype.kind not in "fiu":
            raise BadData(f"{path}: input '{spec.name}' has dtype {array.dtype}, the model takes {spec.dtype}.")
        shaped = self._fit_shape(spec, array)
        expected = ["N"] + [d if d is not None else "?" for d in spec.shape[1:]]
        ok = shaped.ndim == len(spec.shape) and all(
            want is None or want == got for want, got in zip(spec.shape[1:], shaped.shape[1:]))
        if not ok:
            raise BadData(f"{path}: input '{spec.name}' has shape {list(array.shape)}, the model takes "
                          f"{expected}; reshape the samples.")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BadData(f"{path}: input '{spec.name}' contains NaN or Inf; clean the samples.")

    def batches(self, batch_size: int):
        for path in self.files:
            arrays = self._open(path)
            columns = {spec.name: self._fit_shape(spec, self._array(path, arrays, self.mapping[spec.name]))
                       for spec in self.inputs}
            count = len(next(iter(columns.values())))
            for start in range(0, count, batch_size):
                yield {spec.name: np.ascontiguousarray(columns[spec.name][start:start + batch_size], dtype=spec.dtype)
                       for spec in self.inputs}


def open_samples(path: str, inputs, preprocess: Preprocess, role: str = "calibration") -> SampleSet:
    """Open a sample set in any supported format; raise BadData naming the problem."""
    if not path or not os.path.exists(path):
        raise BadData(f"{role} data '{path}' does not exist; give a folder of images, a labels.csv or .npz.")
    if os.path.isfile(path):
        if path.lower().endswith(".npz"):
            return ArraySamples([path], inputs, path)
        if path.lower().endswith(".csv"):
            files, raw = _read_labels_csv(path)
            return _image_set(files, _parse_int_labels(raw, path), path, inputs, preprocess, role)
        raise BadData(f"{role} data '{path}' is a file but not .npz or .csv; give a folder, a labels CSV or .npz.")
    npz_files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(".npz"))
    if npz_files:
        return ArraySamples(npz_files, inputs, path)
    files, labels = _image_folder(path)
    return _image_set(files, labels, path, inputs, preprocess, role)


def _image_set(files, labels, path, inputs, preprocess, role) -> ImageSamples:
    if not files:
        raise BadData(f"{role} data '{path}' holds no images or .npz files; add samples "
                      f"(image suffixes: {', '.join(IMAGE_SUFFIXES)}).")
    if len(inputs) != 1:
        raise BadData(f"the model has {len(inputs)} inputs; images feed only single-input models: use .npz "
                      "with one array per input.")
    return ImageSamples(files, labels, path, inputs[0], preprocess)


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
