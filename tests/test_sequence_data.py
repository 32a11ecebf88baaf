"""Sequence data for transformer-style models: text files through a tokenizer, per-sample .npz of
different lengths, and onnxruntime CalibrationDataReaders. The tokenizer is built here with the
`tokenizers` library itself; only the last test reads ../shared, and skips without it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from conftest import ROOT, bad_data
from msq_onnx.data import Preprocess, from_data_reader, open_samples, pad_and_stack, split_holdout
from msq_onnx.load import InputSpec

# [PAD] is not 0, so a batch padded with 0 instead of the tokenizer's pad id is caught.
VOCAB = {"[UNK]": 0, "[PAD]": 1, "[CLS]": 2, "[SEP]": 3, "good": 4, "bad": 5, "movie": 6, "film": 7, "very": 8,
         "a": 9}
CLS, SEP, PAD = 2, 3, 1
ROWS = [("good movie", "pos"), ("bad film very bad", "neg"), ("a good film", "pos")]
IDS = [[CLS, 4, 6, SEP], [CLS, 5, 7, 8, 5, SEP], [CLS, 9, 4, 7, SEP]]
INT64 = np.dtype(np.int64)


def make_tokenizer(path, truncation: int | None = None, padding: dict | None = None) -> str:
    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    if truncation:
        tokenizer.enable_truncation(max_length=truncation)
    if padding:
        tokenizer.enable_padding(**padding)
    tokenizer.save(str(path))
    return str(path)


def specs(length=None, names=("input_ids", "attention_mask", "token_type_ids"), dtype=INT64):
    return [InputSpec(name, [None, length], dtype) for name in names]


@pytest.fixture
def tok(tmp_path):
    return make_tokenizer(tmp_path / "tokenizer.json")


def write_table(path, rows, delimiter, header=("id", "text", "label")):
    lines = [delimiter.join(header)] + [delimiter.join((str(i), text, label)) for i, (text, label) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def write_data(tmp_path, fmt, rows=ROWS):
    path = tmp_path / f"data.{fmt}"
    if fmt in ("tsv", "csv"):
        return write_table(path, rows, "\t" if fmt == "tsv" else ",")
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows), encoding="utf-8")
    else:
        path.write_text("".join(t + "\n\n" for t, _ in rows), encoding="utf-8")  # blank lines are skipped
    return str(path)


def open_text(path, tok, inputs=None, **options):
    return open_samples(path, inputs or specs(), Preprocess(tokenizer=tok, **options), "evaluation")


def all_rows(samples, batch_size):
    return [batch for batch in samples.batches(batch_size)]


# --------------------------------------------------------------------------- text formats


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "txt"])
def test_text_formats_tokenize_map_and_label(tmp_path, tok, fmt):
    samples = open_text(write_data(tmp_path, fmt), tok)
    assert samples.count == 3 and samples.source.endswith(fmt)
    if fmt == "txt":
        assert samples.labels is None and samples.class_names is None
    else:
        assert samples.class_names == ["neg", "pos"]
        assert samples.labels.tolist() == [1, 0, 1] and samples.labels.dtype == np.int64
    (batch,) = all_rows(samples, 8)
    assert sorted(batch) == ["attention_mask", "input_ids", "token_type_ids"]
    assert all(v.dtype == np.int64 and v.shape == (3, 6) for v in batch.values())
    for row, ids in enumerate(IDS):
        assert batch["input_ids"][row].tolist() == ids + [PAD] * (6 - len(ids))
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (6 - len(ids))
    assert not batch["token_type_ids"].any()


def test_integer_labels_are_used_as_they_are(tmp_path, tok):
    path = write_table(tmp_path / "d.tsv", [("good", "2"), ("bad", "0"), ("film", " 7 ")], "\t")
    samples = open_text(path, tok)
    assert samples.labels.tolist() == [2, 0, 7] and samples.class_names is None
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "good", "label": 3}\n{"text": "bad", "label": 1}\n')
    assert open_text(str(jsonl), tok).labels.tolist() == [3, 1]


def test_columns_are_chosen_by_name_and_default_label_may_be_missing(tmp_path, tok):
    path = write_table(tmp_path / "d.tsv", [(t, s) for t, s in ROWS], "\t", header=("n", "body", "section"))
    samples = open_text(path, tok, text_column="body", label_column="section")
    assert samples.class_names == ["neg", "pos"] and samples.labels.tolist() == [1, 0, 1]
    unlabelled = open_text(path, tok, text_column="body")  # no 'label' column: unlabelled, not an error
    assert unlabelled.labels is None and unlabelled.count == 3


def test_tsv_quoting_like_the_debian_descriptions(tmp_path, tok):
    path = tmp_path / "d.tsv"
    path.write_text('package\tsection\ttext\n'
                    'a\tvcs\t"takes a ""recipe"" and\tmore"\n'
                    'b\tadmin\tgood film\n'
                    'c\tvcs\t"over\ntwo lines"\n', encoding="utf-8")
    samples = open_text(str(path), tok, label_column="section")
    assert samples.count == 3 and samples.class_names == ["admin", "vcs"]
    assert samples.labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize("closed_by", ["end of file", "a later quote"])
def test_a_tsv_text_opening_with_an_unclosed_quote_keeps_its_quote_and_the_rows_after_it(tmp_path, tok, closed_by):
    """An OCR line such as '"I've never forgotten that mo-' took the rows after it into itself, up to the next
    '"' (silently) or the end of the file ("the row has 1 fields"); such a TSV is read with literal quotes."""
    path = tmp_path / "d.tsv"
    later = 'a "good" film\tpos\n' if closed_by == "a later quote" else ""
    path.write_text('text\tlabel\ngood movie\tpos\n"bad film\tneg\nvery bad\tneg\n' + later + "a film\tpos\n",
                    encoding="utf-8")
    samples = open_text(str(path), tok)
    assert samples.count == 4 + bool(later) and samples.labels.tolist() == [1, 0, 0] + [1] * bool(later) + [1]
    (batch,) = all_rows(samples, 8)
    assert batch["input_ids"][1].tolist()[:5] == [CLS, 0, 5, 7, SEP]  # the quote is a token of its own: [UNK]
    assert batch["input_ids"][2].tolist()[:4] == [CLS, 8, 5, SEP]


def test_a_one_column_tsv_with_an_unclosed_quote_and_a_quoted_field_of_tabbed_lines(tmp_path, tok):
    """The tabs check could not see a runaway quote in a one-column TSV (five rows read as two texts), and it took
    a quoted field whose lines start with tabs (code) for one, then refused the file read without quoting (a
    review's). The csv module's strict errors tell a quote that never closes; the quoted field reads as before."""
    path = tmp_path / "one.tsv"
    path.write_text('text\n"bad film\ngood movie\na "good" film\nfilm\n', encoding="utf-8")
    assert open_text(str(path), tok).count == 4
    path = tmp_path / "code.tsv"
    path.write_text('text\tlabel\n"good\n\tfilm"\tpos\nbad\tneg\n', encoding="utf-8")
    samples = open_text(str(path), tok)
    assert samples.count == 2 and samples.labels.tolist() == [1, 0]


def test_long_fields_pass_the_csv_field_limit(tmp_path, tok):
    text = " ".join(["good"] * 100_000)  # 500 kB, past csv's default 128 KiB field limit
    path = write_table(tmp_path / "d.tsv", [(text, "pos"), ("bad", "neg")], "\t")
    assert open_text(path, tok).count == 2


def test_a_csv_without_tokenizer_stays_an_image_list(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("file,label\nmissing.png,0\n")
    inputs = [InputSpec("x", [None, 1, 8, 8], np.dtype(np.float32))]
    bad_data(lambda: open_samples(str(path), inputs, Preprocess(), "evaluation"), "image 'missing.png' does not exist")


# --------------------------------------------------------------------------- classes across --calib and --eval


def _held_out_with(calib_path, eval_path, inputs, preprocess):
    """pipeline._held_out on a stand-in model whose task output has 3 classes."""
    from types import SimpleNamespace

    from onnx import TensorProto, helper

    from msq_onnx.pipeline import Options, _held_out

    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    loaded = SimpleNamespace(inputs=inputs, model=helper.make_model(graph), output_name="logits")
    options = Options(eval_path=eval_path, preprocess=preprocess)
    return _held_out(open_samples(calib_path, inputs, preprocess), loaded, options)


def _class_folders(folder, classes, per_class=2):
    from PIL import Image

    for cls in classes:
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8), "RGB").save(folder / cls / f"{i}.png")
    return str(folder)


@pytest.mark.parametrize("kind", ["text", "images"])
def test_eval_classes_are_numbered_by_the_calibration_sets_names(tmp_path, tok, kind):
    """An --eval set without the calibration set's middle class: 'pos' is still class 2, not 1 (was: each set
    numbered its own names, and every 'pos' sample was scored against the 'neutral' output)."""
    if kind == "text":
        calib = write_table(tmp_path / "calib.tsv", [("good", "pos"), ("film", "neutral"), ("bad", "neg")] * 2, "\t")
        evaluation = write_table(tmp_path / "eval.tsv", [("good", "pos"), ("bad", "neg"), ("a good film", "pos")],
                                 "\t")
        inputs, pre, want = specs(), Preprocess(tokenizer=tok), [2, 0, 2]
    else:
        calib = _class_folders(tmp_path / "calib", ("neg", "neutral", "pos"))
        evaluation = _class_folders(tmp_path / "eval", ("neg", "pos"))
        inputs, pre, want = [InputSpec("x", [None, 3, 8, 8], np.dtype(np.float32))], Preprocess(), [0, 0, 2, 2]
    calib_set, eval_set = _held_out_with(calib, evaluation, inputs, pre)
    assert calib_set.class_names == ["neg", "neutral", "pos"]
    assert eval_set.labels.tolist() == want and eval_set.class_names == ["neg", "neutral", "pos"]


def test_an_eval_class_the_calibration_set_lacks_is_refused(tmp_path, tok):
    calib = write_table(tmp_path / "calib.tsv", [("good", "pos"), ("bad", "neg")] * 2, "\t")
    evaluation = write_table(tmp_path / "eval.tsv", [("good", "pos"), ("film", "neutral")], "\t")
    bad_data(lambda: _held_out_with(calib, evaluation, specs(), Preprocess(tokenizer=tok)),
             "'neutral'", "calibration data", "eval.tsv")


# --------------------------------------------------------------------------- padding and lengths


def test_batches_pad_right_to_their_own_longest(tmp_path, tok):
    inputs = specs(names=("input_ids", "attention_mask", "token_type_ids", "position_ids"), dtype=np.dtype(np.int32))
    samples = open_text(write_data(tmp_path, "jsonl"), tok, inputs)
    first, second = all_rows(samples, 2)
    assert first["input_ids"].dtype == np.int32 and first["input_ids"].shape == (2, 6)
    assert first["input_ids"].tolist() == [IDS[0] + [PAD, PAD], IDS[1]]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert first["position_ids"][1].tolist() == list(range(6))
    assert second["input_ids"].tolist() == [IDS[2]]  # not padded to the first batch's length
    assert second["attention_mask"].tolist() == [[1] * 5]


def test_fixed_sequence_axis_is_padded_to(tmp_path, tok):
    samples = open_text(write_data(tmp_path, "tsv"), tok, specs(length=8))
    for batch in samples.batches(2):
        assert all(v.shape[1] == 8 for v in batch.values())
    (batch,) = all_rows(samples, 3)
    assert batch["input_ids"][0].tolist() == IDS[0] + [PAD] * 4
    assert batch["attention_mask"].sum(axis=1).tolist() == [4, 6, 5]


def test_text_longer_than_fixed_axis_is_refused_unless_truncated(tmp_path, tok):
    path = write_data(tmp_path, "tsv")
    bad_data(lambda: open_text(path, tok, specs(length=5)), f"{path}:3", "6 tokens", "length 5", "truncation")
    truncating = make_tokenizer(tmp_path / "trunc.json", truncation=5)
    (batch,) = all_rows(open_text(path, truncating, specs(length=5)), 3)
    assert batch["input_ids"][1].tolist() == [CLS, 5, 7, 8, SEP]


def test_tokenizer_padding_is_off_but_its_pad_id_is_used(tmp_path):
    tok = make_tokenizer(tmp_path / "pad.json", padding={"length": 16, "pad_id": 9, "pad_token": "a"})
    (batch,) = all_rows(open_text(write_data(tmp_path, "txt"), tok), 3)
    assert batch["input_ids"].shape == (3, 6)  # the longest text, not the tokenizer's 16
    assert batch["input_ids"][0].tolist() == IDS[0] + [9, 9]


# --------------------------------------------------------------------------- errors


def test_bad_tokenizer_files(tmp_path):
    data = write_data(tmp_path, "tsv")
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text('{"model": 3}')
    bad_data(lambda: open_text(data, str(garbage)), "does not load", "tokenizer.json")
    bad_data(lambda: open_text(data, str(tmp_path / "none.json")), "does not exist", "--tokenizer")
    bad_data(lambda: open_samples(data, specs(), Preprocess(), "calibration"), "--tokenizer")


def test_missing_text_column_names_the_columns(tmp_path, tok):
    path = write_table(tmp_path / "d.tsv", ROWS, "\t", header=("id", "sentence", "label"))
    bad_data(lambda: open_text(path, tok), "'text'", "id, sentence, label", "--text-column")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"sentence": "good"}\n')
    bad_data(lambda: open_text(str(jsonl), tok), f"{jsonl}:1", "sentence", "--text-column")


def test_named_label_column_must_exist(tmp_path, tok):
    bad_data(lambda: open_text(write_data(tmp_path, "tsv"), tok, label_column="section"), "'section'",
             "--label-column")
    bad_data(lambda: open_text(write_data(tmp_path, "jsonl"), tok, label_column="section"), "'section'",
             "--label-column")


@pytest.mark.parametrize("content", ["", "\n\n", "id\ttext\tlabel\n"])
def test_empty_text_files(tmp_path, tok, content):
    for suffix in ("tsv", "jsonl", "txt"):
        if suffix != "tsv" and content.startswith("id"):
            continue
        path = tmp_path / f"empty.{suffix}"
        path.write_text(content)
        bad_data(lambda: open_text(str(path), tok), "holds no texts")


def test_broken_rows(tmp_path, tok):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "good", "label": "pos"}\n{"text": "bad"\n')
    bad_data(lambda: open_text(str(jsonl), tok), f"{jsonl}:2", "JSON")
    jsonl.write_text('{"text": "good", "label": "pos"}\n{"text": "bad"}\n')
    bad_data(lambda: open_text(str(jsonl), tok), f"{jsonl}:2", "label every line or none")
    jsonl.write_text('{"text": "good", "label": 1.5}\n')
    bad_data(lambda: open_text(str(jsonl), tok), "neither a class index nor a class name")
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tlabel\ngood\tpos\nbad\n")
    bad_data(lambda: open_text(str(tsv), tok), f"{tsv}:3", "fields")
    tsv.write_text("text\tlabel\ngood\tpos\nbad\t\n")
    bad_data(lambda: open_text(str(tsv), tok), f"{tsv}:3", "empty")
    tsv.write_bytes(b"text\n\xff\xfe\n")
    bad_data(lambda: open_text(str(tsv), tok), "UTF-8")


def test_model_inputs_the_tokenizer_cannot_feed(tmp_path, tok):
    path = write_data(tmp_path, "txt")
    inputs = specs() + [InputSpec("pixel_values", [None, 3, 8, 8], np.dtype(np.float32))]
    bad_data(lambda: open_text(path, tok, inputs), "'pixel_values'", ".npz")
    bad_data(lambda: open_text(path, tok, specs(names=("attention_mask",))), "token ids")
    bad_data(lambda: open_text(path, tok, [InputSpec("input_ids", [None, 4, 4], INT64)]), "rank 3")


# --------------------------------------------------------------------------- per-sample .npz


def test_npz_folder_of_different_lengths_batches_padded(tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    lengths = [5, 7, 3, 4]
    for index, length in enumerate(lengths):
        ids = np.arange(1, length + 1, dtype=np.int64)[None]
        np.savez(folder / f"{index:03d}.npz", input_ids=ids, attention_mask=np.ones_like(ids),
                 labels=np.array([index % 2]))
    extra = np.full((2, 6), 7, np.int64)  # a file holding two samples is split across batches
    np.savez(folder / "004.npz", input_ids=extra, attention_mask=np.ones_like(extra), labels=np.array([0, 1]))
    inputs = specs(names=("input_ids", "attention_mask"))
    samples = open_samples(str(folder), inputs, Preprocess(), "calibration")
    assert samples.count == 6 and samples.labels.tolist() == [0, 1, 0, 1, 0, 1]
    batches = all_rows(samples, 2)
    assert [b["input_ids"].shape for b in batches] == [(2, 7), (2, 4), (2, 6)]
    assert batches[0]["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 0, 0]
    assert batches[0]["attention_mask"].tolist() == [[1] * 5 + [0, 0], [1] * 7]
    assert batches[1]["attention_mask"].sum(axis=1).tolist() == [3, 4]
    held_in, held_out = split_holdout(samples, 0.5)  # the subset merges what it keeps (0, 2, 4): padded too
    kept = all_rows(held_in, 3)
    assert [b["input_ids"].shape for b in kept] == [(3, 7)]  # sample 0 came padded to 7 in its parent batch
    assert kept[0]["attention_mask"].sum(axis=1).tolist() == [5, 3, 6]
    assert held_out.count == 3


def test_npz_inputs_with_different_sequence_lengths_are_refused(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, input_ids=np.ones((3, 12), np.int64), attention_mask=np.ones((3, 10), np.int64))
    inputs = specs(names=("input_ids", "attention_mask"))
    bad_data(lambda: open_samples(str(path), inputs, Preprocess(), "calibration"),
             "sequence lengths differ between inputs", "input_ids 12", "attention_mask 10", "pad them to one length")


@pytest.mark.parametrize("axes, refused", [(("Q", "K"), False), (("T", "T"), True), (("Q", None), True),
                                           (("query_dynamic_axes_1", "memory_dynamic_axes_2"), True),
                                           (("unk__3", "unk__4"), True)],
                         ids=["named-apart", "one-name", "one-unnamed", "torch-made-up", "tf2onnx-made-up"])
def test_only_inputs_the_model_may_give_one_sequence_axis_must_agree(tmp_path, axes, refused):
    """Query [N, Q, 4] and memory [N, K, 4] of a cross-attention model differ in length by design (was: refused,
    every dynamic axis 1 taken for one); a shared name, an unnamed axis or a name an exporter made up per input
    still refuse different lengths."""
    path = tmp_path / "d.npz"
    np.savez(path, query=np.ones((3, 5, 4), np.float32), memory=np.ones((3, 9, 4), np.float32))
    inputs = [InputSpec(name, [None, None, 4], np.dtype(np.float32), ["N", axis, None])
              for name, axis in zip(("query", "memory"), axes)]
    if refused:
        bad_data(lambda: open_samples(str(path), inputs, Preprocess(), "calibration"),
                 "sequence lengths differ", "query 5", "memory 9")
    else:
        samples = open_samples(str(path), inputs, Preprocess(), "calibration")
        (batch,) = all_rows(samples, 8)
        assert batch["query"].shape == (3, 5, 4) and batch["memory"].shape == (3, 9, 4)


def test_pad_and_stack():
    feeds = [{"ids": np.array([[4, 5]]), "y": np.array([1])}, {"ids": np.array([[6, 7, 8], [9, 9, 9]]),
                                                               "y": np.array([2, 3])}]
    merged = pad_and_stack(feeds, {"ids": -1})
    assert merged["ids"].tolist() == [[4, 5, -1], [6, 7, 8], [9, 9, 9]] and merged["y"].tolist() == [1, 2, 3]
    assert pad_and_stack(feeds[:1], length=4)["ids"].tolist() == [[4, 5, 0, 0]]


# --------------------------------------------------------------------------- CalibrationDataReader


def reader_of(feeds):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.pending = iter(feeds)

        def get_next(self):
            return next(self.pending, None)

    return Reader()


def test_data_reader_round_trip():
    rng = np.random.default_rng(0)
    feeds = []
    for count, length in [(1, 4), (3, 6), (2, 2)]:
        ids = rng.integers(1, 50, (count, length))
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    inputs = specs(names=("input_ids", "attention_mask"), dtype=np.dtype(np.int32))
    samples = from_data_reader(reader_of(feeds), inputs)
    assert samples.count == 6 and samples.labels is None and samples.source == "CalibrationDataReader"
    (batch,) = all_rows(samples, 6)
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (6, 6)
    assert batch["attention_mask"].sum(axis=1).tolist() == [4, 6, 6, 6, 2, 2]
    row = 0
    for feed in feeds:
        count, length = feed["input_ids"].shape
        assert np.array_equal(batch["input_ids"][row:row + count, :length], feed["input_ids"])
        assert not batch["input_ids"][row:row + count, length:].any()
        row += count
    assert [len(b["input_ids"]) for b in samples.batches(4)] == [4, 2]


def test_data_reader_errors():
    inputs = specs(names=("input_ids", "attention_mask"))
    ids = np.ones((2, 5), np.int64)
    bad_data(lambda: from_data_reader(reader_of([]), inputs), "gave no samples")
    bad_data(lambda: from_data_reader(object(), inputs), "get_next()")
    bad_data(lambda: from_data_reader(reader_of([{"input_ids": ids}]), inputs), "feed 1", "attention_mask")
    bad_data(lambda: from_data_reader(reader_of([{"input_ids": ids, "attention_mask": ids}, [ids]]), inputs),
             "feed 2", "dict")
    bad_data(lambda: from_data_reader(reader_of([{"input_ids": ids[0], "attention_mask": ids[0]}]), inputs),
             "shape [5]")
    bad_data(lambda: from_data_reader(reader_of([{"input_ids": ids, "attention_mask": ids[:, :3]}]), inputs),
             "sequence lengths differ")
    bad_data(lambda: from_data_reader(reader_of([{"input_ids": ids * 0.5, "attention_mask": ids}]), inputs),
             "non-integer")


# --------------------------------------------------------------------------- the real Debian set


DEBIAN = os.path.join(os.environ.get("MSQ_SHARED", os.path.join(os.path.dirname(ROOT), "shared")),
                      "data", "debian-descriptions", "descriptions.tsv")


@pytest.mark.skipif(not os.path.isfile(DEBIAN), reason="../shared is not here")
def test_debian_descriptions_parse(tmp_path, tok):
    samples = open_text(DEBIAN, tok, specs(), label_column="section")
    assert samples.count == 2714 and len(samples.class_names) == 19
    assert sorted(np.unique(samples.labels).tolist()) == list(range(19))


def test_held_out_images_are_decoded_once_and_read_back_the_same(tmp_path, monkeypatch):
    """keep_decoded: the held-out images are read for the FP32 reference and again for each candidate; their
    crops are kept once decoded (within KEPT_PIXELS_BYTES), the calibration images are not, and the feeds equal
    those of a set that decodes every time."""
    from PIL import Image

    from msq_onnx import data

    rng = np.random.default_rng(0)
    rows = ["file,label"]
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), "RGB").save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{i % 2}")
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    spec = InputSpec("x", [None, 3, 16, 16], np.dtype(np.float32))
    pre = Preprocess(mean=(127.0,), std=(128.0,))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open",
                        lambda path, *a, **k: opened.append(os.path.basename(path)) or real_open(path, *a, **k))

    calib, held = split_holdout(open_samples(str(tmp_path / "set.csv"), [spec], pre), 0.2)
    held.keep_decoded()
    first, second = list(held.batches(1)), list(held.batches(1))
    assert sorted(opened) == ["4.png", "9.png"]  # every 5th, decoded once for two reads
    list(calib.batches(1)), list(calib.batches(1))
    assert len(opened) == 2 + 2 * 8  # the calibration images are not kept
    fresh = list(split_holdout(open_samples(str(tmp_path / "set.csv"), [spec], pre), 0.2)[1].batches(1))
    for a, b, c in zip(first, second, fresh):
        np.testing.assert_array_equal(a["x"], c["x"])
        np.testing.assert_array_equal(b["x"], c["x"])
    monkeypatch.setattr(data, "KEPT_PIXELS_BYTES", 16 * 16 * 3)  # room for one crop
    opened.clear()
    _, held = split_holdout(open_samples(str(tmp_path / "set.csv"), [spec], pre), 0.2)
    held.keep_decoded()
    list(held.batches(1)), list(held.batches(1))
    assert opened == ["4.png", "9.png", "9.png"]
