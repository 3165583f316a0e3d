"""Put a rewritten graph back into the user's ModelProto, changing only what a pass touched.

Every node of the imported graph carries `origin` (its index in the original model). A pass
adds nodes with `anchor` (the index they stand in for, or follow) and marks a node it changed
in place with `modified`. Untouched nodes are copied from the original proto byte for byte, in
their original order; metadata, opsets, IR version, inputs, outputs and value_info stay."""

from __future__ import annotations

from collections import defaultdict

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .graph import real_inputs


def tag_origins(graph: gs.Graph) -> None:
    """Remember each imported node's index in the original model."""
    for i, node in enumerate(graph.nodes):
        node.origin = i


def assemble(original: onnx.ModelProto, graph: gs.Graph) -> onnx.ModelProto:
    """The original model with the rewritten nodes in place of the ones they replaced."""
    alive, anchored = {}, defaultdict(list)
    for node in graph.nodes:
        origin = getattr(node, "origin", None)
        if origin is not None:
            alive[origin] = node
        else:
            anchored[getattr(node, "anchor", None)].append(node)
    nodes, exported = [], []
    for i, proto in enumerate(original.graph.node):
        node = alive.get(i)
        if node is not None and getattr(node, "modified", False):
            exported.append(node)
            nodes.append(_export_node(node, proto))
        elif node is not None:
            nodes.append(proto)
        for new in anchored.pop(i, []):
            exported.append(new)
            nodes.append(_export_node(new))
    for new in (n for group in anchored.values() for n in group):  # anchorless: append
        exported.append(new)
        nodes.append(_export_node(new))
    return _model_with(original, nodes, _initializers(original, nodes, exported))


def _export_node(node: gs.Node, original: onnx.NodeProto | None = None) -> onnx.NodeProto:
    proto = OnnxExporter.export_node(node)
    if original is not None:  # what graphsurgeon does not carry
        proto.doc_string = original.doc_string
        proto.metadata_props.extend(original.metadata_props)
    return proto


def _initializers(original, nodes, exported) -> list[onnx.TensorProto]:
    used = _referenced_names(nodes)
    keep = [t for t in original.graph.initializer if t.name in used]
    names = {t.name for t in keep}
    for node in exported:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) and tensor.name not in names:
                names.add(tensor.name)
                keep.append(OnnxExporter.export_tensor_proto(tensor))
    return keep


def _referenced_names(nodes) -> set[str]:
    """Every tensor name read by the nodes, subgraphs included (they may read outer weights)."""
    names: set[str] = set()
    for node in nodes:
        names.update(node.input)
        for a in node.attribute:
            for g in (
                [a.g]
                if a.type == onnx.AttributeProto.GRAPH
                else list(a.graphs)
                if a.type == onnx.AttributeProto.GRAPHS
                else []
            ):
                names.update(_referenced_names(g.node))
    return names


def _model_with(original: onnx.ModelProto, nodes, initializers) -> onnx.ModelProto:
    result = onnx.ModelProto()
    copy_fields(original, result, skip=("graph",))
    g = result.graph
    copy_fields(original.graph, g, skip=("node", "initializer", "input", "value_info"))
    g.node.extend(nodes)
    g.initializer.extend(initializers)
    keep = {t.name for t in initializers} | set(real_inputs(original))
    g.input.extend(i for i in original.graph.input if i.name in keep)
    present = _referenced_names(nodes) | {o for n in nodes for o in n.output}
    g.value_info.extend(v for v in original.graph.value_info if v.name in present)
    return result


def copy_fields(src, dst, skip: tuple[str, ...]) -> None:
    """Copy the set fields of one protobuf message to another, but those in `skip`."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        target = getattr(dst, field.name)
        if hasattr(target, "extend"):
            target.extend(value)
        elif field.message_type:
            target.CopyFrom(value)
        else:
            setattr(dst, field.name, value)
