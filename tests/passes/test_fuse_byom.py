"""Fusion on graphs tqc did not export: users' own torch.onnx.export scripts (custom input and output names,
no token_type_ids, pooling + L2 normalisation or task heads in the graph, both exporters).

Every fusion is checked by numbers: the pass manager runs the graph before and after ``fuse`` on ONNX Runtime
CPU (optimizations off) and the largest difference of every output must stay <= 1e-4.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from tqc.compiler.manager import PassManager
from tqc.compiler.model_io import load_model
from tqc.compiler.pipeline import parse_pipeline
from tqc.passes.base import PassContext

HEADS = {"hidden": ("AutoModel", ["hidden"]),
         "pool": ("AutoModel", ["sentence_embedding"]),
         "cls": ("AutoModelForSequenceClassification", ["logits"]),
         "token": ("AutoModelForTokenClassification", ["logits"]),
         "qa": ("AutoModelForQuestionAnswering", ["start_logits", "end_logits"])}


def user_export(path: Path, family: str, exporter: str = "legacy", attn: str = "sdpa", head: str = "pool",
                names: tuple[str, ...] = ("ids", "mask")) -> Path:
    """What a user's script writes: a wrapper module whose forward takes ``names`` positionally (ids, mask
    [, token types]) and calls the transformers model; ``head`` picks the outputs."""
    import torch
    import transformers

    from tqc.models.recipes import RECIPES

    torch.manual_seed(0)
    auto_class, output_names = HEADS[head]
    model = getattr(transformers, auto_class).from_config(RECIPES[family].config("tiny"),
                                                          attn_implementation=attn).eval()

    class UserModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, mask, types=None):
            kwargs = {"input_ids": ids, "attention_mask": mask}
            if types is not None:
                kwargs["token_type_ids"] = types
            out = self.model(**kwargs)
            if head == "hidden":
                return out.last_hidden_state
            if head == "pool":
                weights = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
                pooled = (out.last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2, dim=1)
            if head == "qa":
                return out.start_logits, out.end_logits
            return out.logits

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (2, 16), generator=generator)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    args = (ids, mask) if len(names) == 2 else (ids, mask, torch.zeros(2, 16, dtype=torch.long))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = {name: {0: "batch", 1: "sequence"} for name in names}
            axes.update({name: {0: "batch"} for name in output_names})
            torch.onnx.export(UserModule(), args, str(path), dynamo=False, opset_version=17, input_names=list(names),
                              output_names=output_names, dynamic_axes=axes)
        else:
            batch, sequence = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("sequence", min=2, max=100)
            program = torch.onnx.export(UserModule(), args, dynamo=True, opset_version=18, input_names=list(names),
                                        output_names=output_names,
                                        dynamic_shapes=tuple({0: batch, 1: sequence} for _ in names))
            program.save(str(path))
    return path


class UserExports:
    def __init__(self, root: Path):
        self.root, self.paths = root, {}

    def get(self, family: str, exporter: str = "legacy", attn: str = "sdpa", head: str = "pool",
            names: tuple[str, ...] = ("ids", "mask")) -> Path:
        key = (family, exporter, attn, head, names)
        if key not in self.paths:
            path = self.root / f"{family}-{exporter}-{attn}-{head}-{'_'.join(names)}.onnx"
            self.paths[key] = user_export(path, family, exporter, attn, head, names)
        return self.paths[key]


@pytest.fixture(scope="session")
def user_exports(tmp_path_factory) -> UserExports:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return UserExports(tmp_path_factory.mktemp("user_exports"))


def compile_with(path, pipeline: str, target: str, explain=("fuse",)):
    ctx = PassContext(target=target, explain=set(explain))
    manager = PassManager(parse_pipeline(pipeline), ctx, verify="numeric")
    model = manager.run(load_model(path))
    return model, manager, ctx


def assert_exact(record, outputs):
    numeric = record.verify["numeric"]
    assert numeric["passed"], numeric
    assert set(numeric["outputs"]) == set(outputs)
    for name in outputs:
        assert numeric["outputs"][name]["max_abs"] <= 1e-4, (name, numeric["outputs"][name])


WITH_AND_WITHOUT_TYPES = [("ids", "mask"), ("input_ids", "attention_mask"), ("ids", "mask", "types")]


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra", "albert"])
@pytest.mark.parametrize("names", WITH_AND_WITHOUT_TYPES, ids=lambda names: "-".join(names))
def test_embedding_fusion_is_exact_with_and_without_token_types(family, names, user_exports):
    """Regression (issue 10): an export without a token_type_ids input gathers a constant zeros buffer for
    the token types; fuse took that index for the position ids and dropped the token-type row (cosine 0.02)."""
    if family in ("roberta", "distilbert") and len(names) == 3:
        pytest.skip("RoBERTa and DistilBERT exports take no token types")
    path = user_exports.get(family, names=names)
    for target in ("ort-cpu", "ort-cuda", "trt"):
        model, manager, ctx = compile_with(path, "fuse", target)
        record = manager.records[0]
        assert_exact(record, ["sentence_embedding"])
        assert [o.name for o in model.graph.output] == ["sentence_embedding"]
        assert record.stats["attention"] == record.stats["attention_blocks"] == 2, (record.stats, ctx.messages)
        if target != "trt":
            assert record.stats["embed_layernorm"] == 1, ctx.messages
            embed = next(n for n in model.graph.node if n.op_type == "EmbedLayerNormalization")
            segment_used = len(embed.input) > 1 and embed.input[1] != ""
            assert segment_used == (len(names) == 3)  # only a real token-type input feeds the segment slot
