"""``fuse``: attention, GELU and (for ONNX Runtime) SkipLayerNormalization fusion, per target.

See ``attention.py`` and ``elementwise.py`` for the rewrites, ``attention_rules.py`` for the catalogue.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from tqc.compiler.graph_io import ensure_domain
from tqc.passes.base import Option, Pass, PassContext, PassResult, Tolerance, parse_bool
from tqc.passes.fuse.attention import (MaskCache, find_attention, mask_input_names, rewrite_ort, rewrite_trt)
from tqc.passes.fuse.elementwise import fuse_gelu, fuse_skip_layernorm
from tqc.passes.fuse.match import NoMatch
from tqc.passes.registry import register


@register
class Fuse(Pass):
    """Fuse attention blocks, GELU and residual LayerNorms into the ops the target runs fastest."""

    name = "fuse"
    options = {
        "attention": Option(parse_bool, True, "fuse attention blocks"),
        "gelu": Option(parse_bool, True, "fuse GELU (Gelu op at opset >= 20 for trt; contrib ops for ORT)"),
        "skip_layernorm": Option(parse_bool, True, "fuse Add + LayerNormalization (ORT targets)"),
    }
    tolerance = Tolerance(atol=1e-4, rtol=1e-4)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        target = ctx.target
        opset = int(graph.opset)
        stats: dict = {}
        softmax_count = sum(1 for n in graph.nodes if n.op == "Softmax")
        fused = 0
        misses = []
        if self.values["attention"]:
            matches, misses = find_attention(graph, mask_input_names(graph))
            masks = MaskCache(graph)
            for index, match in enumerate(matches):
                try:
                    (rewrite_trt if target == "trt" else rewrite_ort)(graph, match, index, masks)
                    fused += 1
                except NoMatch as miss:
                    ctx.note(f"fuse: attention at '{match.softmax.name}' matched rule '{match.rule.name}' but "
                             f"was not rewritten: {miss.reason}")
            rules = sorted({m.rule.name for m in matches})
            stats["attention_rules"] = ",".join(rules) if rules else "-"
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats["attention_blocks"] = softmax_count
        stats["attention"] = fused
        stats["attention_summary"] = f"{fused}/{softmax_count} attention fused"
        for miss in misses:
            message = (f"fuse: attention-shaped subgraph at Softmax '{miss.softmax}' not fused; closest rule "
                       f"'{miss.rule}': {miss.reason}")
            if "fuse" in ctx.explain:
                ctx.note(message)
        if self.values["gelu"]:
            exported_as_op = sum(1 for n in graph.nodes if n.op == "Gelu")  # opset 20 exports emit Gelu already
            gelus, reason = fuse_gelu(graph, target, opset)
            stats["gelu"] = gelus + exported_as_op
            if reason:
                ctx.note(f"fuse: gelu: {reason}")
        else:
            stats["gelu"] = 0
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats["skip_layernorm"] = 0
        if target != "trt" and self.values["skip_layernorm"]:
            stats["skip_layernorm"] = fuse_skip_layernorm(graph)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats["layernorm"] = sum(1 for n in graph.nodes if n.op == "LayerNormalization")
        stats["embed_layernorm"] = 0
        if target != "trt" and any(n.domain == "com.microsoft" for n in graph.nodes):
            ensure_domain(graph, "com.microsoft", 1)
        return PassResult(modified=fused > 0 or stats["gelu"] > 0 or stats["skip_layernorm"] > 0, stats=stats)
