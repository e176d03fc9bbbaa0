"""Each layer's share of a model's forward time in ONNX Runtime, from the runtime's own per-node profile.

The model is exported as it ships (`export_onnx`); the dynamo exporter records on every ONNX node the torch module
scopes it came from (`pkg.torch.onnx.name_scopes`), so a node's time is the layer's whose module contains it. The
session runs batch 1 on one thread with ORT's *basic* graph optimisations: constant folding and the fusions that keep
node names (BatchNorm into the convolution before it, whose time then counts for that layer). The full level the
evaluator measures with also converts the graph to blocked layouts, which renames nodes and leaves them without a
module, so shares are read at the basic level: a share of what each layer computes, not of the deployed graph's
exact timeline. Nodes of no listed layer (activations, pooling, additions) are the rest.
"""

from __future__ import annotations

import ast
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from torch import nn

from pipeline.deploy.onnx import export_onnx

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
KERNEL_SUFFIX = "_kernel_time"


def node_scopes(onnx_path: Path) -> dict[str, list[str]]:
    """ONNX node name -> the torch module scopes it was exported from, outermost first."""
    import onnx

    scopes = {}
    for node in onnx.load(str(onnx_path)).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes[node.name] = ast.literal_eval(meta[SCOPES_KEY]) if SCOPES_KEY in meta else []
    return scopes


def node_times_us(onnx_path: Path, input_size: tuple[int, ...], *, runs: int, warmup: int, workdir: Path) -> Counter:
    """Microseconds per ONNX node summed over `runs` batch-1 forwards (after `warmup`), from ORT's profile."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.zeros((1, *input_size), dtype=np.float32)
    for _ in range(warmup):
        session.run(None, {name: x})
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / "ort-profile")
    profiled = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for _ in range(warmup + runs):
        profiled.run(None, {name: x})
    events = json.loads(Path(profiled.end_profiling()).read_text())
    times: Counter = Counter()
    kernel_events = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith(KERNEL_SUFFIX)]
    per_run = len(kernel_events) // (warmup + runs) if kernel_events else 0
    for event in kernel_events[warmup * per_run :]:  # the profiled session's own warm-up runs are left out
        times[event["name"][: -len(KERNEL_SUFFIX)]] += event["dur"]
    return times


def layer_latency_shares(
    model: nn.Module, input_size: tuple[int, ...], layers: list[str], *, runs: int = 50, warmup: int = 5
) -> dict[str, float]:
    """Share (0..1) of the batch-1 ONNX Runtime forward spent in each of `layers` (module names); the shares of all
    layers and the rest sum to 1."""
    wanted = set(layers)
    with tempfile.TemporaryDirectory(prefix="layer-latency-") as tmp:
        path = export_onnx(model.eval(), input_size, Path(tmp) / "model.onnx", opset=18)
        scopes = node_scopes(path)
        times = node_times_us(path, input_size, runs=runs, warmup=warmup, workdir=Path(tmp))
    total = sum(times.values())
    shares = dict.fromkeys(layers, 0.0)
    if not total:
        return shares
    for node, us in times.items():
        owner = next((s for s in reversed(scopes.get(node, [])) if s in wanted), None)
        if owner is not None:
            shares[owner] += us / total
    return shares
