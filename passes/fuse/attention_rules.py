"""The attention pattern catalogue: one rule per exporter variant, as data.

Each rule describes, walking *backwards*, the ops between the projections (``x @ W + b``) and the two
attention MatMuls, and what sits between the scores MatMul and the Softmax. ``fuse`` tries every rule on
every Softmax; ``--explain fuse`` reports, for a Softmax no rule matched, the rule that got furthest and the
reason it stopped.

    scores = MatMul(Q', K')  [* scale]  [+ mask]  -> Softmax -> [Where(IsNaN)]  -> MatMul(., V') -> out
    Q' = <q_path>(x @ Wq + bq)      K' = <k_path>(x @ Wk + bk)     V' = <v_path>(x @ Wv + bv)
    out = <out_path>(context)       (ends in the [batch, sequence, hidden] tensor the output dense reads)

Steps name an op and, for Transpose, its perm; ``Scale`` is a Mul or Div by a scalar constant (either
operand order), or by a scalar the graph computes from static dimensions (``1/sqrt(sqrt(Shape(Q)[-1]))``,
evaluated by ``match.evaluate_static``). Optional
steps may be absent. All families of transformers 5 (BERT, RoBERTa, MiniLM, DistilBERT, ALBERT, ELECTRA,
XLM-R, CamemBERT) share these attention layouts; the exporter and attention implementation choose the rule.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    op: str  # "Transpose" | "Reshape" | "Scale"
    perm: tuple[int, ...] | None = None
    optional: bool = False

    def __str__(self) -> str:
        text = f"{self.op}{list(self.perm) if self.perm else ''}"
        return text + "?" if self.optional else text


SPLIT_HEADS = (Step("Transpose", (0, 2, 1, 3)), Step("Reshape"))
SPLIT_HEADS_KT = (Step("Transpose", (0, 2, 3, 1)), Step("Reshape"))
MERGE_HEADS = (Step("Reshape", optional=True), Step("Transpose", (0, 2, 1, 3)), Step("Reshape"))


@dataclass(frozen=True)
class AttentionRule:
    name: str
    description: str
    q_path: tuple[Step, ...]
    k_path: tuple[Step, ...]
    v_path: tuple[Step, ...]
    score_scale: bool          # Mul/Div by a scalar between the scores MatMul and the mask Add
    nan_guard: bool            # Where(IsNaN(p), 0, p) after the Softmax (torch's sdpa export)
    mask: str = "add"          # "add": Softmax(scores + mask); "optional": with or without a mask Add
    out_path: tuple[Step, ...] = MERGE_HEADS


RULES: tuple[AttentionRule, ...] = (
    AttentionRule(
        name="eager",
        description="transformers eager attention, legacy or dynamo exporter: (Q @ K^T) * scale + mask",
        q_path=SPLIT_HEADS, k_path=SPLIT_HEADS_KT, v_path=SPLIT_HEADS,
        score_scale=True, nan_guard=False, mask="optional",
    ),
    AttentionRule(
        name="sdpa-legacy",
        description="torch sdpa through the TorchScript exporter: sqrt(scale) on Q and on K^T, NaN guard",
        q_path=(Step("Scale"),) + SPLIT_HEADS, k_path=(Step("Scale"),) + SPLIT_HEADS_KT, v_path=SPLIT_HEADS,
        score_scale=False, nan_guard=True, mask="optional",
    ),
    AttentionRule(
        name="sdpa-dynamo",
        description="torch sdpa through the dynamo exporter: K^T built as Reshape/Transpose[0,2,1]/Reshape",
        q_path=(Step("Scale"),) + SPLIT_HEADS,
        k_path=(Step("Scale"), Step("Reshape"), Step("Transpose", (0, 2, 1)), Step("Reshape"),
                Step("Transpose", (0, 2, 1, 3)), Step("Reshape")),
        v_path=SPLIT_HEADS, score_scale=False, nan_guard=True, mask="optional",
    ),
    AttentionRule(
        name="sdpa-legacy-4x",
        description="transformers < 4.58 sdpa through the TorchScript exporter (Optimum, sentence-transformers' "
                    "ONNX backend): sqrt(scale) computed from Shape(Q)[-1] on Q and on K^T, no NaN guard",
        q_path=(Step("Scale"),) + SPLIT_HEADS, k_path=(Step("Scale"),) + SPLIT_HEADS_KT, v_path=SPLIT_HEADS,
        score_scale=False, nan_guard=False, mask="optional",
    ),
    AttentionRule(
        name="k-transposed-late",
        description="transformers 4.x eager: K split as [B,H,S,D], then K.transpose(-1, -2) before the scores",
        q_path=SPLIT_HEADS, k_path=(Step("Transpose", (0, 1, 3, 2)),) + SPLIT_HEADS, v_path=SPLIT_HEADS,
        score_scale=True, nan_guard=False, mask="optional",
    ),
)
