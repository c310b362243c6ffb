"""Attention fusion for exported ViT graphs: each self-attention core becomes one ONNX Runtime MultiHeadAttention.

torch.onnx.export(dynamo=True) writes scaled_dot_product_attention as its parts (split of the packed qkv
projection, Q·Kᵀ with the scale, Softmax, ·V, heads back side by side), a pattern ONNX Runtime's transformer
optimizer (`onnxruntime.transformers.optimizer`, model_type "vit") does not match: on this export it fuses only
SkipLayerNormalization and BiasGelu, which the session's own graph optimizations already do at load. `fuse_attention`
rewrites each core into `com.microsoft.MultiHeadAttention` (query, key and value as (N, L, D), `num_heads`, the
scale): one CPU kernel instead of about 20 nodes, and in an int8 graph the core stays fp32 (static QDQ leaves the
contrib op alone) while the qkv and output projections are quantized. docs/video.md has the measurements.

The projection (MatMul + Add) stays in front of the fused node and the output projection after it, so the
quantizer sees the same linear layers as before. The rewrite is exact up to float rounding; the graph records
what was fused in its metadata (`ATTENTION_KEY`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # onnx is imported where a graph is rewritten: runtimes imports this module in every worker
    import onnx

ATTENTION_KEY = "vision_serve.attention"     # metadata: "MultiHeadAttention x<n>" or "none"
FUSED_OP = "MultiHeadAttention"              # com.microsoft contrib op, CPU kernel in onnxruntime
MS_DOMAIN = "com.microsoft"


def _const(graph: Any, name: str) -> np.ndarray | None:
    """The value of an initializer or Constant node output, else None."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _match(graph: Any, softmax: Any, producer: dict[str, Any], consumers: dict[str, list[Any]]
           ) -> dict[str, Any] | None:
    """One SDPA core around `softmax`: the packed qkv tensor (N, L, 3D), heads, scale, and the core's output."""
    def up(name: str, op: str) -> Any:
        node = producer.get(name)
        return node if node is not None and node.op_type == op else None

    def down(name: str, op: str) -> Any:
        nodes = consumers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op else None

    scores = up(softmax.input[0], "MatMul")
    attn = down(softmax.output[0], "MatMul")
    back = attn and down(attn.output[0], "Transpose")
    merged = back and down(back.output[0], "Reshape")
    if not (scores and attn and merged) or list(back.attribute[0].ints) != [0, 2, 1, 3]:
        return None
    scales, roots = [], []
    for name in scores.input:  # q * s and kᵀ * s (the scale split between both sides), or unscaled
        mul = up(name, "Mul")
        value = _const(graph, mul.input[1]) if mul is not None else None
        if mul is not None and value is not None and value.size == 1:
            scales.append(float(value.ravel()[0]))
            name = mul.input[0]
        roots.append(name)
    parts, transposes = [], []
    for name in (roots[0], roots[1], attn.input[1]):  # q, k, v back to their Slice of the one packed permute
        flips = 0
        while producer.get(name) is not None and producer[name].op_type in ("Reshape", "Transpose", "Squeeze"):
            flips += producer[name].op_type == "Transpose"
            name = producer[name].input[0]
        parts.append(producer.get(name))
        transposes.append(flips)
    if transposes != [0, 1, 0] or any(p is None or p.op_type != "Slice" or len(p.input) < 4 for p in parts):
        return None  # only kᵀ is transposed; q, k, v are slices of one tensor
    if any(int(_const(graph, p.input[3]).ravel()[0]) != 0 for p in parts):
        return None
    permutes = {p.input[0] for p in parts}
    permute = producer.get(next(iter(permutes))) if len(permutes) == 1 else None
    if permute is None or permute.op_type != "Transpose" or list(permute.attribute[0].ints) != [2, 0, 3, 1, 4]:
        return None
    starts = [int(_const(graph, p.input[1]).ravel()[0]) for p in parts]
    if starts != [0, 1, 2]:
        return None
    split = up(permute.input[0], "Reshape")
    shape = _const(graph, split.input[1]) if split is not None else None
    if shape is None or shape.size != 5 or shape[2] != 3:
        return None
    heads, head_dim = int(shape[3]), int(shape[4])
    scale = math.prod(scales) if scales else 1.0
    return {"qkv": split.input[0], "heads": heads, "dim": heads * head_dim, "scale": scale,
            "output": merged.output[0], "name": softmax.name}


def fuse_attention(model: onnx.ModelProto) -> int:
    """Rewrite every matched attention core of `model` in place; returns how many (also in the metadata)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = [m for m in (_match(graph, n, producer, consumers) for n in graph.node if n.op_type == "Softmax") if m]
    for i, m in enumerate(found):
        q, k, v = (f"attention_{i}_{p}" for p in "qkv")
        sizes = f"attention_{i}_split"
        graph.initializer.append(numpy_helper.from_array(np.array([m["dim"]] * 3, np.int64), sizes))
        old = producer[m["output"]]
        graph.node.remove(old)
        graph.node.extend([
            helper.make_node("Split", [m["qkv"], sizes], [q, k, v], name=f"attention_{i}_split", axis=-1),
            helper.make_node(FUSED_OP, [q, k, v], [m["output"]], name=f"attention_{i}", domain=MS_DOMAIN,
                             num_heads=m["heads"], scale=m["scale"])])
    if found:
        _prune(graph)
        _toposort(graph)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                   ATTENTION_KEY: f"{FUSED_OP} x{len(found)}" if found else "none"})
    return len(found)


def _prune(graph: Any) -> None:
    """Drop nodes (and initializers) that no graph output depends on any more."""
    producer = {out: node for node in graph.node for out in node.output}
    live, todo = set(), [o.name for o in graph.output]
    while todo:
        node = producer.get(todo.pop())
        if node is not None and id(node) not in live:
            live.add(id(node))
            todo.extend(node.input)
    for node in [n for n in graph.node if id(n) not in live]:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _toposort(graph: Any) -> None:
    """Nodes in an order where each input is produced before use (the new nodes were appended at the end)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes, order = list(graph.node), []
    while nodes:
        rest = [n for n in nodes if not all(i in ready for i in n.input)]
        done = [n for n in nodes if all(i in ready for i in n.input)]
        if not done:
            raise ValueError("attention fusion left a cycle or a dangling input")
        order += done
        ready.update(o for n in done for o in n.output)
        nodes = rest
    del graph.node[:]
    graph.node.extend(order)
