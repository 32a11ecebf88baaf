"""Models whose inputs do not take samples along their first axis, run one sample at a time.

A sample rate given as a scalar, an RNN state [layers, batch, hidden], torchvision's detectors' image [3, H, W]:
such an input cannot be fed calibration samples stacked along axis 0. When the samples give it whole (an array
[N, *its shape]), the model is read with a first axis of 1 added to those inputs (a Squeeze right behind each)
and to its outputs that lack a sample axis (an Unsqueeze in front of each). Every stage then feeds, stacks and
compares samples along axis 0 as for any model, one sample a run; `strip` takes the two kinds of node off the
written model again, so it takes and gives what the input model did. The nodes' names mark them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ops import bodies

INPUT_AXIS = "msq_sample_axis_in/"  # the Squeeze behind an input given its sample axis
OUTPUT_AXIS = "msq_sample_axis_out/"  # the Unsqueeze in front of an output given one
_AXES = "msq_sample_axis"  # the [0] both kinds read


def input_axes(graph, inits) -> dict:
    """{input: (why it cannot be fed samples along its first axis, or "";
                the axes past its first named as the batch the inputs have first: 1 in a run of one sample;
                whether it is 1-D with a first axis of its own, no other input's first: a waveform [T])}.
    It cannot be fed along its first axis where it is a scalar, or where that batch axis is elsewhere in it (an
    RNN state [layers, batch, hidden])."""
    values = [value for value in graph.input if value.name not in inits]
    dims = {value.name: list(value.type.tensor_type.shape.dim) for value in values}
    known_rank = {value.name for value in values if value.type.tensor_type.HasField("shape")}
    batch = next((d[0].dim_param for d in dims.values() if d and d[0].dim_param), None)
    found = {}
    for name, shape in dims.items():
        named = tuple(axis for axis, d in enumerate(shape) if axis and batch and d.dim_param == batch)
        firsts = [d[0].dim_param for other, d in dims.items() if other != name and d]
        own = len(shape) == 1 and not shape[0].HasField("dim_value") and (
            shape[0].dim_param not in firsts if shape[0].dim_param else not firsts)
        if not shape and name in known_rank:
            found[name] = ("is a scalar (rank 0)", named, own)
        elif named and shape[0].dim_param != batch:
            found[name] = (f"has its batch axis '{batch}' at position {named[0]}, not first", named, own)
        else:
            found[name] = ("", named, own)
    return found


def _first_dim(value):
    """Axis 0 of a value's declared shape: its dim_param, its size, or None where unknown or the value a scalar."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape") or not tensor_type.shape.dim:
        return None
    dim = tensor_type.shape.dim[0]
    return dim.dim_param or (dim.dim_value if dim.HasField("dim_value") else None)


def _outputs_to_axe(graph, whole: set) -> list[str]:
    """The outputs that get a sample axis: where every input was given one, all of them; else those whose axis 0
    is not what the other inputs have first (their batch dim_param, or a batch of 1)."""
    kept = [value for value in graph.input if value.name not in whole]
    firsts = {_first_dim(value) for value in kept} - {None}
    batch = {first for first in firsts if isinstance(first, str) or first == 1}
    return [value.name for value in graph.output if not batch or _first_dim(value) not in batch]


def _with_sample_axis(value) -> onnx.ValueInfoProto:
    axed = onnx.ValueInfoProto()
    axed.CopyFrom(value)
    tensor_type = axed.type.tensor_type
    dims = list(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
    if dims is not None:
        tensor_type.shape.ClearField("dim")
        tensor_type.shape.dim.add().dim_value = 1
        for dim in dims:
            tensor_type.shape.dim.add().CopyFrom(dim)
    return axed


def _rename_reads(graph, old: str, new: str) -> None:
    """Every read of `old` in the graph and in the bodies that do not define a name of their own so."""
    for node in graph.node:
        _replace(node.input, old, new)
        for body in bodies(node):
            defined = {v.name for v in body.input} | {t.name for t in body.initializer} | {
                name for inner in body.node for name in inner.output}
            if old not in defined:
                _rename_reads(body, old, new)
    for output in graph.output:
        if output.name == old:
            output.name = new


def stripped_size(path: str, record: dict) -> int:
    """The bytes the model file at `path` takes once `strip` has taken its sample axes off, as publish writes it
    (its external data, if any, unchanged): what --max-size holds it to."""
    model = onnx.load(path, load_external_data=False)
    strip(model, record)
    return model.ByteSize()


def _replace(names, old: str, new: str) -> None:
    for index, name in enumerate(names):
        if name == old:
            names[index] = new


def add(model: onnx.ModelProto, whole: set, taken: set) -> dict:
    """Give the inputs in `whole` and the outputs that lack one a first axis of 1 (in place). Returns {name: its
    declared value before} for each, what `strip` restores; `taken` holds every name in use and gets the new."""
    from .load import _copied, unique_name  # load reads models through this module

    graph = model.graph
    record = {}
    axes = unique_name(_AXES, taken)
    graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes))
    squeezes = []
    for value in graph.input:
        if value.name not in whole:
            continue
        inner = unique_name(f"{value.name}_unbatched", taken)
        _rename_reads(graph, value.name, inner)
        squeezes.append(helper.make_node("Squeeze", [value.name, axes], [inner], name=INPUT_AXIS + value.name))
        graph.value_info.append(helper.make_value_info(inner, value.type))
        record[value.name] = _copied(value)
        value.CopyFrom(_with_sample_axis(value))
    for name in _outputs_to_axe(graph, whole):
        value = next(v for v in graph.output if v.name == name)
        inner = unique_name(f"{name}_unbatched", taken)
        for node in graph.node:  # its maker and its readers inside the graph
            _replace(node.output, name, inner)
        _rename_reads(graph, name, inner)  # the output entry too: set back below
        value.name = name
        graph.node.append(helper.make_node("Unsqueeze", [inner, axes], [name], name=OUTPUT_AXIS + name))
        graph.value_info.append(helper.make_value_info(inner, value.type))
        record[name] = _copied(value)
        value.CopyFrom(_with_sample_axis(value))
    nodes = squeezes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return record


def strip(model: onnx.ModelProto, record: dict) -> None:
    """Take the sample axes `add` gave off a written model (in place): the Squeeze and Unsqueeze nodes go, what
    read their results reads what they read (a Q/DQ pair ORT's quantizer may have put beside them included), and
    the inputs and outputs are declared as they were."""
    graph = model.graph
    axes = set()
    for node in [n for n in graph.node if n.name.startswith((INPUT_AXIS, OUTPUT_AXIS))]:
        graph.node.remove(node)
        axes.add(node.input[1])
        source, result = node.input[0], node.output[0]
        if node.name.startswith(INPUT_AXIS):
            _rename_reads(graph, result, source)
        else:  # what made the tensor it read makes the output again, under the output's name
            for maker in graph.node:
                _replace(maker.output, source, result)
            _rename_reads(graph, source, result)
    present = {name for node in graph.node for name in node.output}  # a taken-off node's result is gone
    kept_info = [v for v in graph.value_info if v.name in present]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    for value in list(graph.input) + list(graph.output):
        if value.name in record:
            value.CopyFrom(record[value.name])
    axes -= {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name not in axes]
    del graph.initializer[:]
    graph.initializer.extend(kept)
