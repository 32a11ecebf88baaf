"""Stage 7: write the QDQ model with onnxruntime.quantization.

The weights are first moved onto their k-bit grids (clipped, rounded, bias
corrected) in a private copy of the model; ORT's QDQ quantizer then places
Q/DQ nodes, with our per-channel scales as TensorQuantOverrides (int8
containers: the integers use only the k-bit levels, and ORT keeps its fused
int8 kernels) and our activation ranges as its calibration cache, so it does
not calibrate again. The result is moved into place atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BadOption
from .load import LoadedModel, is_large, save_model_file
from .weights import quantize_layer



@dataclass
class QuantizedWeights:
    model: onnx.ModelProto  # FP32 model whose weights sit on their grids
    scales: dict  # weight name -> per-channel scales


def quantize_weights(loaded: LoadedModel, bits: dict, choices: dict, input_mean: dict,
                     bias_correction: bool = True) -> QuantizedWeights:
    """Copy of the model with every layer's weight fake-quantized (and its bias corrected)."""
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    nodes = {n.name: n for n in model.graph.node}
    scales = {}
    for layer in loaded.layers:
        result = quantize_layer(layer, loaded.weight(layer).astype(np.float32), loaded.bias(layer),
                                choices[layer.name][bits[layer.name]], input_mean.get(layer.name), bias_correction)
        model.graph.initializer[index[layer.weight_name]].CopyFrom(
            numpy_helper.from_array(result.weight.astype(np.float32), layer.weight_name))
        scales[layer.weight_name] = result.scale
        if result.bias is None:
            continue
        if layer.bias_name is not None:
            model.graph.initializer[index[layer.bias_name]].CopyFrom(
                numpy_helper.from_array(result.bias, layer.bias_name))
            continue
        node = nodes[layer.name]
        if len(node.input) > 2 and node.input[2]:
            continue  # a bias computed in the graph: nothing constant to correct
        name = f"{layer.weight_name}_msq_bias"
        model.graph.initializer.append(numpy_helper.from_array(result.bias, name))
        if len(node.input) > 2:
            node.input[2] = name
        else:
            node.input.append(name)  # Conv and Gemm take an optional bias as their third input
    return QuantizedWeights(model, scales)


def tensor_overrides(loaded: LoadedModel, scales: dict, wide_inputs=()) -> dict:
    """Per-channel weight scales, and uint16 for the activation inputs of the layers in wide_inputs."""
    from onnxruntime.quantization import QuantType

    overrides = {}
    for layer in loaded.layers:
        if layer.name in wide_inputs:
            overrides[layer.input_name] = [{"quant_type": QuantType.QUInt16}]
    for layer in loaded.layers:
        per_channel = [{"scale": np.float32(s), "zero_point": np.int8(0)} for s in scales[layer.weight_name]]
        per_channel[0].update({"quant_type": QuantType.QInt8, "axis": layer.out_axis})
        overrides[layer.weight_name] = per_channel
    return overrides


def write_calibration_cache(ranges: dict, path: str) -> None:
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    data = {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)


def check_output_path(input_path: str, output_path: str) -> None:
    same = os.path.abspath(output_path) == os.path.abspath(input_path) or (
        os.path.exists(output_path) and os.path.exists(input_path) and os.path.samefile(output_path, input_path))
    if same:
        raise BadOption(f"output path '{output_path}' is the input model; write the result to another file.")
    folder = os.path.dirname(os.path.abspath(output_path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise BadOption(f"output folder '{folder}' is a file, not a folder; choose another output path.")
    if not os.path.isdir(folder):
        raise BadOption(f"output folder '{folder}' does not exist; create it first.")
    if os.path.isdir(output_path):
        raise BadOption(f"output path '{output_path}' is a folder; give a file name such as model.qdq.onnx.")
    try:  # os.access says yes to root and on read-only filesystems: really try
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".msq-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise BadOption(f"output folder '{folder}' is not writable ({exc.strerror}); choose another output path.") \
            from None


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _quiet_ort_logging():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantize_to_qdq(loaded: LoadedModel, quantized: QuantizedWeights, ranges: dict, work_dir: str,
                    wide_inputs=()) -> str:
    """Run ORT's QDQ quantizer in work_dir; return the path of its output."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    large = is_large(quantized.model)
    prepared = os.path.join(work_dir, "prepared.onnx")
    save_model_file(quantized.model, prepared)
    cache = os.path.join(work_dir, "ranges.json")
    write_calibration_cache(ranges, cache)
    result = os.path.join(work_dir, "quantized.onnx")
    with _quiet_ort_logging():
        quantize_static(prepared, result, calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=cache,
                        use_external_data_format=large,
                        extra_options={"TensorQuantOverrides": tensor_overrides(loaded, quantized.scales,
                                                                                wide_inputs)})
    return result


def publish(model_path: str, output_path: str) -> None:
    """Move a finished model into place: readers see the old file or the new one, never a part."""
    model = onnx.load(model_path)
    large = is_large(model)
    folder = os.path.dirname(os.path.abspath(output_path))
    data_name = os.path.basename(output_path) + ".data"  # used only when the model is large
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".msq-", suffix=".onnx.tmp")
    os.close(handle)
    try:
        if large:
            # Two renames (data, then model): unlike the single-file case, a kill
            # between them can pair new data with the old model (README: limits).
            onnx.save_model(model, temporary, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name + ".tmp", size_threshold=0)
            os.replace(os.path.join(folder, data_name + ".tmp"), os.path.join(folder, data_name))
            _rewrite_location(temporary, data_name + ".tmp", data_name)
        else:
            with open(temporary, "wb") as out:
                out.write(model.SerializeToString())
                out.flush()
                os.fsync(out.fileno())
        os.chmod(temporary, _default_mode())  # mkstemp makes 0600; a model is an ordinary file
        os.replace(temporary, output_path)
    except BaseException as exc:
        for leftover in (temporary, os.path.join(folder, data_name + ".tmp")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        if isinstance(exc, OSError):
            raise BadOption(f"cannot write '{output_path}' ({exc.strerror}); free space or choose another "
                            "output path.") from None
        raise


def _rewrite_location(path: str, old: str, new: str) -> None:
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    with open(path, "wb") as out:
        out.write(model.SerializeToString())
