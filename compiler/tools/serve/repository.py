"""The python-backend model repository that ``tqc serve`` writes (into a temporary folder) and Triton loads.

    repo/
      NAME/                       raw tensors in: the model's own inputs (INT64 [batch, sequence]) -> its outputs
        config.pbtxt              backend "python", max_batch_size, dynamic_batching, ragged inputs
        1/model.py                compiler/tools/serve/stub_model.py
        1/wordpiece_words.py      compiler/tools/serve/wordpiece_words.py (its fast path for WordPiece tokenizers)
        1/serve.json              the ONNX path, runtime, limits, site folders of this Python
      NAME_text/                  text in: TEXT UINT8 [texts, bytes] (UTF-8) -> embeddings FP32 [texts, hidden]
        ... as above, plus 1/tokenizer.json (the model's tokenizer, saved in the fast tokenizer's format)

Batching and padding: Triton's dynamic batcher hands one ``execute`` call several requests (``allow_ragged_batch``
lets requests of different lengths meet). Raw requests are grouped by sequence length and each group runs as
one batch, unpadded: answers are exactly those of a lone request. Text rows of all requests are tokenized
together and run in length groups, each padded to its longest row with at most ``max_padding`` of its positions
padding (masked positions do not enter the pooling); a model compiled with the pool pass (``tqc.pool``
metadata) returns its pooled output, which the stub returns as it is; with
CUDA graphs they are padded to power-of-two buckets (sequence >= 16, capped at the token limit; batch capped
at max_batch_size) so a few captured graphs serve every request. Texts longer than the token limit are
truncated (sentence-transformers' behaviour) or refused (``long_text="error"``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tqc.compiler.core.errors import TqcError, did_you_mean
# TOKEN_INPUTS and model_facts stay importable from here (tools/triton_text imports them)
from tqc.compiler.tools.serve.facts import TOKEN_INPUTS, ModelFacts, model_facts, read_facts  # noqa: F401
from tqc.passes.pool import METADATA_KEY as POOL_METADATA

STUB_MODEL = Path(__file__).with_name("stub_model.py")
WORDPIECE_WORDS = Path(__file__).with_name("wordpiece_words.py")  # beside model.py: the stub loads it
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max"}  # sentence-transformers' Pooling config -> the stub's modes
HOST_POOLING = ("mean", "cls", "max")


@dataclass
class ServeOptions:
    model: str
    name: str | None = None
    provider: str = "cpu"  # cpu | cuda (ONNX Runtime) | openvino (an IR needs it)
    endpoints: tuple[str, ...] = ("raw", "text")
    tokenizer: str | None = None  # folder, 'minilm', or None: from the export metadata
    max_length: int | None = None  # token limit (default: the tokenizer's / sentence encoder's)
    long_text: str = "truncate"  # truncate | error
    max_text_bytes: int = 65536
    pooling: str | None = None  # mean | cls | none (default: the sentence encoder's, else mean)
    normalize: bool | None = None  # default: the sentence encoder's (Normalize module), else False
    max_batch: int = 64
    preferred_batch: tuple[int, ...] = ()
    queue_delay_us: int = 0  # 0: no dynamic batching
    instances: int = 1
    threads: int | None = None  # default: ORT's own (all cores) for one instance, cores / instances for several
    max_padding: float | None = None  # text: length groups each padded at most this fraction; None: 0.5 on CPU
    # and OpenVINO, 1 (one group, as before) on CUDA, where groups were not measured
    cuda_graph: bool = False
    prepend_paths: tuple[str, ...] = ()
    timings_dir: str | None = None
    extra: dict = field(default_factory=dict)


def tokenizer_env(instances: int, cores: int | None = None) -> dict[str, str]:
    """The tokenizer's threads per stub, as environment variables for the server (its stubs inherit them).
    ``encode_batch`` runs on rayon's global pool, which takes every core by default, so N instances would start
    N pools of all cores: the cores are divided among the instances (as the runtime's threads are), and where
    that leaves one thread, no pool at all (TOKENIZERS_PARALLELISM=false: a batch is tokenized in the calling
    thread, without the hand-off to the pool's threads)."""
    threads = max(1, (cores or os.cpu_count() or 1) // max(1, instances))
    if threads == 1:
        return {"TOKENIZERS_PARALLELISM": "false"}
    return {"RAYON_NUM_THREADS": str(threads)}


def tokenizer_folder(name: str | None, model_path: Path) -> Path | None:
    """``recorded_tokenizer`` with the metadata of the ONNX model at ``model_path``."""
    return recorded_tokenizer(name, model_facts(model_path).metadata if name is None else {})


def recorded_tokenizer(name: str | None, meta: dict) -> Path | None:
    """An explicit folder (or 'minilm'); else what the export metadata ``meta`` records: the packaged MiniLM, or
    the local model folder the export came from when it holds a tokenizer. None when nothing is known."""
    source = name
    if source is None:
        if meta.get("tqc.tokenizer"):
            source = meta["tqc.tokenizer"]
        elif meta.get("tqc.family") == "minilm" and "real weights" in meta.get("tqc.source", ""):
            source = "minilm"
        elif " from " in meta.get("tqc.source", "") and "random weights" not in meta.get("tqc.source", ""):
            folder = Path(meta["tqc.source"].split(" from ", 1)[1])
            if folder.is_dir() and any((folder / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
                source = str(folder)
    if source is None:
        return None
    from tqc.compiler.io.packaged import packaged_tokenizer

    packaged = packaged_tokenizer(source)
    if packaged is not None:
        return packaged
    if not Path(source).is_dir():
        raise TqcError(f"tokenizer folder '{source}' does not exist")
    return Path(source)


def sentence_encoder(folder: Path) -> dict:
    """Pooling and normalisation that a sentence-transformers folder declares (modules.json), else {}. A pooling
    the host cannot do (several modes, mean_sqrt_len, ...) is returned by its config keys."""
    modules_path = folder / "modules.json"
    if not modules_path.exists():
        return {}
    modules = json.loads(modules_path.read_text())
    found: dict = {"normalize": any(m.get("type", "").endswith(".Normalize") for m in modules)}
    for module in modules:
        if module.get("type", "").endswith(".Pooling"):
            config = json.loads((folder / module.get("path", "") / "config.json").read_text())
            modes = [key for key, value in config.items() if key.startswith("pooling_mode_") and value]
            if len(modes) == 1 and modes[0] in POOLING_MODES:
                found["pooling"] = POOLING_MODES[modes[0]]
            else:  # the host cannot pool so; text_pooling refuses where it would have to
                found["pooling"] = " + ".join(modes) or "no mode"
    bert_config = folder / "sentence_bert_config.json"
    if bert_config.exists():
        found["max_length"] = int(json.loads(bert_config.read_text()).get("max_seq_length", 512))
    return found


def save_tokenizer(folder: Path, target: Path) -> dict:
    """The tokenizer as one tokenizer.json (the stub needs only the ``tokenizers`` package); returns its facts."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TqcError("the text endpoint needs transformers to read the tokenizer: pip install 'tqc[export]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TqcError(f"cannot read a tokenizer from '{folder}': {str(exc).splitlines()[0]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise TqcError(f"the tokenizer in '{folder}' has no fast (Rust) version; the server needs one")
    backend = tokenizer.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    text = backend.to_str()
    target.write_text(text, encoding="utf-8")
    limit = getattr(tokenizer, "model_max_length", None)
    return {"pad_id": int(tokenizer.pad_token_id or 0), "pad_token": str(tokenizer.pad_token or "[PAD]"),
            "model_max_length": int(limit) if limit and limit < 100_000 else None,
            "cut_at_space": cut_at_space(json.loads(text))}


# What a tokenizer may be made of for its tokens before a space to be the same whatever follows the space:
# normalizers that map each character on its own (a space is a starter, so no composition crosses it),
# pre-tokenizers that split at every space, a model that encodes each word apart
CHAR_NORMALIZERS = ("BertNormalizer", "Lowercase", "StripAccents", "NFD", "NFKD", "NFC", "NFKC")
SPACE_PRE_TOKENIZERS = ("BertPreTokenizer", "Whitespace", "WhitespaceSplit")
CHARS_PER_TOKEN = 6  # the head tokenized first: 6 characters per token of the limit (real English: ~4.7)


def cut_at_space(tokenizer: dict) -> bool:
    """Whether a text may be tokenized only up to a space once the tokens before it overflow the token limit.

    The tokenizer truncates only after it has tokenized the whole text, so the stub tokenizes a long text's head
    first (``cut_chars``). That gives the whole text's tokens up to the limit when the tokens before a space never
    depend on what follows it: per-character normalizers, a pre-tokenizer that splits at every space, WordPiece,
    and no added token holding a space. Anything else (byte-level BPE, SentencePiece's Metaspace, ...) is
    tokenized whole, as before."""
    def kinds(part: dict | None) -> list[str]:
        if part is None:
            return []
        inner = part.get("normalizers") or part.get("pretokenizers")
        return [kind for item in inner for kind in kinds(item)] if inner is not None else [part.get("type")]

    normalizers = kinds(tokenizer.get("normalizer"))
    pre_tokenizers = kinds(tokenizer.get("pre_tokenizer"))
    return (all(kind in CHAR_NORMALIZERS for kind in normalizers)
            and bool(pre_tokenizers) and all(kind in SPACE_PRE_TOKENIZERS for kind in pre_tokenizers)
            and (tokenizer.get("model") or {}).get("type") == "WordPiece"
            and not any(any(ch.isspace() for ch in token.get("content", ""))
                        for token in tokenizer.get("added_tokens") or []))


def text_pooling(opts: ServeOptions, facts: ModelFacts, encoder: dict) -> dict:
    """Which output the text endpoint returns and what the stub does to it.

    A model compiled with the pool pass records ``tqc.pool`` (output, mode, normalize): the stub requests only
    that output and returns it as it is (pooling "graph"); asking for another pooling is refused, and a sentence
    encoder folder that declares another one is noted. Otherwise the first output: a token output [batch, seq,
    hidden] is pooled on the host (the encoder's mode, else mean), any other output is returned as it is."""
    notes: list[str] = []
    recorded = facts.metadata.get(POOL_METADATA)
    if recorded:
        pool = json.loads(recorded)
        output = next((o for o in facts.outputs if o["name"] == pool["output"]), None)
        if output is None:
            raise TqcError(f"the model's metadata says the pool pass wrote output '{pool['output']}', but the model "
                           f"has no such output{did_you_mean(pool['output'], [o['name'] for o in facts.outputs])}")
        mode, normalize = pool["mode"], bool(pool["normalize"])
        for what, asked, has in (("pooling", opts.pooling, mode), ("normalisation", opts.normalize, normalize)):
            if asked is not None and asked != has:
                raise TqcError(f"the model pools in its graph ({mode}, normalize {str(normalize).lower()}); "
                               f"{what} {asked} cannot apply to it")
        for what, declared, has in (("pools with", encoder.get("pooling"), mode),
                                    ("normalize", encoder.get("normalize"), normalize)):
            if declared is not None and declared != has:
                notes.append(f"the tokenizer folder's sentence encoder says {what} {declared}; the model's graph "
                             f"does {has} (its pool pass), and that is what is served")
        return {"output": output["name"], "pooling": "graph", "normalize": normalize, "dims": output["dims"],
                "text_output": "embeddings", "describe": f"{mode} (in the graph)", "notes": notes}
    output = facts.outputs[0]
    pooling = opts.pooling or encoder.get("pooling") or "mean"
    pooled = len(output["dims"]) == 2 and pooling != "none"
    if pooled and pooling not in HOST_POOLING:
        if opts.pooling is not None:
            raise TqcError(f"pooling must be mean, cls, max or none, not '{pooling}'"
                           f"{did_you_mean(pooling, [*HOST_POOLING, 'none'])}")
        raise TqcError(f"the sentence encoder of the tokenizer folder pools with {pooling}; 'tqc serve' pools with "
                       f"one of {', '.join(HOST_POOLING)} (give --endpoints raw, or compile the pooling into the "
                       f"model with the pool pass)")
    normalize = bool(encoder.get("normalize", False) if opts.normalize is None else opts.normalize)
    return {"output": output["name"], "pooling": pooling if pooled else "none", "normalize": normalize,
            "dims": output["dims"][-1:] if pooled else output["dims"],
            "text_output": "embeddings" if pooled else output["name"],
            "describe": pooling if pooled else "none", "notes": notes}


def _config_pbtxt(name: str, inputs: list[dict], outputs: list[dict], opts: ServeOptions, ragged: bool) -> str:
    def tensor(port: dict, extra: str = "") -> str:
        return (f'  {{\n    name: "{port["name"]}"\n    data_type: {port["data_type"]}\n'
                f'    dims: [ {", ".join(str(d) for d in port["dims"])} ]{extra}\n  }}')

    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {opts.max_batch}",
             "input [\n" + ",\n".join(tensor(p, "\n    allow_ragged_batch: true" if ragged else "") for p in inputs)
             + "\n]",
             "output [\n" + ",\n".join(tensor(p) for p in outputs) + "\n]"]
    if opts.queue_delay_us > 0 or opts.preferred_batch:
        preferred = "".join(f"\n  preferred_batch_size: {size}" for size in opts.preferred_batch)
        lines.append(f"dynamic_batching {{{preferred}\n  max_queue_delay_microseconds: {opts.queue_delay_us}\n}}")
    kind = "KIND_GPU" if opts.provider == "cuda" else "KIND_CPU"
    lines.append(f"instance_group [\n  {{\n    count: {opts.instances}\n    kind: {kind}\n  }}\n]")
    return "\n".join(lines) + "\n"


def write_repository(opts: ServeOptions, repo: Path, sitedirs: list[str]) -> dict:
    """Writes the repository; returns {model name: endpoint kind} and the text endpoint's settings."""
    model_path = Path(opts.model).resolve()
    if not model_path.is_file():
        raise TqcError(f"model '{opts.model}' does not exist or is not a file")
    if opts.provider not in ("cpu", "cuda", "openvino"):
        raise TqcError(f"--provider must be cpu, cuda or openvino, not '{opts.provider}'")
    if opts.long_text not in ("truncate", "error"):
        raise TqcError("--long-text must be truncate or error")
    facts = read_facts(model_path, opts.provider)
    name = opts.name or model_path.name.split(".")[0].replace("-", "_")
    if any(size < 1 or size > opts.max_batch for size in opts.preferred_batch):
        raise TqcError(f"--preferred-batch sizes must lie in [1, --max-batch {opts.max_batch}]")
    if opts.max_padding is None:
        opts.max_padding = 1.0 if opts.provider == "cuda" else 0.5
    if not 0.0 <= opts.max_padding <= 1.0:
        raise TqcError(f"--max-padding must lie in [0, 1], not {opts.max_padding}")
    threads = opts.threads
    if threads is None and opts.instances > 1 and opts.provider != "cuda":  # instances share the cores
        threads = max(1, (os.cpu_count() or 1) // opts.instances)
    base = {"onnx": str(model_path), "provider": opts.provider, "threads": threads, "instances": opts.instances,
            "max_padding": opts.max_padding,
            "cuda_graph": opts.cuda_graph, "inputs": facts.inputs, "vocab": facts.vocab,
            "type_vocab": facts.type_vocab, "max_batch": opts.max_batch, "sitedirs": sitedirs,
            "prepend_paths": list(opts.prepend_paths), **opts.extra}
    models: dict[str, str] = {}
    text_settings: dict = {}
    folder = recorded_tokenizer(opts.tokenizer, facts.metadata) if "text" in opts.endpoints else None
    if "text" in opts.endpoints and folder is None:
        if opts.endpoints == ("text",):
            raise TqcError("the text endpoint needs the model's tokenizer: give --tokenizer DIR (the export "
                           "metadata names none)")
        opts.endpoints = tuple(e for e in opts.endpoints if e != "text")
    encoder = sentence_encoder(folder) if folder else {}
    for endpoint in opts.endpoints:
        model_name = name if endpoint == "raw" else f"{name}_text"
        version = repo / model_name / "1"
        version.mkdir(parents=True)
        conf = dict(base, kind=endpoint)
        if endpoint == "raw":
            conf["max_length"] = min(opts.max_length or 512, facts.max_positions or 512)
            conf["cuda_graph"] = False  # raw requests keep their exact shapes: no buckets for graphs to cover
            inputs = [dict(p, dims=[-1]) for p in facts.inputs]
            outputs = facts.outputs
        else:
            tok = save_tokenizer(folder, version / "tokenizer.json")
            limit = opts.max_length or encoder.get("max_length") or tok["model_max_length"] or 512
            limit = min(limit, facts.max_positions or limit)
            text = text_pooling(opts, facts, encoder)
            conf.update(tokenizer="tokenizer.json", pad_id=tok["pad_id"], pad_token=tok["pad_token"],
                        max_length=int(limit), cut_chars=CHARS_PER_TOKEN * int(limit) if tok["cut_at_space"] else 0,
                        long_text=opts.long_text, max_text_bytes=opts.max_text_bytes, output=text["output"],
                        run_outputs=[text["output"]], pooling=text["pooling"], normalize=text["normalize"],
                        text_output=text["text_output"])
            if opts.timings_dir:
                conf["timings"] = str(Path(opts.timings_dir).resolve() / f"{model_name}.timings.json")
            inputs = [{"name": "TEXT", "data_type": "TYPE_UINT8", "dims": [-1]}]
            outputs = [{"name": conf["text_output"], "data_type": "TYPE_FP32", "dims": text["dims"]},
                       {"name": "token_count", "data_type": "TYPE_INT64", "dims": [1]}]
            text_settings = {"tokenizer": str(folder), "max_length": int(limit), "pooling": text["describe"],
                             "normalize": text["normalize"], "long_text": opts.long_text, "notes": text["notes"]}
        (repo / model_name / "config.pbtxt").write_text(_config_pbtxt(model_name, inputs, outputs, opts, True))
        (version / "serve.json").write_text(json.dumps(conf, indent=1))
        shutil.copyfile(STUB_MODEL, version / "model.py")
        shutil.copyfile(WORDPIECE_WORDS, version / WORDPIECE_WORDS.name)
        models[model_name] = endpoint
    return {"models": models, "text": text_settings, "facts": facts}
