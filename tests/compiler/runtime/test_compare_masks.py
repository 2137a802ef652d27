"""Padding masks apply to token-level tensors only: a fixed axis 1 (a pooled [batch, hidden] embedding) is never
taken for a sequence axis, even when its size equals a batch's sequence length."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from polygraphy.comparator import IterationResult

from tqc.compiler.runtime.compare import compare_results, fixed_width_outputs
from tqc.passes.qdq.budget import mean_output_cosine


def _pair(ref: dict, cand: dict):
    return ("ref", [IterationResult(ref, runner_name="ref")]), ("cand", [IterationResult(cand, runner_name="cand")])


def test_fixed_width_outputs_from_declared_shapes():
    pooled = helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", 4])
    tokens = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", 4])
    unknown = helper.make_tensor_value_info("start_logits", TensorProto.FLOAT, None)
    assert fixed_width_outputs([pooled, tokens, unknown]) == {"sentence_embedding"}
    variables = [gs.Variable("sentence_embedding", np.float32, ["batch", 4]),
                 gs.Variable("last_hidden_state", np.float32, ["batch", "sequence", 4])]
    assert fixed_width_outputs(variables) == {"sentence_embedding"}


def test_a_pooled_output_as_wide_as_the_sequence_is_compared_whole():
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.int64)  # batch 2, sequence 4
    ref = np.ones((2, 4), np.float32)                                 # [batch, hidden=4]: no padding in it
    cand = ref.copy()
    cand[:, 3] = -5.0                                                  # wrong in the column the mask would hide
    ref_pair, cand_pair = _pair({"emb": ref}, {"emb": cand})
    hidden = compare_results(ref_pair, cand_pair, atol=0, rtol=0, min_cosine=0.99, masks=[mask])
    assert hidden.passed  # the old behaviour: the mask hid the wrong column
    whole = compare_results(ref_pair, cand_pair, atol=0, rtol=0, min_cosine=0.99, masks=[mask], unmasked={"emb"})
    assert not whole.passed and whole.outputs["emb"].cosine < 0.5
    feeds = [{"attention_mask": mask}]
    assert mean_output_cosine([{"emb": ref}], [{"emb": cand}], feeds) > 0.999
    assert mean_output_cosine([{"emb": ref}], [{"emb": cand}], feeds, unmasked={"emb"}) < 0.5
