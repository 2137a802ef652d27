"""``pool``: sentence-embedding pooling and L2 normalisation inside the graph, so the model returns [batch, hidden].

Before                                        After (mode=mean, normalize=true)
  ... ─► last_hidden_state [B,S,H]              ... ─► last_hidden_state ─► Mul ─► ReduceSum(1) ─► Div ─► Div ─► sentence_embedding [B,H]
                                                attention_mask ─► Cast ─► Unsqueeze ─┘   count ─► Max(1e-9) ┘  ReduceL2 ─► Max(1e-12) ┘

As sentence-transformers computes it: ``mean`` = sum(h * mask, 1) / clamp(sum(mask, 1), 1e-9) (padded positions
ignored), ``cls`` = h[:, 0], ``max`` = max over positions with padded ones set to -1e9; ``normalize`` is
torch.nn.functional.normalize: x / max(||x||_2, 1e-12). Standard ONNX ops only, written for the graph's opset
(axes as attributes or inputs), so every target runs them. Pooling runs in FP32: an FP16 token output is cast
first (after ``fp16`` the token output is already FP32, cast from the FP16 graph), and the pooled output is FP32.

The attention mask is the input whose role is attention_mask (``runtime.feeds.input_roles``: the graph's
evidence, then the name). The token output stays a graph output only with ``keep_tokens``. A model that
already returns the pooled output (a sentence-transformers export's ``sentence_embedding``, pooled by the folder's
own modules) is left as it is, with a note: its own pooling is the model's definition, which pool's options
could only contradict; pool refuses there when mode or normalize differ from their defaults.

The written model records what it pools in its metadata (``tqc.pool``: output, mode, normalize, source), so
``tqc serve`` returns that output as the embedding and pools nothing on the host.

Verification: the pooled output is judged against numpy pooling of the token output of the graph before
(``reference``), at 1e-5; the other outputs as usual.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.core.errors import TqcError, did_you_mean
from tqc.compiler.io.graph import skeleton_of_graph
from tqc.compiler.runtime.feeds import input_roles
from tqc.passes.base import AddedOutput, Condition, Option, Pass, PassContext, PassResult, Tolerance, parse_bool
from tqc.passes.rewrite import cleanup, produce

MODES = ("mean", "cls", "max")
MASK_EPS = 1e-9      # sentence-transformers' clamp of the token count
NORM_EPS = 1e-12     # torch.nn.functional.normalize's eps
MAX_FILL = -1e9      # sentence-transformers' value for padded positions under max pooling
AXES_INPUT_OPSET = {"ReduceSum": 13, "Unsqueeze": 13, "ReduceMax": 18, "ReduceMean": 18, "ReduceL2": 18}
FLOATS = (np.float32, np.float16)
METADATA_KEY = "tqc.pool"  # JSON {output, mode, normalize, source}: what the graph pools (tqc serve reads it)


def pool_reference(tokens: np.ndarray, mask: np.ndarray | None, mode: str, normalize: bool) -> np.ndarray:
    """sentence-transformers' pooling (and ``F.normalize``) in numpy, in FP32: the verification reference."""
    h = np.asarray(tokens, dtype=np.float32)
    m = np.ones(h.shape[:2], np.float32) if mask is None else np.asarray(mask).astype(np.float32)
    if mode == "cls":
        out = h[:, 0]
    elif mode == "max":
        out = np.where(m[:, :, None] > 0, h, np.float32(MAX_FILL)).max(axis=1)
    else:
        out = (h * m[:, :, None]).sum(axis=1) / np.maximum(m.sum(axis=1, keepdims=True), np.float32(MASK_EPS))
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(NORM_EPS))
    return out.astype(np.float32)


def _reference(outputs: dict, feed: dict, source: str, mask: str | None, mode: str, normalize: bool) -> np.ndarray:
    return pool_reference(outputs[source], feed[mask] if mask is not None else None, mode, normalize)


def _rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) in [np.dtype(f) for f in FLOATS]


def _describe(tensor: gs.Tensor) -> str:
    dims = "x".join(str(d) for d in tensor.shape) if tensor.shape is not None else "?"
    dtype = np.dtype(tensor.dtype).name if tensor.dtype is not None else "?"
    return f"'{tensor.name}' [{dims}] {dtype}"


class _Builder:
    """Adds pooling nodes with fresh names, in the forms the graph's opset takes."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph = graph
        self.prefix = prefix
        self.opset = int(graph.opset or 13)
        self.taken = set(graph.tensors())
        self.count = 0

    def _name(self, what: str) -> str:
        while True:
            self.count += 1
            name = f"{self.prefix}/{what}_{self.count}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def const(self, what: str, value) -> gs.Constant:
        return gs.Constant(self._name(what), np.asarray(value))

    def op(self, op: str, inputs: list, attrs: dict | None = None, dtype=np.float32, out: gs.Variable | None = None,
           axes: list[int] | None = None) -> gs.Variable:
        attrs = dict(attrs or {})
        inputs = list(inputs)
        if axes is not None:
            if self.opset >= AXES_INPUT_OPSET[op]:
                inputs.append(self.const("axes", np.array(axes, np.int64)))
            else:
                attrs["axes"] = list(axes)
        output = out if out is not None else gs.Variable(self._name(op.lower()), dtype=dtype)
        produce(self.graph, op, self._name(op), inputs, [output], attrs=attrs)
        return output


def build_pooling(graph: gs.Graph, tokens: gs.Tensor, mask: gs.Tensor | None, mode: str, normalize: bool,
                  output: gs.Variable, prefix: str = "pool") -> int:
    """Nodes computing ``output`` [batch, hidden] (FP32) from ``tokens`` [batch, seq, hidden]; returns how many."""
    b = _Builder(graph, prefix)
    before = len(graph.nodes)
    h = tokens
    if np.dtype(tokens.dtype) != np.float32:
        h = b.op("Cast", [tokens], {"to": 1})
    last = output if not normalize else None
    if mode == "cls":
        pooled = b.op("Gather", [h, b.const("first", np.array(0, np.int64))], {"axis": 1}, out=last)
    elif mask is None:  # no mask input: every position is a token
        pooled = b.op("ReduceMean" if mode == "mean" else "ReduceMax", [h], {"keepdims": 0}, axes=[1], out=last)
    else:
        m = b.op("Cast", [mask], {"to": 1})
        m3 = b.op("Unsqueeze", [m], axes=[2])
        if mode == "mean":
            summed = b.op("ReduceSum", [b.op("Mul", [h, m3])], {"keepdims": 0}, axes=[1])
            count = b.op("ReduceSum", [m], {"keepdims": 1}, axes=[1])
            count = b.op("Max", [count, b.const("mask_eps", np.array(MASK_EPS, np.float32))])
            pooled = b.op("Div", [summed, count], out=last)
        else:
            keep = b.op("Greater", [m3, b.const("zero", np.array(0, np.float32))], dtype=np.bool_)
            filled = b.op("Where", [keep, h, b.const("fill", np.array(MAX_FILL, np.float32))])
            pooled = b.op("ReduceMax", [filled], {"keepdims": 0}, axes=[1], out=last)
    if normalize:
        norm = b.op("ReduceL2", [pooled], {"keepdims": 1}, axes=[1])
        norm = b.op("Max", [norm, b.const("norm_eps", np.array(NORM_EPS, np.float32))])
        b.op("Div", [pooled, norm], out=output)
    return len(graph.nodes) - before


POOLED_TEXT = "the pooled output (option output) is a float32 [batch, hidden] graph output"


def _pooled_output(graph: gs.Graph, ctx: PassContext, name: str) -> str | None:
    tensor = next((t for t in graph.outputs if t.name == name), None)
    if tensor is None:
        return f"no graph output '{name}'"
    ok = tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32 and _rank(tensor) == 2
    return None if ok else f"it is {_describe(tensor)}"


def _mask_input(graph: gs.Graph) -> gs.Tensor | None:
    roles = input_roles(skeleton_of_graph(graph))
    return next((t for t in graph.inputs if roles.get(t.name) == "attention_mask" and _rank(t) == 2), None)


class Pool(Pass):
    """Pool token outputs into [batch, hidden] sentence embeddings (mean/cls/max, L2-normalised) in the graph."""

    name = "pool"
    options = {
        "mode": Option(str, "mean", "mean over the attention mask, the first token (cls), or max over real tokens",
                       choices=MODES),
        "normalize": Option(parse_bool, True, "L2-normalise the pooled vector (torch.nn.functional.normalize)"),
        "output": Option(str, "sentence_embedding", "name of the pooled [batch, hidden] output"),
        "source": Option(str, "", "the token-level float output to pool (default: the one [batch, seq, hidden] "
                                  "output)"),
        "keep_tokens": Option(parse_bool, False, "keep the token output as a graph output too"),
    }
    requires = (Condition("a float [batch, sequence, hidden] graph output to pool", lambda graph, ctx: next(
        (None for t in graph.outputs if _is_float(t) and _rank(t) == 3),
        f"the graph's outputs are {', '.join(_describe(t) for t in graph.outputs)}")),)
    tolerance = Tolerance(atol=1e-5, rtol=1e-5)  # FP32 pooling of the same token output: rounding only

    ensures = (Condition(POOLED_TEXT, partial(_pooled_output, name="sentence_embedding")),)

    def __init__(self, **values):
        super().__init__(**values)
        if not self.values["output"].strip():
            raise TqcError("option 'output' of pass 'pool' must be a name, got ''")
        self.ensures = (Condition(POOLED_TEXT, partial(_pooled_output, name=self.values["output"])),)

    def _source(self, graph: gs.Graph) -> gs.Tensor:
        outputs = {t.name: t for t in graph.outputs}
        wanted = self.values["source"]
        if wanted:
            if wanted not in outputs:
                raise TqcError(f"pass 'pool': source '{wanted}' is not a graph output{did_you_mean(wanted, outputs)}")
            tensor = outputs[wanted]
            if not (_is_float(tensor) and _rank(tensor) == 3):
                raise TqcError(f"pass 'pool': source {_describe(tensor)} is not a float [batch, sequence, hidden] "
                               f"output")
            return tensor
        candidates = [t for t in graph.outputs if _is_float(t) and _rank(t) == 3]
        if len(candidates) == 1:  # ``requires`` holds: there is at least one
            return candidates[0]
        raise TqcError(f"pass 'pool': which output to pool is ambiguous: {', '.join(_describe(t) for t in candidates)}"
                       f"; give source=NAME")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        mode, normalize, name = self.values["mode"], self.values["normalize"], self.values["output"]
        tokens = self._source(graph)
        existing = next((t for t in graph.outputs if t.name == name), None)
        if existing is not None:
            return self._already_pooled(existing, ctx)
        if name in graph.tensors():
            raise TqcError(f"pass 'pool': output name '{name}' is already a tensor of the graph; give output=NAME")
        mask = _mask_input(graph) if mode != "cls" else None
        if mask is None and mode != "cls":
            ctx.note(f"pool: the model has no attention-mask input: {mode} pooling counts every position")
        pooled = gs.Variable(name, dtype=np.float32, shape=[tokens.shape[0], tokens.shape[2]])
        added = build_pooling(graph, tokens, mask, mode, normalize, pooled)
        index = graph.outputs.index(tokens)
        keep = self.values["keep_tokens"]
        graph.outputs[index:index + 1] = [tokens, pooled] if keep else [pooled]
        cleanup(graph)
        how = (f"{mode} of {tokens.name!r}{' over ' + repr(mask.name) if mask is not None else ''}"
               f"{', L2-normalised' if normalize else ''}")
        if "pool" in ctx.explain:
            ctx.note(f"pool: {_describe(tokens)} -> {_describe(pooled)}: {how}, {added} node(s), opset "
                     f"{graph.opset}{'; the token output is kept' if keep else ''}")
        reference = partial(_reference, source=tokens.name, mask=mask.name if mask is not None else None,
                            mode=mode, normalize=normalize)
        return PassResult(True, {"source": tokens.name, "output": name, "mode": mode, "normalize": normalize,
                                 "mask": mask.name if mask is not None else None, "nodes_added": added,
                                 "tokens_kept": keep},
                          removed_outputs=() if keep else (tokens.name,),
                          added_outputs=(AddedOutput(name, reference, f"numpy {how}"),),
                          metadata={METADATA_KEY: json.dumps({"output": name, "mode": mode, "normalize": normalize,
                                                              "source": tokens.name}),
                                    # the export's list of outputs follows the graph (it named the token output)
                                    "tqc.outputs": ",".join(o.name for o in graph.outputs)})

    def _already_pooled(self, existing: gs.Tensor, ctx: PassContext) -> PassResult:
        if not (_is_float(existing) and _rank(existing) == 2):
            raise TqcError(f"pass 'pool': output name '{existing.name}' is taken by the graph output "
                           f"{_describe(existing)}; give output=NAME")
        changed = [k for k in ("mode", "normalize") if self.values[k] != self.options[k].default]
        if changed:
            raise TqcError(f"pass 'pool': the model already returns the pooled output {_describe(existing)} "
                           f"(its own pooling); {', '.join(changed)} cannot apply to it: give output=NAME to pool "
                           f"the token output into another output")
        ctx.note(f"pool: the model already returns the pooled output {_describe(existing)} (a sentence-transformers "
                 f"export pools with its own modules); the graph is left as it is")
        return PassResult(False, {"output": existing.name, "already_pooled": True})
