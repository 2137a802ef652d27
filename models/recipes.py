"""One export recipe per encoder family: its real input names, dynamic axes and configs.

``base`` is the published base-size architecture (random weights unless the source has real ones);
``tiny`` is a small configuration with the same layout, for fast structural tests. MiniLM is the packaged
sentence-transformers/all-MiniLM-L6-v2 with its real weights.

``attention`` names the family's attention form, a fact of the architecture that tests and benchmarks select
on: ``bert`` (Softmax(QK^T * scale + mask) V, with an absolute position table: the eight classic families),
``relative-bias`` (MPNet: a bucketed relative position bias added to the scores), ``disentangled``
(DeBERTa-v2/v3: content-to-position and position-to-content scores added, no absolute positions in v3),
``rotary-local`` (ModernBERT: rotary Q/K, every n-th layer global, the others a sliding-window band).
``attentions`` are the implementations transformers has for the family (DeBERTa-v2 and MPNet: eager only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tqc.compiler.core.errors import TqcError, did_you_mean

SIZES = ("base", "tiny")
SEEDS = (0, 2**32 - 1)  # numpy's and torch's seed range
# torch's exporters: TorchScript-based (legacy) opsets 7..20, torch.export-based (dynamo) 18..23.
OPSETS = {"legacy": (7, 20), "dynamo": (18, 23)}


def check_opset(exporter: str, opset: int | None) -> None:
    """An opset the exporter writes (``tqc export --opset``, ``tqc.export(opset=...)``), else one line."""
    if opset is None:
        return
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TqcError(f"--opset takes an integer, got {opset!r}")
    low, high = OPSETS[exporter]
    if not low <= opset <= high:
        raise TqcError(f"--opset {opset}: the {exporter} exporter supports opsets {low} to {high}")


BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ROBERTA_INPUTS = ("input_ids", "attention_mask")

_TINY_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    vocab_size=1000, max_position_embeddings=128)

# DeBERTa-v3-base (microsoft/deberta-v3-base): relative attention with log buckets, c2p + p2c, no absolute
# position table, no token types. DeBERTa-v3 is the DeBERTa-v2 architecture; mDeBERTa-v3 differs in vocabulary.
_DEBERTA_V3 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   vocab_size=128100, max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
                   position_buckets=256, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                   norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, layer_norm_eps=1e-7)
# Tiny: 8 buckets, so relative distances past 4 are log-bucketed at the test lengths (16 and more).
_DEBERTA_TINY = dict(_DEBERTA_V3, **_TINY_COMMON, position_buckets=8)
# ModernBERT tiny: layers full / sliding / full, a window of 8 (4 each side), shorter than the test sequences.
_MODERNBERT_TINY = dict(_TINY_COMMON, num_hidden_layers=3, global_attn_every_n_layers=2, local_attention=8,
                        pad_token_id=0, bos_token_id=1, cls_token_id=1, eos_token_id=2, sep_token_id=2)


@dataclass(frozen=True)
class Recipe:
    family: str
    model_type: str  # transformers' config.model_type
    inputs: tuple[str, ...]
    base: dict[str, Any]
    tiny: dict[str, Any]
    description: str
    real_weights: bool = False
    aliases: tuple[str, ...] = field(default_factory=tuple)
    attention: str = "bert"                           # the attention form (module docstring)
    attentions: tuple[str, ...] = ("eager", "sdpa")   # transformers' implementations for the family
    token_types_from_config: bool = False             # token_type_ids only when config.type_vocab_size > 0
    legacy_attention: str | None = None               # what tqc's legacy export uses where sdpa would not fuse

    def inputs_for(self, config) -> tuple[str, ...]:
        """The graph inputs of a model of this family with ``config`` (DeBERTa: token types only when the
        config has a token-type table, as Optimum exports it)."""
        if self.token_types_from_config:
            return BERT_INPUTS if int(getattr(config, "type_vocab_size", 0) or 0) > 0 else ROBERTA_INPUTS
        return self.inputs

    @property
    def default_attention(self) -> str:
        """sdpa (transformers' default) where the family has it, else eager."""
        return "sdpa" if "sdpa" in self.attentions else "eager"

    def export_attention(self, exporter: str) -> str:
        """The implementation ``tqc export`` picks when ``--attn`` is not given: the family's default, except
        where another is the better export. ModernBERT's sdpa through the legacy (TorchScript) exporter writes
        -inf masks behind a NaN guard, which ``fuse`` keeps exact with one more Mul per layer (``nan_guard.py``);
        its eager export computes the same answer at every real token and fuses without it."""
        if exporter == "legacy" and self.legacy_attention:
            return self.legacy_attention
        return self.default_attention

    def config(self, size: str = "base"):
        from transformers import AutoConfig

        values = {"base": self.base, "tiny": self.tiny}.get(size)
        if values is None:
            raise TqcError(f"size must be base or tiny, got '{size}'")
        return AutoConfig.for_model(self.model_type, **values)


RECIPES: dict[str, Recipe] = {
    r.family: r
    for r in [
        Recipe("bert", "bert", BERT_INPUTS, base={}, tiny=_TINY_COMMON, description="BERT-base (uncased layout)"),
        Recipe("minilm", "bert", BERT_INPUTS,
               base=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                         vocab_size=30522, max_position_embeddings=512),
               tiny=_TINY_COMMON, real_weights=True,
               description="sentence-transformers/all-MiniLM-L6-v2 (real weights, packaged)"),
        Recipe("roberta", "roberta", ROBERTA_INPUTS,
               base=dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5),
               tiny=dict(_TINY_COMMON, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1),
               description="RoBERTa-base"),
        Recipe("distilbert", "distilbert", ROBERTA_INPUTS, base={},
               tiny=dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000,
                         max_position_embeddings=128),
               description="DistilBERT-base"),
        Recipe("albert", "albert", BERT_INPUTS,
               base=dict(embedding_size=128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, vocab_size=30000, hidden_act="gelu_new"),
               tiny=dict(_TINY_COMMON, embedding_size=32, hidden_act="gelu_new"),
               description="ALBERT-base-v2 (shared layers, factorized embedding)"),
        Recipe("electra", "electra", BERT_INPUTS,
               base=dict(embedding_size=768, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, vocab_size=30522),
               tiny=dict(_TINY_COMMON, embedding_size=32),
               description="ELECTRA-base discriminator"),
        Recipe("xlm-roberta", "xlm-roberta", ROBERTA_INPUTS,
               base=dict(vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5),
               tiny=dict(_TINY_COMMON, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1),
               description="XLM-RoBERTa-base", aliases=("xlmr", "xlm-r")),
        Recipe("camembert", "camembert", ROBERTA_INPUTS,
               base=dict(vocab_size=32005, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                         bos_token_id=5, eos_token_id=6, layer_norm_eps=1e-5),
               tiny=dict(_TINY_COMMON, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1),
               description="CamemBERT-base"),
        Recipe("modernbert", "modernbert", ROBERTA_INPUTS, base={}, tiny=_MODERNBERT_TINY,
               description="ModernBERT-base (rotary, global attention every 3rd layer, 128-token local window, "
                           "GeGLU)", attention="rotary-local", legacy_attention="eager"),
        Recipe("deberta-v2", "deberta-v2", ROBERTA_INPUTS, base=_DEBERTA_V3, tiny=_DEBERTA_TINY,
               description="DeBERTa-v3-base layout (DeBERTa-v2 architecture: disentangled relative attention)",
               aliases=("deberta-v3", "debertav2", "debertav3"), attention="disentangled", attentions=("eager",),
               token_types_from_config=True),
        Recipe("mdeberta", "deberta-v2", ROBERTA_INPUTS, base=dict(_DEBERTA_V3, vocab_size=251000),
               tiny=_DEBERTA_TINY, description="mDeBERTa-v3-base (DeBERTa-v2 architecture, multilingual vocabulary)",
               aliases=("mdeberta-v3",), attention="disentangled", attentions=("eager",),
               token_types_from_config=True),
        Recipe("mpnet", "mpnet", ROBERTA_INPUTS,
               base=dict(vocab_size=30527, max_position_embeddings=514, layer_norm_eps=1e-5),
               tiny=dict(_TINY_COMMON, max_position_embeddings=130, relative_attention_num_buckets=32),
               description="MPNet-base (relative position bias; the all-mpnet-base-v2 layout)",
               attention="relative-bias", attentions=("eager",)),
    ]
}

# The eight classic families: BERT-style attention with an absolute position table.
CLASSIC_FAMILIES = tuple(name for name, recipe in RECIPES.items() if recipe.attention == "bert")

_BY_MODEL_TYPE = {"bert": "bert", "roberta": "roberta", "distilbert": "distilbert", "albert": "albert",
                  "electra": "electra", "xlm-roberta": "xlm-roberta", "camembert": "camembert",
                  "modernbert": "modernbert", "deberta-v2": "deberta-v2", "mpnet": "mpnet"}


def find_recipe(name: str) -> Recipe:
    key = name.lower()
    for suffix in ("-base", "-tiny"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    for recipe in RECIPES.values():
        if key == recipe.family or key in recipe.aliases:
            return recipe
    names = list(RECIPES) + [a for r in RECIPES.values() for a in r.aliases]
    raise TqcError(f"unknown model family '{name}'{did_you_mean(key, names)}")


def recipe_for_model_type(model_type: str) -> Recipe:
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise TqcError(f"model type '{model_type}' has no export recipe (supported: {', '.join(_BY_MODEL_TYPE)})")
    return RECIPES[family]
