"""``fuse``: attention, GELU and (for ONNX Runtime) residual LayerNorm fusion, per target.

One rule engine (``engine.py``) runs every fusion's catalogue: ``attention.py`` (its rewrites in
``attention_rewrite.py``, its masks in ``masks.py``), ``core_attention.py`` (cores on heads split elsewhere:
ModernBERT), ``rotary.py``, ``gelu.py``, ``layernorm.py``, ``skip_layernorm.py``;
``embed_layernorm.py`` proves each embedding Gather's meaning instead. Layout rewrites after the fusions:
``head_layout.py`` (MultiHeadAttention and RotaryEmbedding on [B, S, hidden]), ``slices.py`` (sibling Slices
-> one Split), ``shared_positions.py`` (DeBERTa's position projections broadcast, not repeated;
``scale_into_weights.py`` then folds the scores' scale into them). On targets that capture CUDA graphs,
``host_free.py`` then rewrites the shape arithmetic ONNX Runtime CUDA would run on the CPU (DeBERTa's), and
``transposed_scores.py`` computes DeBERTa's p2c scores so that no Transpose follows their gather. ``--explain
fuse`` names, for every anchor left unfused (a Softmax, an Erf/Tanh, a LayerNorm-shaped ReduceMean, a residual
Add before a LayerNorm), the closest rule and the step where it stopped::

    fuse: gelu: Erf 'e' not fused; closest rule 'erf': step 2 (plus_one: Add(1) either order): Add 'a' adds 2, not 1
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.io.graph import ensure_domain
from tqc.passes.base import NO_CONTRIB_OPS, Option, Pass, PassContext, PassResult, Tolerance, parse_bool
from tqc.passes.fold import Fold
from tqc.passes.fuse.attention import find_attention
from tqc.passes.fuse.attention_rewrite import rewrite_contrib, rewrite_standard
from tqc.passes.fuse.core_attention import fuse_core_attention
from tqc.passes.fuse.embed_layernorm import fuse_embed_layernorm
from tqc.passes.fuse.engine import Miss, NoMatch
from tqc.passes.fuse.gelu import fuse_gelu
from tqc.passes.fuse.head_layout import flatten_heads
from tqc.passes.fuse.host_free import host_placed, remove_host_shapes
from tqc.passes.fuse.layernorm import fuse_layernorm
from tqc.passes.fuse.masks import MaskCache, mask_input_names
from tqc.passes.fuse.rotary import CACHE_POSITIONS, fuse_rotary
from tqc.passes.fuse.scale_into_weights import scale_into_weights
from tqc.passes.fuse.shared_positions import share_position_projections
from tqc.passes.fuse.skip_layernorm import fuse_skip_layernorm
from tqc.passes.fuse.slices import split_sibling_slices
from tqc.passes.fuse.transposed_scores import transpose_scores
from tqc.passes.rewrite import cleanup, drop, redirect


def lower_constant_nodes(graph: gs.Graph) -> int:
    """Constant nodes -> constant tensors (what the rules match scalars and shapes against)."""
    count = 0
    for node in list(graph.nodes):
        if node.op == "Constant" and "value" in node.attrs and len(node.outputs) == 1:
            out = node.outputs[0]
            value = node.attrs["value"]
            redirect(out, gs.Constant(out.name, np.asarray(value.values)))
            if out in graph.outputs:
                continue
            drop(node)
            count += 1
    if count:
        cleanup(graph, toposort=False)
    return count


def explain_misses(ctx: PassContext, what: str, misses: list[Miss], separator: str = ": ") -> None:
    """One ``--explain fuse`` line per anchor no rule matched."""
    if "fuse" in ctx.explain:
        for miss in misses:
            ctx.note(f"fuse: {what}{separator}{miss.anchor} not fused; closest rule '{miss.rule}': {miss.reason}")


def canonicalize(graph: gs.Graph) -> int:
    """``fold``'s canonical form (Identity removal, constant folding), so ``fuse`` works alone; returns the
    number of nodes removed (0 when ``fold`` ran before)."""
    before = len(graph.nodes)
    Fold().run(graph, PassContext())
    return before - len(graph.nodes)


TOKEN_COUNTS_NOTE = ("fuse: attention masks given as token counts (right padding); use fuse{mask=raw} for "
                     "left-padded inputs")


class Fuse(Pass):
    """Fuse attention blocks, GELU and residual LayerNorms into the ops the target runs fastest."""

    name = "fuse"
    ensures = (NO_CONTRIB_OPS,)  # trt and openvino get standard ONNX ops only
    options = {
        "attention": Option(parse_bool, True, "fuse attention blocks"),
        "canonicalize": Option(parse_bool, True, "fold constants and Identity aliases first (what fold does), so "
                               "fuse works alone"),
        "gelu": Option(parse_bool, True, "fuse GELU (Gelu op at opset >= 20 for trt; contrib ops for ORT)"),
        "layernorm": Option(parse_bool, True, "decomposed LayerNorms (ReduceMean, Sub, Pow, ..., Add) into "
                            "LayerNormalization (opset >= 17; older opsets: only residual ones, for ORT)"),
        "skip_layernorm": Option(str, "auto", "residual Add + LayerNormalization (ORT targets): 'contrib' "
                                 "(SkipLayerNormalization), 'sum' (Sum + LayerNormalization: 2.5x faster on ORT "
                                 "CPU), 'auto' (sum on ort-cpu, contrib on ort-cuda), 'off'",
                                 choices=("auto", "contrib", "sum", "off")),
        "embed_layernorm": Option(parse_bool, True, "fuse BERT-style embeddings + LayerNorm (ORT targets)"),
        "rotary": Option(parse_bool, True, "rotary position embeddings (rotate-half) into RotaryEmbedding (ORT "
                         "targets)"),
        "flat_heads": Option(parse_bool, True, "attention on heads split elsewhere (ModernBERT) runs on [B, S, hidden] "
                             "(RotaryEmbedding with num_heads, 3-D MultiHeadAttention): no head split and merge around "
                             "it (ORT targets)"),
        "shared_positions": Option(parse_bool, True, "DeBERTa's position projections as one constant that MatMul "
                                   "broadcasts, not repeated per batch row (ORT targets)"),
        "rotary_positions": Option(int, CACHE_POSITIONS, "positions the RotaryEmbedding caches hold (longer "
                                   "sequences are an error in ONNX Runtime)", min=16, max=1 << 20),
        "mask": Option(str, "auto", "ORT attention mask: 'raw' ([B,S] 0/1, any padding), 'end' (token counts: "
                       "right padding only, enables ORT's fused CUDA kernels), 'auto' (end on ort-cuda, raw on "
                       "ort-cpu)", choices=("auto", "raw", "end")),
    }
    tolerance = Tolerance(atol=1e-4, rtol=1e-4)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: dict = {}
        if self.values["canonicalize"]:
            # What the rules match against, whatever ran before: Identity-aliased and Transpose'd shared weights
            # (large dynamo exports keep W^T as a Transpose node), Constant nodes, foldable shape arithmetic.
            stats["canonicalized_nodes"] = canonicalize(graph)
        lower_constant_nodes(graph)  # so fuse also works without a fold before it
        target = ctx.target
        opset = int(graph.opset)
        softmax_count = sum(1 for n in graph.nodes if n.op == "Softmax")
        fused = 0
        misses = []
        mask_format = self.values["mask"]
        if mask_format == "auto":
            mask_format = target.attention_mask_format
        masks = MaskCache(graph)
        # read before any fusion: a mask found by role is the 2-D integer input indexing no embedding Gather,
        # and the embedding fusion's cleanup would leave the token ids indexing none either
        mask_names = mask_input_names(graph)
        stats["embed_layernorm"] = 0
        if target.contrib_ops and self.values["embed_layernorm"]:
            wants_end = mask_format == "end" and masks.source() is not None
            count, mask_index, reason = fuse_embed_layernorm(graph, masks.source() if wants_end else None)
            stats["embed_layernorm"] = count
            if mask_index is not None:
                masks.built["end"] = mask_index  # the op's own token counts serve every layer
            if reason and "fuse" in ctx.explain:
                ctx.note(f"fuse: embed_layernorm: {reason}")
        elif "fuse" in ctx.explain and self.values["embed_layernorm"]:
            ctx.note("fuse: embed_layernorm: EmbedLayerNormalization is an ONNX Runtime contrib op; --target trt "
                     "keeps the embedding Gathers and LayerNorm")
        stats["rotary"] = 0
        if self.values["rotary"] and target.contrib_ops:
            stats["rotary"], rotary_misses = fuse_rotary(graph, self.values["rotary_positions"])
            explain_misses(ctx, "rotary", rotary_misses)
        elif self.values["rotary"] and "fuse" in ctx.explain:
            ctx.note("fuse: rotary: RotaryEmbedding is an ONNX Runtime contrib op; --target "
                     f"{target} keeps the rotations in standard ops")
        if self.values["attention"]:
            matches, misses = find_attention(graph, mask_names)
            if target.contrib_ops and matches and any(m.block.mask is not None for m in matches):
                stats["mask"] = mask_format
                if mask_format == "end":
                    ctx.note(TOKEN_COUNTS_NOTE)
            for index, match in enumerate(matches):
                try:
                    if not target.contrib_ops:
                        rewrite_standard(graph, match.block, index, masks)
                    else:
                        rewrite_contrib(graph, match.block, index, masks, mask_format)
                    fused += 1
                except NoMatch as miss:
                    ctx.note(f"fuse: attention at '{match.softmax.name}' matched rule '{match.rule.name}' but "
                             f"was not rewritten: {miss.reason}")
            rules = sorted({m.rule.name for m in matches})
            cleanup(graph)
            if misses:  # heads split elsewhere (rotary): the core -> MultiHeadAttention, or its standard form
                cores, misses = fuse_core_attention(graph, mask_names, misses, target.contrib_ops, masks=masks,
                                                    mask_format=mask_format)
                if cores and target.contrib_ops and "mask" not in stats and mask_format == "end" and \
                        "end" in masks.built:  # the cores' key padding masks are token counts too
                    stats["mask"] = mask_format
                    ctx.note(TOKEN_COUNTS_NOTE)
                fused += len(cores)
                if cores and target.contrib_ops and self.values["flat_heads"]:
                    stats["heads_flattened"] = flatten_heads(graph)
                rules = sorted(set(rules) | set(cores))
                cleanup(graph)
            stats["attention_rules"] = ",".join(rules) if rules else "-"
        stats["attention_blocks"] = softmax_count
        stats["attention"] = fused
        stats["attention_summary"] = f"{fused}/{softmax_count} attention fused"
        explain_misses(ctx, "attention-shaped subgraph at", misses, separator=" ")
        if self.values["gelu"]:
            exported_as_op = sum(1 for n in graph.nodes if n.op == "Gelu")  # opset 20 exports emit Gelu already
            gelus, reason, gelu_misses = fuse_gelu(graph, target, opset)
            explain_misses(ctx, "gelu", gelu_misses)
            stats["gelu"] = gelus + exported_as_op
            if reason:
                ctx.note(f"fuse: gelu: {reason}")
        else:
            stats["gelu"] = 0
        stats["slices_split"] = split_sibling_slices(graph)  # GeGLU's halves: one Split
        cleanup(graph)
        stats["layernorm_fused"] = 0
        if self.values["layernorm"]:
            stats["layernorm_fused"], layernorm_misses = fuse_layernorm(graph)
            explain_misses(ctx, "layernorm", layernorm_misses)
            if opset < 17 and "fuse" in ctx.explain:
                ctx.note(f"fuse: layernorm: opset {opset} has no LayerNormalization (opset 17); LayerNorms written "
                         "out in primitives are left to the residual and embedding fusions")
            cleanup(graph)
        stats["skip_layernorm"] = 0
        skip_form = self.values["skip_layernorm"]
        if skip_form == "auto":
            skip_form = target.skip_layernorm_form if opset >= 17 else "contrib"  # 'sum' needs LayerNormalization
        if skip_form == "sum" and opset < 17:
            ctx.note(f"fuse: skip_layernorm=sum needs LayerNormalization (opset 17); opset {opset} gets "
                     "SkipLayerNormalization")
            skip_form = "contrib"
        if target.contrib_ops and skip_form != "off":
            stats["skip_layernorm"], skip_misses = fuse_skip_layernorm(graph, skip_form)
            explain_misses(ctx, "skip_layernorm", skip_misses)
            stats["skip_layernorm_form"] = skip_form
            cleanup(graph)
        if target.contrib_ops and fused and self.values["shared_positions"]:  # DeBERTa: P broadcast, not repeated
            stats["positions_shared"] = share_position_projections(graph, measure_tiles=not target.cuda_graphs)
            cleanup(graph)
        if target.cuda_graphs and fused:  # no shape arithmetic left for ONNX Runtime to run on the CPU
            ensure_domain(graph, "com.microsoft", 1)  # shape inference reads the fused ops' domain
            if host_placed(graph):  # a graph with none is left exactly as it is
                removed = remove_host_shapes(graph)
                stats["host_shapes_rewritten"] = sum(removed.values())
                if any(removed.values()):
                    canonicalize(graph)  # the static reads' arithmetic folds
        if stats.get("positions_shared"):  # the scores' scale (constant once the reads fold) into P
            stats["position_scales_folded"] = scale_into_weights(graph)
            if target.cuda_graphs:  # p2c gathered straight into [query, key] order: no Transpose a layer
                stats["p2c_transposes_removed"] = transpose_scores(graph)
            cleanup(graph)
        stats["layernorm"] = sum(1 for n in graph.nodes if n.op == "LayerNormalization")
        if target.contrib_ops and any(n.domain == "com.microsoft" for n in graph.nodes):
            ensure_domain(graph, "com.microsoft", 1)
        modified = fused > 0 or stats["gelu"] > 0 or stats["skip_layernorm"] > 0 or stats["embed_layernorm"] > 0 or \
            stats["layernorm_fused"] > 0 or stats["rotary"] > 0
        return PassResult(modified=modified, stats=stats)
