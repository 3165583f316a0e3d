"""Per-layer measured latency from onnxruntime's profiler: kernels traced back to layers through
renames (NCHWc) and fusions (Conv+Relu), and a factored chain counted for its layer."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank as ol
from onnx_lowrank.profile import kernel_times, layer_times, node_times


def _two_layer_model():
    """x -> conv_a -> Relu -> conv_b -> Relu -> Flatten: fused and renamed on the CPU."""
    rng = np.random.default_rng(0)
    w_a = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    w_b = rng.standard_normal((32, 32, 5, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "Wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "Wb"], ["b"], name="conv_b", pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Flatten", ["rb"], ["y"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 24, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w_a, "Wa"), numpy_helper.from_array(w_b, "Wb")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_kernels_are_traced_back_to_their_layers():
    model = _two_layer_model()
    times = node_times(model, kernel_times(model, threads=1, runs=10))
    assert times["conv_a"] > 0 and times["conv_b"] > 0
    assert "relu_a" not in times and "relu_b" not in times  # fused into the convs
    layers, other = layer_times(times, ["conv_a", "conv_b"])
    assert layers["conv_b"] > layers["conv_a"]  # 5x5 on 32 channels against 3x3 on 16
    assert other == sum(ms for name, ms in times.items() if name not in ("conv_a", "conv_b"))


def test_a_factored_chain_counts_for_its_layer():
    optimized, _ = ol.optimize(_two_layer_model(), method="separable", rank=8, check=0)
    chain = [n.name for n in optimized.graph.node if n.name.startswith("conv_b/")]
    assert len(chain) == 2
    times = node_times(optimized, kernel_times(optimized, threads=1, runs=10))
    layers, _ = layer_times(times, ["conv_a", "conv_b"])
    assert layers["conv_b"] == sum(times[name] for name in chain) > 0


def test_table_times_every_kernel_of_a_chain():
    """A grouped conv that onnxruntime runs outside its NCHWc layout is timed too (it once
    fell into 'other' and a slow chain looked free)."""
    import time

    from onnx_lowrank.cost import ConvShape
    from onnx_lowrank.graph import ConvGeometry
    from onnx_lowrank.latency import chain_model, kernel_time
    from onnx_lowrank.runtime import session

    grouped = ConvShape((128, 5, 9, 9), ConvGeometry((9, 9), (1, 1), (1, 1), (0, 0, 0, 0), 16))
    model = chain_model([grouped], (1, 80, 16, 16))
    kernels = kernel_time(model, "cpu", 1, runs=10)
    sess = session(model, threads=1)
    x = {"x": np.zeros((1, 80, 16, 16), np.float32)}
    sess.run(None, x)
    start = time.perf_counter()
    for _ in range(10):
        sess.run(None, x)
    wall = (time.perf_counter() - start) / 10 * 1e3
    assert 0.3 * wall < kernels <= 1.5 * wall


def test_bench_times_each_model_warm_in_alternating_blocks(monkeypatch):
    """Each model runs in blocks of consecutive runs, models alternating A B B A; a block's
    first run (just after the other model ran: cold caches) is not counted."""
    import time

    from onnx_lowrank import bench as bench_module

    order, last = [], [None]

    class FakeSession:
        def __init__(self, name):
            self.name = name

        def run(self, outputs, feed):
            cold = last[0] not in (None, self.name)
            last[0] = self.name
            order.append(self.name)
            time.sleep(0.02 if cold else 0.001)

    names = iter("AB")
    monkeypatch.setattr(bench_module, "session", lambda *a, **k: FakeSession(next(names)))
    model = _two_layer_model()
    result = bench_module.bench([model, model], runs=8, warmup=1)
    assert result["block"] == bench_module.block_size(8) == 2
    assert all(ms < 10 for ms in result["median_ms"])  # the 20 ms cold runs are not counted
    timed = "".join(order[2:])  # after one warm-up run each
    assert timed == "AAABBBBBBAAAAAABBBBBBAAA"
    assert bench_module.block_size(20) == 5 and bench_module.block_size(1000) == 10
