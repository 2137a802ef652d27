"""qdq's SmoothQuant range cap (``smooth_cap``): a channel whose smoothed range x / s stands far above its layer's
others (MiniLM's FFN output layers keep one GELU channel at 3x the next after SmoothQuant's 0.75) takes the s
that brings it down to the cap quantile, the rest of its range moving into its weight row. Exact in float; kept
per layer only where it lowers the layer's output error on the calibration data, so a layer whose outlier
carries the weight scale keeps the plain vector."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tqc.compiler.core.errors import TqcError
from tqc.passes import Qdq
from tqc.passes.qdq.insert import Quantizer

from .test_qdq_ranges import TOLERANCE, minilm  # noqa: F401  (the fixture: fused MiniLM, held-out cosine)
from .test_qdq_shift import constants, linear_model, quantized, run

K, N = 128, 16


def outlier_model(outlier_row: float) -> onnx.ModelProto:
    """x [b, 3, K] -> MatMul(W) -> Add(b) -> y; the row of the outlier channel 7 scaled by ``outlier_row``."""
    weight = np.random.default_rng(3).standard_normal((K, N)).astype(np.float32) / 4
    weight[7] *= outlier_row
    return linear_model(weight, seed=4)


def feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """GELU-like channels (mostly near 0, rare large values); channel 7 reaches 400 on 3% of the tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = np.maximum(rng.standard_normal((32, 3, K)), -0.17).astype(np.float32)
        spikes = rng.random((32, 3)) < 0.03
        x[..., 7] = np.where(spikes, 400.0 + 10 * rng.standard_normal((32, 3)), x[..., 7])
        out.append({"x": x})
    return out


def factors(model: onnx.ModelProto) -> list[np.ndarray]:
    return [v for k, v in constants(model).items() if k.endswith("_factor")]


def test_the_cap_brings_outlier_channels_down_to_the_quantile_and_leaves_the_rest():
    act = np.array([1.0, 2.0, 1.5, 30.0, 1.2, 0.8, 2.5, 1.1], np.float64)
    weight = np.ones((8, 4))
    plain = Quantizer._factors(act, weight, 1, 0.75)
    capped = Quantizer._factors(act, weight, 1, 0.75, cap=0.75)
    ranges, capped_ranges = act / plain, act / capped
    limit = np.quantile(ranges, 0.75)
    np.testing.assert_allclose(capped_ranges.max(), limit, rtol=1e-9)  # the outliers come down to the quantile
    np.testing.assert_allclose(capped_ranges[ranges > limit], limit, rtol=1e-9)
    below = ranges <= limit
    np.testing.assert_array_equal(capped[below], plain[below])          # every other channel keeps its factor
    assert capped[3] > plain[3] * 1.5                                    # channel 3 moved into its weight row


@pytest.mark.parametrize("target, outlier_row, kept", [("trt", 1 / 50, True), ("trt", 1.0, False),
                                                       ("ort-cpu", 1.0, False)])
def test_the_cap_is_kept_only_where_it_lowers_the_layer_output_error(target, outlier_row, kept):
    """A small weight row takes the outlier's range at little cost to the weight scales: capped (on trt's
    symmetric INT8; ort-cpu's asymmetric UINT8 with the same data keeps it plain). A row as large as the others
    becomes every column's largest and coarsens all of them: left plain."""
    model = outlier_model(outlier_row)
    calib = feeds(4, 0)
    plain, _ = quantized(model, target, "qdq{smooth_cap=1,split=false}", calib)  # the cap alone
    capped, stats = quantized(model, target, "qdq{smooth_cap=0.9,split=false}", calib)
    assert [n.op_type for n in capped.graph.node] == [n.op_type for n in plain.graph.node]  # the same graph
    assert stats["smooth_capped"] == int(kept), stats
    assert np.array_equal(factors(capped)[0], factors(plain)[0]) != kept

    def error(q: onnx.ModelProto) -> float:  # on the calibration data, the mean error taken out (bias correction)
        diffs = np.concatenate([(run(q, f) - run(model, f)).reshape(-1, N) for f in calib])
        return float(((diffs - diffs.mean(0)) ** 2).sum())

    if kept:
        print(target, error(plain), error(capped))
        assert error(capped) < error(plain)


def test_the_default_cap_on_minilm_changes_smoothing_factors_only_and_keeps_fidelity(minilm, monkeypatch):  # noqa: F811
    import dataclasses

    import tqc.compiler.core.target as target

    # Every smoothing factor a Mul: ort-cpu otherwise folds the attention output's into QAttention's value scales
    # (passes/qdq/shift_fold.py), which the QKV layer's smoothing changes too
    monkeypatch.setitem(target.BY_NAME, "ort-cpu", dataclasses.replace(target.ORT_CPU, shift_folded=False))
    base_model, base_stats, base_cosine = minilm("qdq{smooth_cap=1}")
    model, stats, cosine = minilm("qdq")  # smooth_cap=0.99 by default
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in base_model.graph.node]
    assert "smooth_capped" not in base_stats and stats["smooth_capped"] >= 1, stats
    changed = [i for i, (a, b) in enumerate(zip(factors(base_model), factors(model))) if not np.array_equal(a, b)]
    assert len(changed) == stats["smooth_capped"], (changed, stats)
    print(f"smooth_cap=0.99: held-out mean cosine {cosine:.5f} (default {base_cosine:.5f}), "
          f"{stats['smooth_capped']} layers capped")
    assert cosine >= base_cosine - TOLERANCE, (cosine, base_cosine)


@pytest.mark.parametrize("options, message", [({"smooth_cap": 0.2}, r"smooth_cap.*0\.5"),
                                              ({"smooth_cap": 1.5}, r"smooth_cap.*1"),
                                              ({"smooth_cpa": 0.99}, "did you mean 'smooth_cap'")])
def test_a_cap_out_of_range_or_mistyped_is_refused_in_one_line(options, message):
    with pytest.raises(TqcError, match=message):
        Qdq(**options)
