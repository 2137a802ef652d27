"""Exports a Hugging Face encoder, with its task head, to FP32 ONNX with dynamic batch and sequence axes.

Sources: ``minilm`` (the packaged all-MiniLM-L6-v2, real weights), a family name (``bert``, ``roberta``,
``bert-tiny`` ...: random weights from the recipe's config, seeded), a ``config.json`` (random weights), or a
local model directory (its weights). Exporters: ``legacy`` (TorchScript) or ``dynamo`` (torch.export);
attention: ``eager`` or ``sdpa`` (default: sdpa where transformers has it for the family, else eager; DeBERTa-v2
and MPNet are eager only, and ``--attn sdpa`` for them is refused). Nothing is downloaded: a hub name is refused.

Families without an absolute position table (ModernBERT: rotary; DeBERTa-v3: relative only) record the
config's ``max_position_embeddings`` as ``tqc.max_positions``, which the data limits read as the longest
sequence (``compiler/io/data_limits.py``).

The head is kept. The task is ``--task``, else the architecture the config names, else feature-extraction;
outputs are named as Optimum names them::

    BertModel / RobertaModel ...        feature-extraction     -> last_hidden_state [batch, sequence, hidden]
    ...ForSequenceClassification        text-classification    -> logits [batch, labels]
    ...ForTokenClassification           token-classification   -> logits [batch, sequence, labels]
    ...ForQuestionAnswering             question-answering     -> start_logits, end_logits [batch, sequence]
    ...ForMaskedLM                      fill-mask              -> logits [batch, sequence, vocab]
    sentence-transformers folder        sentence-embedding     -> token_embeddings, sentence_embedding [batch, dim]
    (modules.json)                      (its own Pooling / Normalize / Dense modules, traced as they run)

The export metadata records the task and where the tokenizer is (``tqc.tokenizer``: the model folder, or
``packaged:minilm``), so text calibration data needs no ``--tokenizer`` for a model tqc exported.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.packaged import PACKAGED_MINILM, PACKAGED_MINILM_NAMES, packaged_minilm_path
from tqc.compiler.io.data_limits import MAX_POSITIONS_KEY, model_limits
from tqc.compiler.io.model import load_model, save_model
from tqc.models.recipes import (BERT_INPUTS, RECIPES, ROBERTA_INPUTS, SEEDS, SIZES, Recipe, check_opset, find_recipe,
                                recipe_for_model_type)

EXPORTERS = ("legacy", "dynamo")
ATTENTIONS = ("eager", "sdpa")
SAMPLE_BATCH, SAMPLE_SEQUENCE = 2, 16


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str                    # transformers' Auto class that builds the architecture with this head
    outputs: tuple[str, ...]           # Optimum's output names
    per_token: tuple[bool, ...]        # whether each output has the sequence axis
    suffix: str                        # architecture name suffix in config.architectures


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("feature-extraction", "AutoModel", ("last_hidden_state",), (True,), "Model"),
    Task("text-classification", "AutoModelForSequenceClassification", ("logits",), (False,),
         "ForSequenceClassification"),
    Task("token-classification", "AutoModelForTokenClassification", ("logits",), (True,), "ForTokenClassification"),
    Task("question-answering", "AutoModelForQuestionAnswering", ("start_logits", "end_logits"), (True, True),
         "ForQuestionAnswering"),
    Task("fill-mask", "AutoModelForMaskedLM", ("logits",), (True,), "ForMaskedLM"),
    Task("sentence-embedding", "AutoModel", ("token_embeddings", "sentence_embedding"), (True, False),
         "(sentence-transformers)"),
]}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model",
                   "merges.txt")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ExportSpec:
    source: str
    exporter: str = "legacy"
    attn: str | None = None  # eager | sdpa; None: the family's default for the exporter (Recipe.export_attention)
    opset: int | None = None
    size: str | None = None  # base | tiny, for family names
    seed: int = 0
    task: str | None = None  # TASKS key; default: the config's architecture, else feature-extraction


@dataclass
class LoadedModel:
    """A torch model ready to trace, and what the export needs to know about it."""

    model: object                       # the transformers model, or a SentenceTransformer for sentence-embedding
    recipe: Recipe
    description: str
    task: Task
    config: object
    tokenizer: str | None = None        # a folder, PACKAGED_MINILM, or None (random weights: no tokenizer)
    notes: list[str] = field(default_factory=list)
    attn: str = "sdpa"                  # the attention implementation the model was built with

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.recipe.inputs_for(self.config)


def attention_for(spec: ExportSpec, recipe: Recipe) -> str:
    """``spec.attn``, or the family's default; an implementation transformers lacks for the family: one line."""
    if spec.attn is None:
        return recipe.export_attention(spec.exporter)
    if spec.attn not in recipe.attentions:
        raise TqcError(f"--attn {spec.attn}: transformers has no {spec.attn} attention for {recipe.model_type} "
                       f"models (only {', '.join(recipe.attentions)}); give --attn {recipe.default_attention} or "
                       f"leave --attn out")
    return spec.attn


def _require_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise TqcError(f"export needs torch and transformers ({exc.name} is missing): "
                       "pip install 'torch==2.13.0' 'tqc[export]'") from None


def task_for_architectures(architectures: list[str] | None, where: str) -> Task:
    """The task of the architecture a config names (``BertForTokenClassification`` -> token-classification)."""
    if not architectures:
        return TASKS["feature-extraction"]
    name = architectures[0]
    for task in TASKS.values():
        if task.name != "sentence-embedding" and name.endswith(task.suffix):
            return task
    raise TqcError(f"{where} names the architecture {name}, which has no export task here: give --task "
                   f"({', '.join(t for t in TASKS if t != 'sentence-embedding')})")


def _choose_task(spec: ExportSpec, architectures: list[str] | None, where: str) -> Task:
    if spec.task is None:
        return task_for_architectures(architectures, where)
    if spec.task not in TASKS:
        raise TqcError(f"--task must be one of {', '.join(TASKS)}")
    return TASKS[spec.task]


def tokenizer_folder(folder: Path) -> str | None:
    """The folder itself when it holds a tokenizer's files (recorded as an absolute path), else None."""
    return str(folder.resolve()) if any((folder / name).is_file() for name in TOKENIZER_FILES) else None


def refuse_hub_name(source: str) -> None:
    """A name that is no local path and looks like a hub id: say that nothing is downloaded."""
    if _HUB_NAME.match(source) and not Path(source).exists():
        raise TqcError(f"'{source}' is not a local folder, and tqc downloads nothing: save the model into a folder "
                       f"(save_pretrained, or 'huggingface-cli download {source} --local-dir DIR') and export that "
                       f"folder")


def _from_pretrained(task: Task, folder: Path, attn: str):
    import transformers

    auto = getattr(transformers, task.auto_class)
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it is about to refuse anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            model, info = auto.from_pretrained(str(folder), local_files_only=True, attn_implementation=attn,
                                               output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise TqcError(f"cannot load weights from '{folder}' as {task.name}: {str(exc).strip().splitlines()[0]}") \
            from None
    except pickle.UnpicklingError:  # torch's weights_only loader met code (a global, a reduce) and refused it
        raise TqcError(refused_pickle(folder)) from None
    # A head whose weights are not in the folder would be random: refuse rather than export noise.
    # (The pooler of a base model is not exported, so its absence does not matter.)
    missing = sorted(k for k in info.get("missing_keys", ()) if "pooler" not in k)
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        what = f"no weights for {', '.join(missing[:3])}" if missing else f"mismatched shapes for {mismatched[0]}"
        architectures = getattr(model.config, "architectures", None) or ["an unnamed architecture"]
        raise TqcError(f"'{folder}' ({architectures[0]}) has {what}{' ...' if len(missing) > 3 else ''}: "
                       f"its weights have no {task.name} head; drop --task or give the folder of a model with that "
                       f"head")
    return model


def refused_pickle(folder: Path) -> str:
    """The line for a pickled weights file that torch's ``weights_only`` loader refused to unpickle."""
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")) if folder.is_dir() else []
    what = f"'{folder / names[0]}'" if len(names) == 1 else f"the pickled weights in '{folder}'"
    return (f"{what} is not a plain tensor file: torch refused to unpickle the code in it, and tqc never runs "
            f"code from a weights file (save the weights as safetensors from a copy you trust)")


def _sentence_transformer(folder: Path, attn: str):
    """The folder as a SentenceTransformer (its modules run as they would in sentence-transformers), or None."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SentenceTransformer(str(folder), device="cpu", local_files_only=True,
                                       model_kwargs={"attn_implementation": attn})
    except pickle.UnpicklingError:
        raise TqcError(refused_pickle(folder)) from None
    except Exception as exc:  # sentence-transformers raises many types on a folder it cannot read
        raise TqcError(f"cannot load the sentence-transformers folder '{folder}': {type(exc).__name__}: "
                       f"{str(exc).strip().splitlines()[0][:300]}") from None


def _transformer_folder(folder: Path) -> Path:
    """The folder of a sentence-transformers model's Transformer module (usually the folder itself)."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        path = next(m.get("path", "") for m in modules if m.get("type", "").endswith(".Transformer"))
    except (OSError, ValueError, StopIteration, AttributeError):
        return folder
    return folder / path if path else folder


def _load_folder(spec: ExportSpec, folder: Path, description: str | None = None,
                 packaged: bool = False) -> LoadedModel:
    from transformers import AutoConfig

    is_sentence_transformer = (folder / "modules.json").is_file()
    # The packaged MiniLM is a sentence-transformers folder; by name it exports the encoder (last_hidden_state)
    # unless --task sentence-embedding asks for the pooled embedding.
    wants_embedding = spec.task == "sentence-embedding" or (spec.task is None and is_sentence_transformer
                                                            and not packaged)
    hf_folder = _transformer_folder(folder) if is_sentence_transformer else folder
    if not (hf_folder / "config.json").exists():
        raise TqcError(f"'{hf_folder}' is a directory without config.json; expected a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(str(hf_folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TqcError(f"'{hf_folder}/config.json' is not a transformers config: {str(exc).splitlines()[0]}") \
            from None
    recipe = find_recipe("minilm") if packaged else recipe_for_model_type(config.model_type)
    attn = attention_for(spec, recipe)
    from tqc.compiler.io.model_check import check_export_config

    check_export_config(config, str(folder))
    description = description or f"{config.model_type} from {folder}"
    tokenizer = PACKAGED_MINILM if packaged else (tokenizer_folder(folder) or tokenizer_folder(hf_folder))
    notes = []
    if wants_embedding:
        if not is_sentence_transformer:
            raise TqcError(f"--task sentence-embedding needs a sentence-transformers folder (with modules.json); "
                           f"'{folder}' has none")
        model = _sentence_transformer(folder, attn)
        if model is not None:
            modules = ", ".join(type(m).__name__ for m in model)
            return LoadedModel(model, recipe, f"{description} (sentence-transformers: {modules})",
                               TASKS["sentence-embedding"], config, tokenizer, notes, attn)
        notes.append("sentence-transformers is not installed: exported last_hidden_state without the folder's "
                     "pooling/normalization (pip install sentence-transformers to export sentence_embedding)")
        task = TASKS["feature-extraction"]
    else:
        task = _choose_task(spec, getattr(config, "architectures", None), f"'{hf_folder}/config.json'")
    model = _from_pretrained(task, hf_folder, attn)
    architecture = type(model).__name__
    return LoadedModel(model, recipe, f"{description} ({architecture}, {task.name})", task, config, tokenizer, notes,
                       attn)


def load_torch_model(spec: ExportSpec) -> LoadedModel:
    _require_torch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoConfig

    source = spec.source
    path = Path(source)
    if spec.task is not None and spec.task not in TASKS:
        raise TqcError(f"--task must be one of {', '.join(TASKS)}")
    if source.lower() in PACKAGED_MINILM_NAMES and spec.size != "tiny":
        model_dir = packaged_minilm_path()
        return _load_folder(spec, model_dir, f"all-MiniLM-L6-v2 (real weights, {model_dir})", packaged=True)
    if path.is_dir():
        return _load_folder(spec, path)
    if path.suffix == ".json":
        if not path.exists():
            raise TqcError(f"config '{path}' does not exist")
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise TqcError(f"'{path}' is not a transformers config: {str(exc).splitlines()[0]}") from None
        recipe = recipe_for_model_type(config.model_type)
        task = _choose_task(spec, getattr(config, "architectures", None), f"'{path}'")
        description = f"{config.model_type} from {path} (random weights, seed {spec.seed})"
    else:
        refuse_hub_name(source)
        try:
            recipe = find_recipe(source)
        except TqcError as exc:
            if "did you mean" in str(exc):  # a typo of a family name
                raise
            raise TqcError(f"'{source}' is neither a model family ({', '.join(RECIPES)}) nor a local folder, and "
                           f"tqc downloads nothing: save the model into a folder (save_pretrained) and export that "
                           f"folder") from None
        size = spec.size or ("tiny" if source.lower().endswith("-tiny") else "base")
        config = recipe.config(size)
        task = _choose_task(spec, None, source)
        description = f"{recipe.family}-{size} (random weights, seed {spec.seed})"
    from tqc.compiler.io.model_check import check_export_config

    check_export_config(config, source)  # e.g. a hidden size that is not a multiple of the heads: one line
    if task.name == "sentence-embedding":
        raise TqcError("--task sentence-embedding needs a sentence-transformers folder (with modules.json) or minilm")
    attn = attention_for(spec, recipe)
    torch.manual_seed(spec.seed)
    auto = getattr(transformers, task.auto_class)
    model = auto.from_config(config, attn_implementation=attn)
    if task.name != "feature-extraction":
        description += f" ({type(model).__name__}, {task.name})"
    return LoadedModel(model, recipe, description, task, model.config, attn=attn)


def sample_inputs(inputs: tuple[str, ...], config, batch: int = SAMPLE_BATCH, sequence: int = SAMPLE_SEQUENCE):
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = int(getattr(config, "vocab_size", 1000))
    ids = torch.randint(5, min(vocab, 1000), (batch, sequence), generator=generator)
    values = {"input_ids": ids, "attention_mask": torch.ones(batch, sequence, dtype=torch.long),
              "token_type_ids": torch.zeros(batch, sequence, dtype=torch.long)}
    values["attention_mask"][1, sequence - 4:] = 0
    return tuple(values[name] for name in inputs)


def _wrapper(loaded: LoadedModel):
    """An nn.Module whose forward takes the family's inputs positionally and returns the task's outputs."""
    import torch

    model, task = loaded.model, loaded.task

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def outputs(self, **inputs):
            if task.name == "sentence-embedding":  # a SentenceTransformer: its modules run on a features dict
                features = self.model(dict(inputs))
                values = tuple(features[name] for name in task.outputs)
            else:
                result = self.model(**inputs)
                values = tuple(getattr(result, name) for name in task.outputs)
            return values[0] if len(values) == 1 else values

    class WithTokenTypes(Outputs):
        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.outputs(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    class WithoutTokenTypes(Outputs):
        def forward(self, input_ids, attention_mask):
            return self.outputs(input_ids=input_ids, attention_mask=attention_mask)

    wrappers = {BERT_INPUTS: WithTokenTypes, ROBERTA_INPUTS: WithoutTokenTypes}
    return wrappers[loaded.inputs]().eval()


def dynamic_axes(inputs: tuple[str, ...], task: Task) -> dict[str, dict[int, str]]:
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    for name, per_token in zip(task.outputs, task.per_token):
        axes[name] = {0: "batch", 1: "sequence"} if per_token else {0: "batch"}
    return axes


def _quiet_libraries() -> None:
    """transformers' weight-loading bars and tracer warnings are noise in a CLI that reports its own progress."""
    _require_torch()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)


def check_spec(spec: ExportSpec) -> None:
    """Every option of ``spec`` within what ``tqc export`` accepts (one line naming the option otherwise)."""
    if spec.exporter not in EXPORTERS:
        raise TqcError(f"--exporter must be one of {', '.join(EXPORTERS)}")
    if spec.attn is not None and spec.attn not in ATTENTIONS:
        raise TqcError(f"--attn must be one of {', '.join(ATTENTIONS)}")
    check_opset(spec.exporter, spec.opset)
    if spec.size is not None and spec.size not in SIZES:
        raise TqcError(f"--size must be one of {', '.join(SIZES)}")
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int) or not SEEDS[0] <= spec.seed <= SEEDS[1]:
        raise TqcError(f"--seed must be an integer in [{SEEDS[0]}, {SEEDS[1]}], got {spec.seed!r}")
    if spec.task is not None and spec.task not in TASKS:
        raise TqcError(f"--task must be one of {', '.join(TASKS)}")


def export_guarded(spec: ExportSpec, output: str | Path, progress=lambda message: None, what: str = "-o") -> dict:
    """``export`` as ``tqc export`` runs it: inside the output guard, the source (a folder, a config, the
    packaged MiniLM) declared read, so the output (``what`` names it in errors) is never written over it."""
    from tqc.compiler.io import output_guard

    check_spec(spec)
    with output_guard.command("export") as guard:
        if Path(spec.source).exists():  # a config.json or a model folder: read, never written over
            guard.reads_folder(spec.source, f"the export source '{spec.source}'")
        elif spec.source.lower() in PACKAGED_MINILM_NAMES:
            guard.reads_packaged_model()
        guard.writes_model(output, what)
        return export(spec, output, progress=progress)


def positions_to_record(onnx_model: onnx.ModelProto, config) -> int | None:
    """The config's ``max_position_embeddings`` for a graph with no absolute position table (rotary, relative
    only), so the data limits know the longest sequence the model was built for; None when the graph's own
    position table says it, or the config has no such value."""
    value = getattr(config, "max_position_embeddings", None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value if model_limits(onnx_model).max_sequence is None else None


def export(spec: ExportSpec, output: str | Path, progress=lambda message: None) -> dict:
    """Export to ``output`` (written atomically). Returns a summary for the CLI."""
    check_spec(spec)
    progress(f"loading {spec.source}")
    _quiet_libraries()
    loaded = load_torch_model(spec)
    loaded.model.eval()
    import torch

    recipe, task, inputs, attn = loaded.recipe, loaded.task, loaded.inputs, loaded.attn
    wrapper = _wrapper(loaded)
    args = sample_inputs(inputs, loaded.config)
    opset = spec.opset or (17 if spec.exporter == "legacy" else 18)
    description = loaded.description
    outputs = list(task.outputs)
    progress(f"exporting {description} with the {spec.exporter} exporter, {attn} attention, opset {opset}")
    with tempfile.TemporaryDirectory(prefix="tqc-export-") as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if spec.exporter == "legacy":
                    torch.onnx.export(wrapper, args, str(tmp_path), dynamo=False, opset_version=opset,
                                      input_names=list(inputs), output_names=outputs,
                                      dynamic_axes=dynamic_axes(inputs, task), do_constant_folding=True)
                else:
                    max_seq = int(getattr(loaded.config, "max_position_embeddings", 512)) - 2
                    batch = torch.export.Dim("batch", min=1, max=4096)
                    sequence = torch.export.Dim("sequence", min=1, max=max(max_seq, SAMPLE_SEQUENCE + 1))
                    shapes = tuple({0: batch, 1: sequence} for _ in inputs)
                    program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                                input_names=list(inputs), output_names=outputs,
                                                dynamic_shapes=shapes, verbose=False)
                    program.save(str(tmp_path), external_data=True)
        except TqcError:
            raise
        except Exception as exc:  # torch's exporters raise many types; report one line
            raise TqcError(f"torch's {spec.exporter} exporter failed on {description}: "
                           f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}") from exc
        onnx_model = load_model(tmp_path)
    meta = {"tqc.family": recipe.family, "tqc.exporter": spec.exporter, "tqc.attn": attn,
            "tqc.source": description, "tqc.inputs": ",".join(inputs), "tqc.task": task.name,
            "tqc.outputs": ",".join(outputs)}
    if loaded.tokenizer:
        meta["tqc.tokenizer"] = loaded.tokenizer
    positions = positions_to_record(onnx_model, loaded.config)
    if positions is not None:
        meta[MAX_POSITIONS_KEY] = str(positions)
    existing = {p.key for p in onnx_model.metadata_props}
    for key, value in meta.items():
        if key not in existing:
            onnx_model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    save_model(onnx_model, output)
    return {"output": str(output), "family": recipe.family, "source": description, "exporter": spec.exporter,
            "attn": attn, "opset": opset, "nodes": len(onnx_model.graph.node), "task": task.name,
            "inputs": list(inputs), "outputs": outputs, "tokenizer": loaded.tokenizer,
            "notes": list(loaded.notes)}
