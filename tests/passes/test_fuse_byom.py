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

from tqc.compiler.analysis.calib_data import read_sentences
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext

from ..conftest import CALIB_SENTENCES, HELDOUT_SENTENCES

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


# --- Third-party fixtures made by the real tools (tests/fixtures/byom: Optimum, sentence-transformers) ---

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "byom"


def _manifest() -> list[dict]:
    import json

    path = FIXTURES / "manifest.json"
    return json.loads(path.read_text())["fixtures"] if path.exists() else []


def _fixture_path(entry: dict) -> Path:
    path = FIXTURES / entry["onnx"]
    if not path.exists():
        pytest.skip(f"fixture graph {path} is not there (made by tests/fixtures/byom/make_fixtures.py)")
    return path


def run_ort(model_or_path, feed: dict) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})))


@pytest.mark.parametrize("entry", _manifest(), ids=lambda entry: entry["name"])
@pytest.mark.parametrize("target", ["trt", "ort-cpu", "ort-cuda"])
def test_third_party_exports_fuse_every_attention_exactly(entry, target):
    """Optimum (every task) and sentence-transformers graphs: N/N attention fused with ``fuse`` alone, exact
    against the graph before the pass and against PyTorch on real-sentence inputs; heads and names kept."""
    path = _fixture_path(entry)
    expected = np.load(FIXTURES / entry["name"] / "expected.npz")
    feed = {key.split(":", 1)[1]: value for key, value in expected.items() if key.startswith("input:")}
    torch_outputs = {key.split(":", 1)[1]: value for key, value in expected.items() if key.startswith("torch:")}
    original = onnx.load(str(path))
    output_names = [o.name for o in original.graph.output]
    model, manager, ctx = compile_with(path, "fuse", target)
    stats = manager.records[0].stats
    layers = sum(n.op_type == "Softmax" for n in original.graph.node)
    assert layers >= 2 and stats["attention_summary"] == f"{layers}/{layers} attention fused", ctx.messages
    assert_exact(manager.records[0], output_names)
    assert [o.name for o in model.graph.output] == output_names
    if target != "trt":
        assert stats["embed_layernorm"] == 1, ctx.messages
    fused = run_ort(model, feed)
    compared = [name for name in torch_outputs if name in fused]  # the ONNX backend pools outside the graph
    assert compared
    for name in compared:
        assert np.abs(fused[name] - torch_outputs[name]).max() <= 1e-4, name


def _swap_operand_order(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every commutative operand pair the attention rules read swapped (scale Muls,
    mask Add): what another exporter version may write."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    softmax_inputs = {n.input[0] for n in model.graph.node if n.op_type == "Softmax"}
    producers = {o: n for n in model.graph.node for o in n.output}
    score_matmuls = {producers[t].input[0] for t in softmax_inputs if producers[t].op_type == "Add"} | \
        {producers[t].input[1] for t in softmax_inputs if producers[t].op_type == "Add"}
    scale_muls = set()
    for name in score_matmuls:
        node = producers.get(name)
        if node is not None and node.op_type == "MatMul":
            scale_muls |= {n.output[0] for n in (producers.get(node.input[0]), producers.get(node.input[1]))
                           if n is not None and n.op_type == "Mul"}
    assert scale_muls
    for node in model.graph.node:
        if (node.output[0] in softmax_inputs and node.op_type == "Add") or node.output[0] in scale_muls:
            node.input[0], node.input[1] = node.input[1], node.input[0]
    return model


@pytest.mark.parametrize("name", ["optimum-bert-feature-extraction", "optimum-distilbert-text-classification"])
def test_sdpa_legacy_4x_rule_operand_orders(name, tmp_path):
    """The rule for transformers < 4.58 sdpa (Optimum): sqrt(scale) computed from Shape(Q)[-1], on Q and
    on K^T; the same graph with Mul(scale, x) and Add(mask, scores) operand orders fuses just as exactly."""
    entry = next((e for e in _manifest() if e["name"] == name), None)
    if entry is None:
        pytest.skip(f"fixture {name} not in the manifest")
    path = _fixture_path(entry)
    swapped = tmp_path / "swapped.onnx"
    onnx.save(_swap_operand_order(onnx.load(str(path))), str(swapped))
    for source in (path, swapped):
        for target in ("trt", "ort-cpu"):
            _, manager, ctx = compile_with(source, "fuse", target)
            stats = manager.records[0].stats
            assert stats["attention_rules"] == "sdpa-legacy-4x" and stats["attention"] == 2, ctx.messages
            assert_exact(manager.records[0], entry["outputs"] if isinstance(entry["outputs"][0], str)
                         else [o["name"] for o in entry["outputs"]])


USER_CASES = [("bert", "dynamo", "sdpa", "pool", ("ids", "mask")),
              ("bert", "dynamo", "eager", "cls", ("ids", "mask", "types")),
              ("bert", "legacy", "eager", "qa", ("ids", "mask")),
              ("roberta", "legacy", "sdpa", "token", ("ids", "mask")),
              ("roberta", "dynamo", "sdpa", "hidden", ("input_ids", "attention_mask")),
              ("distilbert", "legacy", "sdpa", "cls", ("ids", "mask")),
              ("distilbert", "dynamo", "sdpa", "qa", ("ids", "mask")),
              ("albert", "dynamo", "sdpa", "token", ("ids", "mask")),
              ("electra", "legacy", "sdpa", "qa", ("ids", "mask", "types"))]


@pytest.mark.parametrize("family, exporter, attn, head, names", USER_CASES,
                         ids=lambda value: "-".join(value) if isinstance(value, tuple) else str(value))
def test_user_exports_with_heads_fuse_exactly(family, exporter, attn, head, names, user_exports):
    """Users' torch.onnx.export scripts: custom names, task heads, both exporters; N/N fused, outputs kept."""
    path = user_exports.get(family, exporter=exporter, attn=attn, head=head, names=names)
    outputs = HEADS[head][1]
    for target in ("trt", "ort-cpu"):
        model, manager, ctx = compile_with(path, "fuse", target)
        stats = manager.records[0].stats
        assert stats["attention_summary"] == "2/2 attention fused", ctx.messages
        assert_exact(manager.records[0], outputs)
        assert [o.name for o in model.graph.output] == outputs
        if target != "trt":
            assert stats["embed_layernorm"] == 1, ctx.messages




def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


@pytest.mark.parametrize("name", ["optimum-bert-text-classification", "st-bert-optimum-pooled",
                                  "optimum-roberta-token-classification"])
@pytest.mark.parametrize("target", ["ort-cpu", "trt"])
def test_int8_on_third_party_exports_keeps_cosine(name, target, tmp_path):
    """fold,fuse,qdq calibrated on the first 32 packaged sentences, judged on the last 64 held-out ones: every output
    keeps cosine >= 0.99 to the FP32 graph (token-level outputs over real tokens only)."""
    entry = next((e for e in _manifest() if e["name"] == name), None)
    if entry is None:
        pytest.skip(f"fixture {name} not in the manifest")
    path = _fixture_path(entry)
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from tqc.compiler.cli.main import main

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(read_sentences(CALIB_SENTENCES, limit=32)) + "\n")
    lines = read_sentences(HELDOUT_SENTENCES)[-64:]
    output = tmp_path / "int8.onnx"
    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", str(path), "-p", "fold,fuse,qdq", "--target", target, "--calib", str(calib),
              "--tokenizer", str(path.parent if path.parent.name != "onnx" else path.parent.parent),
              "-o", str(output)])
    assert info.value.code == 0
    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURES / name), local_files_only=True)
    inputs = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    cosines = {}
    for start in range(0, len(lines), 16):
        batch = tokenizer(lines[start:start + 16], padding=True, truncation=True, max_length=64, return_tensors="np")
        feed = {key: value.astype(np.int64) for key, value in batch.items() if key in inputs}
        reference, quantized = run_ort(path, feed), run_ort(output, feed)
        valid = feed["attention_mask"].astype(bool)
        for out_name, ref in reference.items():
            got = quantized[out_name]
            token_level = ref.ndim >= 3 or out_name.endswith(("start_logits", "end_logits"))
            if token_level:  # real tokens only
                ref, got = ref[valid], got[valid]
            cosines.setdefault(out_name, []).append((ref, got))
    for out_name, parts in cosines.items():
        cosine = _cosine(np.concatenate([r.reshape(-1) for r, _ in parts]),
                         np.concatenate([g.reshape(-1) for _, g in parts]))
        print(f"{name} {target} INT8 {out_name}: cosine {cosine:.5f} on {len(lines)} held-out sentences")
        assert cosine >= 0.99, (out_name, cosine)


def _computed_embedding_indices(model: onnx.ModelProto, position_start: int) -> onnx.ModelProto:
    """The token-type Gather reads Mul(ids, 0) (all zeros, but computed) and, when ``position_start`` is not 0,
    the position Gather reads Slice(arange) from ``position_start``: indices whose meaning is not proven."""
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    gathers = {n.name: n for n in model.graph.node if n.op_type == "Gather"}
    type_gather = next(n for n in gathers.values() if "token_type" in n.input[0])
    position_gather = next(n for n in gathers.values() if "position_embeddings" in n.input[0])
    ids = model.graph.input[0].name
    model.graph.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), "tqc_test_zero"),
                                    numpy_helper.from_array(np.arange(128, dtype=np.int64)[None], "tqc_test_arange"),
                                    numpy_helper.from_array(np.array([position_start], np.int64), "tqc_test_start"),
                                    numpy_helper.from_array(np.array([1], np.int64), "tqc_test_axis")])
    new = [helper.make_node("Mul", [ids, "tqc_test_zero"], ["tqc_test_types"]),
           helper.make_node("Shape", [ids], ["tqc_test_length"], start=1, end=2),
           helper.make_node("Add", ["tqc_test_length", "tqc_test_start"], ["tqc_test_end"]),
           helper.make_node("Slice", ["tqc_test_arange", "tqc_test_start", "tqc_test_end", "tqc_test_axis"],
                            ["tqc_test_positions"])]
    type_gather.input[1] = "tqc_test_types"
    position_gather.input[1] = "tqc_test_positions"
    nodes = new + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("position_start", [0, 1])
def test_embedding_fusion_refuses_what_it_cannot_prove(position_start, user_exports, tmp_path):
    """Start 0: positions proven 0..S-1, the computed token types go to the segment slot (exact). Start 1: no
    Gather is proven to hold positions, so nothing is fused and --explain fuse says why; exact either way."""
    source = user_exports.get("bert", names=("ids", "mask"), head="hidden")
    path = tmp_path / "computed.onnx"
    onnx.save(_computed_embedding_indices(onnx.load(str(source)), position_start), str(path))
    model, manager, ctx = compile_with(path, "fuse", "ort-cpu")
    assert_exact(manager.records[0], ["hidden"])
    stats = manager.records[0].stats
    if position_start == 0:
        assert stats["embed_layernorm"] == 1, ctx.messages
        embed = next(n for n in model.graph.node if n.op_type == "EmbedLayerNormalization")
        assert embed.input[1] != ""  # the computed token types feed the segment slot
    else:
        assert stats["embed_layernorm"] == 0
        assert any("none or several are proven to be positions 0..S-1" in m for m in ctx.messages), ctx.messages


def test_mask_found_by_role_when_not_named_mask(user_exports):
    """A signature ``ids, am``: the mask is the 2-D integer input that indexes no embedding Gather. (The
    verification feeds draw 'am' as token ids, so this compares on 0/1 masks with padding itself.)"""
    path = user_exports.get("bert", names=("ids", "am"))
    rng = np.random.default_rng(0)
    feed = {"ids": rng.integers(5, 1000, (3, 16)), "am": np.ones((3, 16), np.int64)}
    feed["am"][1, 10:] = 0
    feed["am"][2, 3:] = 0
    reference = run_ort(path, feed)["sentence_embedding"]
    for target in ("trt", "ort-cpu", "ort-cuda"):
        ctx = PassContext(target=target, explain={"fuse"})
        manager = PassManager(parse_pipeline("fuse"), ctx, verify="structure")
        model = manager.run(load_model(path))
        assert manager.records[0].stats["attention_summary"] == "2/2 attention fused", ctx.messages
        assert np.abs(run_ort(model, feed)["sentence_embedding"] - reference).max() <= 1e-4
