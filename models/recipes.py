"""One export recipe per encoder family: its real input names, dynamic axes and configs.

``base`` is the published base-size architecture (random weights unless the source has real ones);
``tiny`` is a small configuration with the same layout, for fast structural tests. MiniLM is the packaged
sentence-transformers/all-MiniLM-L6-v2 with its real weights.
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
    ]
}

_BY_MODEL_TYPE = {"bert": "bert", "roberta": "roberta", "distilbert": "distilbert", "albert": "albert",
                  "electra": "electra", "xlm-roberta": "xlm-roberta", "camembert": "camembert"}


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
