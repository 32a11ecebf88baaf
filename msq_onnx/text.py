"""Text samples for transformer-style models, tokenized with a HF tokenizer.json.

Formats:
  * .tsv and .csv with a header row, CSV quoting (a quoted field may hold tabs,
    commas, doubled quotes and newlines). A TSV whose quoting would take
    whole rows into one field (a text that opens with a '"' it never closes)
    is read with its quotes as text, as plain TSV has no quoting;
  * .jsonl, one JSON object per line;
  * .txt, one text per line (blank lines skipped), no columns and no labels.
Texts come from the --text-column column or key, labels from --label-column:
integers are class indices as they are, names become indices in sorted order
(kept in ``class_names``; an --eval set's names take the calibration set's
indices: data.number_classes_like). A missing default ``label`` column means
no labels.

Model inputs are fed by name: token ids, attention mask, token type ids and
position ids. Texts are tokenized once, up front, so a text too long for a
fixed sequence axis is refused before any work starts; each sample is kept
unpadded and every batch is right-padded to its longest sample (or to the
fixed length) with the tokenizer's pad id and mask 0.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from .data import DEFAULT_LABEL_COLUMN, SampleSet, _parse_int_labels, pad_and_stack
from .errors import BadData, one_line

TEXT_SUFFIXES = (".tsv", ".csv", ".jsonl", ".txt")
_FIELD_LIMIT = 1 << 28  # csv's default of 128 KiB per field is shorter than some real descriptions
_PAD_TOKENS = ("[PAD]", "<pad>")
_ROLE_NAMES = "input_ids, attention_mask, token_type_ids, position_ids"


def _token_role(name: str) -> str | None:
    """Which tokenizer output feeds a model input, from the input's name (None: none does)."""
    low = name.lower()
    if "input_ids" in low or low in ("input", "ids"):
        return "ids"
    if "mask" in low:  # attention_mask, and input_mask of older BERT exports
        return "mask"
    if "token_type" in low or "segment" in low:
        return "type"
    if "position_ids" in low:
        return "position"
    return None


def _input_roles(inputs) -> dict:
    roles = {}
    for spec in inputs:
        role = _token_role(spec.name)
        if role is None:
            raise BadData(f"model input '{spec.name}' takes nothing a tokenizer gives (known: {_ROLE_NAMES}); "
                          "give the samples as .npz with one array per input.")
        if len(spec.shape) != 2:
            raise BadData(f"model input '{spec.name}' has rank {len(spec.shape)}, text feeds [batch, sequence] "
                          "inputs; give the samples as .npz with one array per input.")
        roles[spec.name] = role
    if "ids" not in roles.values():
        raise BadData(f"none of the model's inputs {list(roles)} takes token ids (a name with 'input_ids'); "
                      "give the samples as .npz with one array per input.")
    return roles


def _fixed_length(inputs) -> int | None:
    lengths = sorted({spec.shape[1] for spec in inputs if spec.shape[1] is not None})
    if len(lengths) > 1:
        raise BadData(f"the model's inputs fix different sequence lengths {lengths}; give the samples as .npz "
                      "with one array per input.")
    return lengths[0] if lengths else None


def load_tokenizer(path: str):
    """A tokenizers.Tokenizer from a HF tokenizer.json, or BadData."""
    if not path or not os.path.isfile(path):
        raise BadData(f"tokenizer file '{path}' does not exist; give the model's HF tokenizer.json with "
                      "--tokenizer.")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # pyo3 raises a Rust panic as PanicException, which is not an Exception
        raise BadData(f"tokenizer file '{path}' does not load ({one_line(exc, 200)}); give a HF tokenizer.json.") \
            from None


def _missing_label_column(path: str, label_column: str) -> None:
    """A missing default label column means unlabelled data; a missing column the user named is an error."""
    if label_column != DEFAULT_LABEL_COLUMN:
        raise BadData(f"{path} has no '{label_column}' label column; fix --label-column, or leave it out for "
                      "unlabelled data.")


def _strict_rows(reader):
    """The rows of a strict csv.reader, its errors (a quote open at the end of the file, or closed before other
    characters than a tab: a text's own quote taken for CSV quoting) as _RunawayQuote. Unlike the tabs check, this
    holds for a one-column file."""
    try:
        yield from reader
    except csv.Error:
        raise _RunawayQuote(certain=True) from None


class _RunawayQuote(Exception):
    def __init__(self, certain: bool):
        super().__init__()
        self.certain = certain  # the csv module's own error, not the tabs check's guess


def _read_table(path: str, delimiter: str, text_column: str, label_column: str):
    csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
    try:
        return _read_rows(path, delimiter, text_column, label_column, csv.QUOTE_MINIMAL)
    except _RunawayQuote as runaway:
        # OCR lines, subtitles, ...: a text that starts with a quote it does not close. Plain TSV has no quoting
        # (IANA text/tab-separated-values), and CSV quoting would take the rows up to the next '"' into that text.
        try:
            return _read_rows(path, delimiter, text_column, label_column, csv.QUOTE_NONE)
        except BadData:
            if runaway.certain:
                raise
        # Read without quoting, the rows do not hold together either: the quoted lines with tabs were a field's own
        # (a code snippet), as a review's file had them
        return _read_rows(path, delimiter, text_column, label_column, csv.QUOTE_MINIMAL, check=False)


def _read_rows(path: str, delimiter: str, text_column: str, label_column: str, quoting: int, check: bool = True):
    """check (TSV): a quote that never closes, or a quoted field whose lines hold whole rows, raises _RunawayQuote."""
    texts, wheres, labels = [], [], []
    check = check and delimiter == "\t" and quoting != csv.QUOTE_NONE
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting, strict=check)
        rows = _strict_rows(reader)
        header = next((row for row in rows if any(field.strip() for field in row)), None)
        if header is None:
            return texts, wheres, None
        header = [name.strip() for name in header]
        if text_column not in header:
            raise BadData(f"{path} has no '{text_column}' column (its columns: {', '.join(header)[:200]}); "
                          "name the text column with --text-column.")
        text_at = header.index(text_column)
        label_at = header.index(label_column) if label_column in header else None
        if label_at is None:
            _missing_label_column(path, label_column)
        needed = max(text_at, label_at or 0) + 1
        end = reader.line_num
        for row in rows:
            start, end = end + 1, reader.line_num
            if not any(field.strip() for field in row):
                continue
            if check and end > start and len(header) > 1 and _holds_rows(row, len(header)):
                raise _RunawayQuote(certain=False)
            where = f"{path}:{reader.line_num}"
            if len(row) < needed:
                separator = "tabs" if delimiter == "\t" else "commas"
                raise BadData(f"{where}: the row has {len(row)} fields, the header {len(header)}; fix the row "
                              f"(fields are separated by {separator}).")
            texts.append(row[text_at])
            wheres.append(where)
            if label_at is not None:
                labels.append(row[label_at])
    return texts, wheres, labels if label_at is not None else None


def _holds_rows(row: list, columns: int) -> bool:
    """Whether a quoted field spanning lines took whole rows into itself: one of its later lines holds a row's
    tabs. A text's own line breaks rarely come with tabs (CSV prose has commas everywhere: only TSV is checked)."""
    return any(line.count("\t") >= columns - 1 for field in row for line in field.split("\n")[1:])


def _read_jsonl(path: str, text_column: str, label_column: str):
    texts, wheres, labels = [], [], []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise BadData(f"{where}: not valid JSON ({one_line(exc, 120)}); write one JSON object per line.") \
                    from None
            if not isinstance(row, dict):
                raise BadData(f"{where}: a JSON {type(row).__name__}, not an object; write one object per line, "
                              f'e.g. {{"{text_column}": "...", "{label_column}": ...}}.')
            if text_column not in row:
                raise BadData(f"{where}: no '{text_column}' key (its keys: {', '.join(map(str, row))[:200]}); name "
                              "the text key with --text-column.")
            if not isinstance(row[text_column], str):
                raise BadData(f"{where}: '{text_column}' is not a string; give each text as a JSON string.")
            texts.append(row[text_column])
            wheres.append(where)
            labels.append(row.get(label_column))  # None: no label on this line
    present = [label is not None for label in labels]
    if not any(present):
        if texts:
            _missing_label_column(path, label_column)
        return texts, wheres, None
    if not all(present):
        where = wheres[present.index(False)]
        raise BadData(f"{where}: no '{label_column}' while other lines have one; label every line or none.")
    return texts, wheres, labels


def _read_lines(path: str):
    texts, wheres = [], []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                texts.append(line.strip())
                wheres.append(f"{path}:{number}")
    return texts, wheres, None


def read_texts(path: str, text_column: str = "text", label_column: str = DEFAULT_LABEL_COLUMN):
    """(texts, where each came from as 'path:line', raw labels or None) from a .tsv/.csv/.jsonl/.txt file."""
    suffix = os.path.splitext(path.lower())[1]
    try:
        if suffix in (".tsv", ".csv"):
            return _read_table(path, "\t" if suffix == ".tsv" else ",", text_column, label_column)
        if suffix == ".jsonl":
            return _read_jsonl(path, text_column, label_column)
        return _read_lines(path)
    except UnicodeDecodeError:
        raise BadData(f"{path} is not UTF-8 text; save it as UTF-8.") from None
    except csv.Error as exc:
        raise BadData(f"{path} is not a readable {suffix[1:].upper()} ({one_line(exc, 200)}); check its quoting.") \
            from None
    except OSError as exc:
        raise BadData(f"cannot read {path} ({type(exc).__name__}); check the file.") from None


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def class_labels(raw: list, wheres: list[str], path: str, label_column: str):
    """(int64 labels, class names or None): integers as they are, names as indices in sorted order."""
    names = []
    for value, where in zip(raw, wheres):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise BadData(f"{where}: label {json.dumps(value)[:60]} is neither a class index nor a class name; "
                          "give an integer or a string.")
        name = str(value).strip()
        if not name:
            raise BadData(f"{where}: the '{label_column}' field is empty; label every row or drop the column.")
        names.append(name)
    if all(_is_int(name) for name in names):
        return _parse_int_labels(names, path), None
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[name] for name in names], dtype=np.int64), classes


class TextSamples(SampleSet):
    """Rows of a text file, tokenized up front and padded batch by batch."""

    held_in_memory = True

    def __init__(self, path: str, inputs, preprocess, role: str = "calibration"):
        if os.path.splitext(path.lower())[1] not in TEXT_SUFFIXES:
            raise BadData(f"{role} data '{path}' is not a text file; give .tsv, .csv, .jsonl or .txt (or .npz).")
        if not preprocess.tokenizer:  # before the inputs: an image model given a .txt by mistake lands here too
            raise BadData(f"{role} data '{path}' is text (not .npz, images or a labels.csv), which needs the "
                          "model's tokenizer.json: pass --tokenizer.")
        self.inputs = inputs
        self.roles = _input_roles(inputs)
        self.length = _fixed_length(inputs)
        tokenizer = load_tokenizer(preprocess.tokenizer)
        texts, wheres, raw = read_texts(path, preprocess.text_column, preprocess.label_column)
        if not texts:
            raise BadData(f"{role} data '{path}' holds no texts; add rows.")
        labels, class_names = (None, None) if raw is None else class_labels(raw, wheres, path,
                                                                             preprocess.label_column)
        super().__init__(len(texts), labels, path)
        self.class_names = class_names
        self.pad_values = self._pad_values(tokenizer)
        self.rows = self._encode(tokenizer, preprocess.tokenizer, texts, wheres)

    def _pad_values(self, tokenizer) -> dict:
        padding = tokenizer.padding
        if padding:
            pad_id, pad_type_id = padding["pad_id"], padding["pad_type_id"]
        else:
            ids = [tokenizer.token_to_id(token) for token in _PAD_TOKENS]
            pad_id, pad_type_id = next((i for i in ids if i is not None), 0), 0
        by_role = {"ids": pad_id, "type": pad_type_id}
        return {name: by_role.get(role, 0) for name, role in self.roles.items()}

    def _encode(self, tokenizer, tokenizer_path: str, texts: list[str], wheres: list[str]) -> list[dict]:
        tokenizer.no_padding()  # its truncation stays; padding is per batch, ours
        try:
            encodings = tokenizer.encode_batch(texts)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except BaseException as exc:  # PanicException too, see load_tokenizer
            raise BadData(f"tokenizer '{tokenizer_path}' cannot encode {self.source} ({one_line(exc, 200)}); give "
                          "the model's own tokenizer.json.") from None
        rows = []
        for encoding, where in zip(encodings, wheres):
            size = len(encoding.ids)
            if size == 0:
                raise BadData(f"{where}: the text gives no tokens; remove the row or give it text.")
            if self.length is not None and size > self.length:
                raise BadData(f"{where}: the text is {size} tokens, longer than the model's fixed sequence length "
                              f"{self.length}; enable truncation to {self.length} in the tokenizer.json.")
            values = {"ids": encoding.ids, "mask": encoding.attention_mask, "type": encoding.type_ids,
                      "position": range(size)}
            try:
                rows.append({spec.name: np.array([values[self.roles[spec.name]]], dtype=spec.dtype)
                             for spec in self.inputs})
            except OverflowError:
                raise BadData(f"{where}: a token id exceeds the range of the model's input dtype; give the model's "
                              "own tokenizer.json.") from None
        return rows

    def batches(self, batch_size: int):
        for start in range(0, self.count, batch_size):
            yield pad_and_stack(self.rows[start:start + batch_size], self.pad_values, self.length)
