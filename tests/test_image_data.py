"""Image samples: what the decoded pixels are for the image files people have, and what the model is fed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import bad_data
from msq_onnx.data import Preprocess, open_samples
from msq_onnx.load import InputSpec


def _fed(folder, channels=1, dtype=np.float32, **preprocess):
    spec = InputSpec("x", [None, channels, 8, 8], np.dtype(dtype))
    samples = open_samples(str(folder), [spec], Preprocess(resize=8, **preprocess), "evaluation")
    return np.concatenate([batch["x"] for batch in samples.batches(4)])


@pytest.mark.parametrize("suffix", [".png", ".tif", ".pgm"])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_images_are_scaled_to_0_255(tmp_path, suffix, channels):
    """A 16-bit grayscale image gives value / 257 (was: Pillow's convert clipped every pixel to 255; a 16-bit PGM,
    which Pillow opens as 32-bit "I" as it does a PNG, was then refused as 32-bit: a review's)."""
    wide = np.random.default_rng(0).integers(0, 65536, (8, 8)).astype(np.uint16)
    wide[0, :3] = (0, 257 * 100, 65535)
    Image.fromarray(wide).save(tmp_path / f"a{suffix}")
    assert Image.open(tmp_path / f"a{suffix}").mode.startswith("I")
    fed = _fed(tmp_path, channels)
    want = np.round(wide / 257).astype(np.float32)
    for channel in range(channels):
        np.testing.assert_array_equal(fed[0, channel], want)
    assert fed[0, 0, 0, :3].tolist() == [0, 100, 255]


def test_32_bit_integer_images_beyond_0_255_are_refused(tmp_path):
    Image.fromarray(np.full((8, 8), 70_000, np.int32)).save(tmp_path / "deep.tif")
    bad_data(lambda: _fed(tmp_path), "deep.tif", "32-bit", "[70000, 70000]")
    (tmp_path / "deep.tif").unlink()
    Image.fromarray(np.full((8, 8), 200, np.int32)).save(tmp_path / "small.tif")
    assert (_fed(tmp_path) == 200).all()


def _rgb_images(folder, count=2):
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.png")


@pytest.mark.parametrize("mean, std, problem", [((127.5,), (127.5,), "non-integer"),
                                                ((128.0,), (1.0,), "[-128, 127], beyond [0, 255]"),
                                                ((0.0,), (0.5,), "[0, 510], beyond [0, 255]")])
def test_mean_std_that_an_integer_input_cannot_hold_are_refused(tmp_path, mean, std, problem):
    """A uint8 image input with --mean/--std (was: the cast wrapped negative values and cut fractions to 0
    silently)."""
    _rgb_images(tmp_path)
    bad_data(lambda: _fed(tmp_path, 3, np.uint8, mean=mean, std=std), "--mean/--std", problem, "'x'", "uint8")


def test_integer_inputs_get_the_pixels_or_an_integer_shift_of_them(tmp_path):
    _rgb_images(tmp_path)
    raw = _fed(tmp_path, 3)
    as_uint8 = _fed(tmp_path, 3, np.uint8)
    assert as_uint8.dtype == np.uint8 and (as_uint8 == raw).all()
    shifted = _fed(tmp_path, 3, np.int8, mean=(128.0,))
    assert shifted.dtype == np.int8 and (shifted == raw - 128).all()


@pytest.mark.parametrize("header", [True, False])
def test_a_labels_csv_with_a_utf8_bom_is_read(tmp_path, header):
    """Excel's "CSV UTF-8" starts the file with a BOM (was: "image '\ufeff0.png' does not exist")."""
    _rgb_images(tmp_path)
    rows = ["file,label"] * header + ["0.png,1", "1.png,0"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")
    samples = open_samples(str(tmp_path), [InputSpec("x", [None, 3, 8, 8], np.dtype(np.float32))],
                           Preprocess(resize=8))
    assert samples.count == 2 and samples.labels.tolist() == [1, 0]


def test_raw_pixels_that_an_int8_input_cannot_hold_are_refused_with_the_shift_that_fits(tmp_path):
    """Without --mean/--std the message blamed them and said to leave them out (a review's): it now names the shift."""
    _rgb_images(tmp_path)
    bad_data(lambda: _fed(tmp_path, 3, np.int8), "0..255 do not fit", "int8", "--mean 128")
    assert _fed(tmp_path, 3, np.int8, mean=(128.0,)).dtype == np.int8


def test_an_empty_eval_class_folder_is_no_class(tmp_path):
    """An empty class folder in --eval named a class no sample has, and the set was refused for it (a review's)."""
    from msq_onnx.data import number_classes_like

    for folder, names in (("calib", ("cat", "dog")), ("eval", ("cat", "dog", "zz_empty"))):
        for name in names:
            (tmp_path / folder / name).mkdir(parents=True)
            if name != "zz_empty":
                _rgb_images(tmp_path / folder / name, 1)
    spec = [InputSpec("x", [None, 3, 8, 8], np.dtype(np.float32))]
    calib, evaluation = (open_samples(str(tmp_path / f), spec, Preprocess(resize=8), f) for f in ("calib", "eval"))
    number_classes_like(evaluation, calib)
    assert evaluation.labels.tolist() == [0, 1]


def test_images_in_subfolders_of_a_class_folder_are_that_class(tmp_path):
    """torchvision's ImageFolder takes every image under a class folder; here a class kept in subfolders gave none
    (2 of 42 images read, a hunting subagent's)."""
    for folder in ("cat", "dog/indoor", "dog/outdoor", "dog/.cache"):
        (tmp_path / folder).mkdir(parents=True)
        _rgb_images(tmp_path / folder, 2)
    spec = [InputSpec("x", [None, 3, 8, 8], np.dtype(np.float32))]
    samples = open_samples(str(tmp_path), spec, Preprocess(resize=8), "calibration")
    assert samples.labels.tolist() == [0, 0, 1, 1, 1, 1] and samples.class_names == ["cat", "dog"]


def test_linked_folders_inside_a_class_folder_are_read_and_a_loop_is_walked_once(tmp_path):
    """torchvision's ImageFolder follows linked folders; they were skipped (a review's). A link back up the tree
    must not walk forever or read an image twice, nor a link into another class label its images twice."""
    import os

    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "dog").mkdir()
    (tmp_path / "elsewhere").mkdir()
    _rgb_images(tmp_path / "data" / "cat", 1)
    _rgb_images(tmp_path / "data" / "dog", 1)
    _rgb_images(tmp_path / "elsewhere", 2)
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "dog" / "more")
    os.symlink(tmp_path / "data" / "dog", tmp_path / "data" / "dog" / "loop")
    # and links into another class or up to the data folder, which would count images under two labels
    os.symlink(tmp_path / "data" / "cat", tmp_path / "data" / "dog" / "also")
    os.symlink(tmp_path / "data", tmp_path / "data" / "cat" / "up")
    spec = [InputSpec("x", [None, 3, 8, 8], np.dtype(np.float32))]
    samples = open_samples(str(tmp_path / "data"), spec, Preprocess(resize=8), "calibration")
    assert samples.labels.tolist() == [0, 1, 1, 1]


def test_a_four_channel_input_gets_rgba_and_other_counts_are_refused(tmp_path):
    """A 4-channel (RGBA) image model was fed RGB, and ONNX Runtime refused the run with its own message (the data
    hunt's); a 2-channel one gets one line saying what image files give."""
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    fed = open_samples(str(tmp_path), [InputSpec("x", [None, 4, 8, 8], np.dtype(np.float32))], Preprocess(resize=8),
                       "evaluation")
    np.testing.assert_array_equal(next(fed.batches(1))["x"][0], rgba.transpose(2, 0, 1).astype(np.float32))
    bgra = open_samples(str(tmp_path), [InputSpec("x", [None, 4, 8, 8], np.dtype(np.float32))],
                        Preprocess(resize=8, channel_order="bgr"), "evaluation")  # was ignored for 4 channels
    np.testing.assert_array_equal(next(bgra.batches(1))["x"][0], rgba[..., [2, 1, 0, 3]].transpose(2, 0, 1))
    bad_data(lambda: open_samples(str(tmp_path), [InputSpec("x", [None, 2, 8, 8], np.dtype(np.float32))],
                                  Preprocess(resize=8), "evaluation"), "1 (gray), 3 (RGB) or 4 (RGBA)", "takes 2")
