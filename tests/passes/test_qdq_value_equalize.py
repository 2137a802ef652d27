"""qdq's V equalization (``value_equalize``, on for trt): V's channels centred and their ranges evened before probs x
V's per-tensor INT8, the attention output projection taking the factors back. On a tiny BERT fused for trt: the
rewrite is exact in float and leaves every V channel the same centred range on the calibration data; where V has
a few channels 16x the others (the model's function unchanged), it lowers the INT8 graph's output error; and it
refuses a calibration table alone when asked for."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tqc.compiler.analysis.calibration import calibrate, calibration_targets
from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.graph import to_graph, to_model
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext
from tqc.passes.qdq.value_equalize import channel_ranges, equalize_values, value_chains

WIDE = [1, 5, 9]  # V channels made 16x wider in the uneven model


def token_batches(count: int, seed: int, batch: int = 8, seq: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        mask = np.ones((batch, seq), np.int64)
        for row, length in enumerate(rng.integers(4, seq + 1, size=batch)):
            mask[row, length:] = 0
        out.append({"input_ids": rng.integers(5, 1000, size=(batch, seq)).astype(np.int64), "attention_mask": mask,
                    "token_type_ids": np.zeros((batch, seq), np.int64)})
    return out


def outputs(model: onnx.ModelProto, feeds) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return np.concatenate([session.run(None, {k: v for k, v in f.items() if k in names})[0].reshape(-1)
                           for f in feeds])


@pytest.fixture(scope="module")
def fused(exports) -> onnx.ModelProto:
    model = load_model(exports.get("bert", size="tiny"))
    return PassManager(parse_pipeline("fold,fuse"), PassContext(target="trt"), verify="none").run(model)


def test_equalization_is_exact_and_evens_v(fused):
    graph = to_graph(fused)
    chains = value_chains(graph)
    assert len(chains) >= 2  # every layer's core
    names = [c.v.name for c in chains]
    calib = token_batches(4, seed=1)
    before = channel_ranges(graph, names, calib)
    spread = [float(np.ptp((hi - lo) / 2) / np.mean((hi - lo) / 2)) for lo, hi in before.values()]
    assert min(spread) > 0.1  # the random model's V channels are uneven to start with
    assert equalize_values(graph, calib) == len(chains)
    # V holds (v - z) / e now, under a name the float graph does not have (tqc diff --layerwise pairs by name)
    renamed = [c.v.name for c in chains]
    assert all(name.endswith("_tqc_veq") for name in renamed) and set(renamed) <= set(graph.tensors())
    assert not set(names) & set(graph.tensors())
    after = channel_ranges(graph, renamed, calib)
    assert sorted(after) == sorted(renamed)
    for lo, hi in after.values():
        half, centre = (hi - lo) / 2, (hi + lo) / 2
        np.testing.assert_allclose(half, half.mean(), rtol=1e-4)
        np.testing.assert_allclose(centre, 0.0, atol=1e-4 * half.mean())
    held_out = token_batches(2, seed=9)
    reference, equalized = outputs(fused, held_out), outputs(to_model(graph, fused), held_out)
    np.testing.assert_allclose(equalized, reference, atol=2e-5 * np.abs(reference).max())


def uneven(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with V channels WIDE of every packed QKV projection 16x wider and the output projection's rows
    16x narrower: the same function, a V whose per-tensor range the three channels own."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = to_graph(model)
    for chain in value_chains(graph):
        weight = chain.weight.inputs[1]
        bias = next(t for t in chain.bias.inputs if t is not chain.weight.outputs[0])
        columns = [chain.offset + c for c in WIDE]
        weight.values = np.array(weight.values)
        weight.values[:, columns] *= 16
        bias.values = np.array(bias.values)
        bias.values[columns] *= 16
        out = chain.out_weight.inputs[1]
        out.values = np.array(out.values)
        out.values[WIDE, :] /= 16
    return to_model(graph, model)


def int8_error(model: onnx.ModelProto, option: str, calib, held_out) -> tuple[float, dict]:
    ctx = PassContext(target="trt")
    ctx.calibration_source = calib
    manager = PassManager(parse_pipeline(f"qdq{{value_equalize={option}}}"), ctx, verify="none")
    quantized = manager.run(model)
    reference, result = outputs(model, held_out), outputs(quantized, held_out)
    return float(np.mean((result - reference) ** 2)), manager.records[-1].stats


def test_equalization_lowers_the_int8_error_of_an_uneven_v(fused):
    model = uneven(fused)
    calib, held_out = token_batches(4, seed=1), token_batches(2, seed=9)
    np.testing.assert_allclose(outputs(model, held_out), outputs(fused, held_out), rtol=1e-4, atol=1e-4)
    plain, plain_stats = int8_error(model, "false", calib, held_out)
    equalized, stats = int8_error(model, "true", calib, held_out)
    assert "values_equalized" not in plain_stats and stats["values_equalized"] == len(value_chains(to_graph(model)))
    assert stats["attention_bmm"] == plain_stats["attention_bmm"] > 0  # every INT8 attention MatMul stays
    assert equalized < 0.7 * plain, (equalized, plain)


def test_equalization_refuses_a_table_alone(fused):
    calib = token_batches(2, seed=1)
    table = calibrate(fused, calib, calibration_targets(fused))
    manager = PassManager(parse_pipeline("qdq{value_equalize=true}"), PassContext(target="trt", calibration=table),
                          verify="none")
    with pytest.raises(TqcError, match="value_equalize=true"):
        manager.run(fused)
    # 'auto' with a table alone leaves V as it is (the table was measured on it)
    auto = PassManager(parse_pipeline("qdq"), PassContext(target="trt", calibration=table), verify="none")
    auto.run(fused)
    assert "values_equalized" not in auto.records[-1].stats
