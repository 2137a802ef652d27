"""Behaviour unchanged: the fixed set compiles to its recorded fingerprints, on any x86-64 CPU.

``tests/golden/fingerprints.json`` holds one fingerprint per model of the set (``tests/golden/golden.py``'s
docstring says what is exact and what is tolerant, and why). The inputs are exported again here; if an export
itself differs (another torch or transformers), the compiled outputs are not comparable and the test says so
instead of comparing. The other tests prove the comparison still catches a real change, on one compiled output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
sys.path.insert(0, str(GOLDEN))
import golden  # noqa: E402

pytest.importorskip("transformers")


@pytest.mark.slow
def test_fixed_set_compiles_to_the_recorded_behaviour(tmp_path: Path) -> None:
    recorded = json.loads(golden.FINGERPRINTS.read_text())
    computed = golden.compute(tmp_path)
    changed_exports = [k for k in computed if k.endswith(" export") and golden.compare(recorded[k], computed[k])]
    assert not changed_exports, (f"the exports themselves differ from those recorded ({changed_exports}): another "
                                 "torch/transformers; the golden outputs cannot be compared on this machine")
    assert set(computed) == set(recorded)
    failed = {k: v for k, v in golden.check(computed, recorded).items() if v}
    assert not failed, f"behaviour changed for: {failed}"


# --- the comparison catches real changes (one compiled output, mutated) ---------------------------------------

@pytest.fixture(scope="module")
def compiled(exports, tmp_path_factory):
    """roberta-tiny fold,fuse,qdq for trt (smoothed linear layers, INT8 attention), compiled as the set is."""
    source = exports.get("roberta", size="tiny")
    folder = tmp_path_factory.mktemp("golden")
    out = golden.compile_one(source, "trt", "fold,fuse,qdq", folder, "roberta-tiny")
    return source, folder, onnx.load(str(out))


def _fingerprint(model: onnx.ModelProto) -> dict:
    return golden.fingerprint_model(onnx.ModelProto.FromString(model.SerializeToString()))


def _mutated(model: onnx.ModelProto, change) -> dict:
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    change(copy)
    return golden.fingerprint_model(copy)


def _set(model: onnx.ModelProto, name: str, fn) -> None:
    """New values for an initializer; everything else about it (doc string, dims) stays."""
    tensor = next(t for t in model.graph.initializer if t.name == name)
    values = fn(numpy_helper.to_array(tensor).copy())
    assert values.dtype == numpy_helper.to_array(tensor).dtype
    tensor.raw_data = numpy_helper.from_array(values, name).raw_data


def _toward_zero(a: np.ndarray, where: np.ndarray, steps: int) -> np.ndarray:
    """INT8 codes moved ``steps`` toward zero (up from zero) at ``where``: never clipped, always a change."""
    moved = a.astype(np.int16) - np.where(a > 0, steps, -steps)
    return np.where(where.reshape(a.shape), moved, a).astype(np.int8)


def _activation_scales(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return sorted({n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits})


def _smoothed_codes(model: onnx.ModelProto) -> list[str]:
    return sorted(t.name for t in model.graph.initializer if "_smoothed" in t.name and t.data_type == onnx.TensorProto.INT8
                  and len(t.dims) == 2)


def _moved_biases(model: onnx.ModelProto) -> list[str]:
    """The biases the shift and bias correction moved (on by default with calibration data)."""
    return sorted(golden.biases(model) & {t.name for t in model.graph.initializer if t.name.endswith("_corrected")})


def test_a_cross_cpu_sized_difference_passes(compiled):
    """What another instruction set does to calibration (golden.TOLERANCE's comment): every activation scale
    1e-5 off, one INT8 code of a smoothed weight one step, every moved bias 1e-3 of its largest |value| off."""
    _, _, model = compiled
    recorded = _fingerprint(model)
    scales, codes, biases = _activation_scales(model), _smoothed_codes(model), _moved_biases(model)
    assert len(scales) >= 8 and len(codes) == 8 and len(biases) == 8

    def change(m):
        for name in scales:
            _set(m, name, lambda a: (a * np.float32(1 + 1e-5)).astype(a.dtype))  # measured: up to 7.5e-6
        _set(m, codes[0], lambda a: _toward_zero(a, np.arange(a.size) == 7, 1))
        for name in biases:  # estimated: up to 1.4e-3
            _set(m, name, lambda a: (a + np.float32(1e-3) * np.abs(a).max()).astype(a.dtype))

    assert golden.compare(recorded, _mutated(model, change)) == []
    assert golden.compare(recorded, _fingerprint(model)) == []


@pytest.mark.parametrize("what", ["scale 1% off", "scale 1e-4 off", "zero point 2 steps", "codes 2 steps",
                                  "codes moved on 5%", "unsmoothed initializer 1 ulp", "attribute", "node order",
                                  "op type", "node name", "moved bias 1% of its largest value"])
def test_a_real_change_fails(compiled, what):
    _, _, model = compiled
    recorded = _fingerprint(model)
    scale = _activation_scales(model)[3]
    code = _smoothed_codes(model)[1]

    def change(m):
        nodes = m.graph.node
        if what == "scale 1% off":
            _set(m, scale, lambda a: (a * np.float32(1.01)).astype(a.dtype))
        elif what == "scale 1e-4 off":
            _set(m, scale, lambda a: (a * np.float32(1 + 1e-4)).astype(a.dtype))
        elif what == "zero point 2 steps":
            zp = next(n.input[2] for n in nodes if n.op_type == "QuantizeLinear" and n.input[1] == scale)
            _set(m, zp, lambda a: (a + 2).astype(a.dtype))
        elif what == "codes 2 steps":
            _set(m, code, lambda a: _toward_zero(a, np.arange(a.size) == 0, 2))
        elif what == "codes moved on 5%":
            _set(m, code, lambda a: _toward_zero(a, np.arange(a.size) % 20 == 0, 1))
        elif what == "unsmoothed initializer 1 ulp":
            gamma = next(n.input[1] for n in nodes if n.op_type == "LayerNormalization")
            _set(m, gamma, lambda a: np.nextafter(a, np.float32(np.inf)).astype(a.dtype))
        elif what == "attribute":
            ln = next(n for n in nodes if n.op_type == "LayerNormalization")
            next(a for a in ln.attribute if a.name == "epsilon").f *= 10
        elif what == "node order":
            i = next(i for i in range(len(nodes) - 1) if nodes[i].op_type == "DequantizeLinear"
                     and nodes[i + 1].op_type == "DequantizeLinear")
            first = onnx.NodeProto.FromString(nodes[i].SerializeToString())
            nodes[i].CopyFrom(nodes[i + 1])
            nodes[i + 1].CopyFrom(first)
        elif what == "op type":
            next(n for n in nodes if n.op_type == "Erf").op_type = "Tanh"
        elif what == "node name":
            nodes[len(nodes) // 2].name += "_renamed"
        elif what == "moved bias 1% of its largest value":
            _set(m, _moved_biases(m)[2], lambda a: np.where(np.arange(a.size) == 0, a + np.float32(0.01) *
                                                             np.abs(a).max(), a).astype(a.dtype))

    problems = golden.compare(recorded, _mutated(model, change))
    assert problems, what


@pytest.mark.parametrize("qdq, caught", [
    ("qdq{method=percentile}", "relative bound"),  # instead of the default max: other activation scales
    ("qdq{bias_correct=false}", "other calibration-derived tensors"),  # biases as exported, and no shift
])
def test_another_qdq_option_fails(compiled, qdq, caught):
    source, folder, model = compiled
    other = folder / "other.onnx"
    golden.tqc("compile", str(source), "-p", f"fold,fuse,{qdq}", "--target", "trt", "-o", str(other),
               "--verify", "none", "--calib", str(golden.token_data(folder)), "--calib-samples", "16",
               "--batch-size", "8")
    problems = golden.compare(_fingerprint(model), golden.fingerprint(other))
    assert any(caught in p for p in problems), problems
