"""Token samples of linear-layer inputs: real tokens only (the attention mask), bounded per tensor and in bytes."""

from __future__ import annotations

import numpy as np

from tqc.compiler.analysis.layer_inputs import Sampler, token_limit


def test_samples_keep_the_real_tokens_only_and_stop_at_the_limit():
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int64)
    value = rng.normal(size=(2, 4, 3)).astype(np.float32)
    sampler = Sampler({"h": 3, "other": 5}, max_tokens=7)
    feeds = [{"input_ids": np.zeros((2, 4), np.int64), "attention_mask": mask}] * 3
    for _ in sampler.track(feeds):
        sampler.observe("h", value)
        sampler.observe("other", value)   # last axis 3, not its width 5: left out
        sampler.observe("unknown", value)
    samples = sampler.samples()
    assert set(samples) == {"h"}
    real = value[mask.astype(bool)]       # 5 real tokens per batch
    np.testing.assert_array_equal(samples["h"], np.concatenate([real, real])[:7])


def test_the_token_limit_bounds_the_bytes_of_all_samples():
    widths = {"a": 768, "b": 3072}
    limit = token_limit(widths, max_tokens=4096, max_bytes=8 << 20)
    assert limit * 4 * (768 + 3072) <= 8 << 20 < (limit + 1) * 4 * (768 + 3072)
    assert token_limit({"a": 4}, max_tokens=100) == 100
