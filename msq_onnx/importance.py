"""Stage 5: layer importance as the predictor-accuracy gain over the layer(s) upstream.

g_l = a_l - a_prev(l), where a_prev is the best accuracy among the nearest
weighted layers that feed l (the network input for the first layer), clipped
at a small positive floor so that every layer keeps a non-zero weight.
"""

from __future__ import annotations

from .load import producer_map

IMPORTANCE_FLOOR = 0.005


def upstream_layers(model, layers) -> dict[str, list[str]]:
    """For each layer, the nearest weighted layers on any path back from its input."""
    producer = producer_map(model.graph.node)
    layer_names = {layer.name for layer in layers}
    initializers = {t.name for t in model.graph.initializer}
    result = {}
    for layer in layers:
        found, stack, seen = [], [layer.input_name], set()
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor in initializers:
                continue
            seen.add(tensor)
            node = producer.get(tensor)
            if node is None:
                continue  # a graph input
            if node.name in layer_names and node.name not in layer.nodes:
                found.append(node.name)
                continue
            # The layer's own node is passed through: an LSTM's recurrence weight multiplies the node's own
            # hidden states, and its upstream is the LSTM's (otherwise its input weight's layer, a gain of zero).
            stack.extend(i for i in node.input if i)
        result[layer.name] = sorted(set(found))
    return result


def importance(accuracies: dict, input_accuracy: float, upstream: dict,
               floor: float = IMPORTANCE_FLOOR) -> dict[str, float]:
    gains = {}
    for name, accuracy in accuracies.items():
        previous = max((accuracies[u] for u in upstream.get(name, []) if u in accuracies), default=input_accuracy)
        gains[name] = float(max(accuracy - previous, floor))
    return gains
