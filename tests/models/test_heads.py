"""Export keeps the head: task heads saved with save_pretrained come out with Optimum's output names and the
torch model's numbers; sentence-transformers folders keep their pooling; the tokenizer's folder is recorded so
text data needs no --tokenizer; hub names are refused in one line."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from tqc.compiler.cli.main import main
from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.model import load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000,
            max_position_embeddings=128)
ROBERTA_TINY = dict(TINY, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1)

# (architecture class, config class, config values, task, Optimum's output names)
HEADS = {
    "bert-seq": ("BertForSequenceClassification", "BertConfig", dict(TINY, num_labels=3),
                 "text-classification", ["logits"]),
    "roberta-token": ("RobertaForTokenClassification", "RobertaConfig", dict(ROBERTA_TINY, num_labels=5),
                      "token-classification", ["logits"]),
    "bert-qa": ("BertForQuestionAnswering", "BertConfig", TINY, "question-answering",
                ["start_logits", "end_logits"]),
    "distilbert-seq": ("DistilBertForSequenceClassification", "DistilBertConfig",
                       dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000,
                            max_position_embeddings=128, num_labels=2), "text-classification", ["logits"]),
    "bert-mlm": ("BertForMaskedLM", "BertConfig", TINY, "fill-mask", ["logits"]),
}


def save_head(kind: str, folder, seed: int = 0):
    arch, config_class, values, _, _ = HEADS[kind]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(getattr(transformers, config_class)(**values)).eval()
    model.save_pretrained(folder)
    return model


def token_feed(names, batch=3, seq=11, vocab=1000, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[batch - 1, seq - 4:] = 0  # right padding on the last row
    types = np.zeros((batch, seq), np.int64)
    types[:, seq // 2:] = 1
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: values[name] for name in names}


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.mark.parametrize("kind, exporter", [("bert-seq", "legacy"), ("bert-seq", "dynamo"),
                                            ("roberta-token", "legacy"), ("roberta-token", "dynamo"),
                                            ("bert-qa", "legacy"), ("distilbert-seq", "legacy"),
                                            ("bert-mlm", "legacy")])
def test_saved_head_exports_with_its_outputs_and_numbers(kind, exporter, tmp_path, capsys):
    folder = tmp_path / kind
    model = save_head(kind, folder)
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli(["-q", "export", str(folder), "-o", str(out), "--exporter", exporter], capsys)
    assert code == 0, err
    _, _, _, task, outputs = HEADS[kind]
    assert f"outputs {', '.join(outputs)}" in stdout
    onnx_model = load_model(out)
    assert [o.name for o in onnx_model.graph.output] == outputs
    meta = {p.key: p.value for p in onnx_model.metadata_props}
    assert meta["tqc.task"] == task and meta["tqc.outputs"] == ",".join(outputs)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for batch, seq in [(3, 11), (2, 40)]:  # dynamic axes: other shapes than the export's sample
        feed = token_feed(names, batch, seq)
        got = session.run(outputs, feed)
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        for name, value in zip(outputs, got):
            reference = getattr(expected, name).numpy()
            assert value.shape == reference.shape, name
            assert np.abs(value - reference).max() <= 1e-4, (name, np.abs(value - reference).max())


def test_task_option_overrides_and_missing_head_is_refused(tmp_path):
    from tqc.models.export import ExportSpec, export

    folder = tmp_path / "seq"
    save_head("bert-seq", folder)
    info = export(ExportSpec(str(folder), task="feature-extraction"), tmp_path / "encoder.onnx")
    assert info["outputs"] == ["last_hidden_state"]
    assert [o.name for o in load_model(tmp_path / "encoder.onnx").graph.output] == ["last_hidden_state"]
    # A base model saved without a head: exporting it as a classifier would export a random head.
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**TINY)).save_pretrained(tmp_path / "base")
    with pytest.raises(TqcError, match="has no weights for .*classifier.*no text-classification head"):
        export(ExportSpec(str(tmp_path / "base"), task="text-classification"), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    # Family names and configs take --task too (random weights).
    info = export(ExportSpec("bert-tiny", task="question-answering"), tmp_path / "qa.onnx")
    assert info["outputs"] == ["start_logits", "end_logits"]


@pytest.mark.parametrize("source", ["bert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2"])
def test_hub_name_is_refused_in_one_line(source, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["-q", "export", source, "-o", str(tmp_path / "x.onnx")], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("tqc: error: ")
    assert "downloads nothing" in err and "folder" in err
    assert not (tmp_path / "x.onnx").exists()


def test_recorded_tokenizer_feeds_text_data(tmp_path, capsys):
    """A classifier folder with its tokenizer: calibrate on sentences without --tokenizer."""
    from tqc.compiler.analysis.calib_data import DataSpec, FeedSource
    from tqc.compiler.io.packaged import packaged_minilm_path

    folder = tmp_path / "clf"
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(
        transformers.BertConfig(**dict(TINY, vocab_size=30522, num_labels=2))).save_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(packaged_minilm_path()), local_files_only=True)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "clf.onnx"
    code, _, err = run_cli(["-q", "export", str(folder), "-o", str(out)], capsys)
    assert code == 0, err
    model = load_model(out)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["tqc.tokenizer"] == str(folder.resolve())
    sentences = tmp_path / "s.txt"
    sentences.write_text("The cat sat on the mat.\nA second, longer sentence about nothing much at all.\n")
    feeds = list(FeedSource(DataSpec(str(sentences)), model))
    assert feeds[0]["input_ids"][0, 0] == tokenizer.cls_token_id
    assert feeds[0]["input_ids"].tolist() == tokenizer(sentences.read_text().splitlines(), padding=True,
                                                        return_tensors="np")["input_ids"].tolist()
    table = tmp_path / "t.json"
    code, stdout, err = run_cli(["-q", "calibrate", str(out), "--data", str(sentences), "-o", str(table)], capsys)
    assert code == 0, err
    assert table.exists()
    # The folder moved away: the recorded path is named in the error.
    import shutil

    shutil.rmtree(folder)
    with pytest.raises(TqcError, match="recorded at export.*does not exist any more: give --tokenizer"):
        FeedSource(DataSpec(str(sentences)), model)


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory):
    """A tiny sentence-transformers folder: random BERT encoder, the MiniLM tokenizer, CLS pooling, Normalize."""
    st = pytest.importorskip("sentence_transformers")
    from tqc.compiler.io.packaged import packaged_minilm_path

    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 5.2
        from sentence_transformers.models import Normalize, Pooling, Transformer
    root = tmp_path_factory.mktemp("st")
    encoder = root / "encoder"
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**dict(TINY, vocab_size=30522))).save_pretrained(encoder)
    transformers.AutoTokenizer.from_pretrained(str(packaged_minilm_path()),
                                               local_files_only=True).save_pretrained(encoder)
    transformer = Transformer(str(encoder))
    pooling = Pooling(transformer.get_word_embedding_dimension(), "cls")
    model = st.SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
    model.save(str(root / "st"))
    return root / "st", model


def test_sentence_transformers_folder_keeps_pooling_and_normalization(st_folder, tmp_path, capsys):
    folder, model = st_folder
    out = tmp_path / "st.onnx"
    code, stdout, err = run_cli(["-q", "export", str(folder), "-o", str(out)], capsys)
    assert code == 0, err
    onnx_model = load_model(out)
    assert [o.name for o in onnx_model.graph.output] == ["token_embeddings", "sentence_embedding"]
    meta = {p.key: p.value for p in onnx_model.metadata_props}
    assert meta["tqc.task"] == "sentence-embedding" and meta["tqc.tokenizer"] == str(folder.resolve())
    sentences = ["The cat sat on the mat.", "A second, longer sentence about nothing much at all, padded less."]
    feed = {k: v.astype(np.int64) for k, v in model.tokenizer(sentences, padding=True, return_tensors="np").items()}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    embedding = session.run(["sentence_embedding"], feed)[0]
    reference = model.encode(sentences, convert_to_numpy=True)
    assert np.abs(embedding - reference).max() <= 1e-4
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)  # Normalize kept


def test_sentence_transformers_folder_without_the_library_says_so(st_folder, tmp_path, capsys, monkeypatch):
    import sys

    folder, _ = st_folder
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails as if not installed
    out = tmp_path / "st.onnx"
    code, stdout, err = run_cli(["-q", "export", str(folder), "-o", str(out)], capsys)
    assert code == 0, err
    assert [o.name for o in load_model(out).graph.output] == ["last_hidden_state"]
    assert "note: sentence-transformers is not installed: exported last_hidden_state without the folder's " \
           "pooling" in stdout


def test_packaged_minilm_records_its_tokenizer_and_exports_its_embedding(exports, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from tqc.models.export import ExportSpec, export
    from tqc.compiler.io.packaged import packaged_minilm_path

    meta = {p.key: p.value for p in load_model(exports.get("minilm")).metadata_props}
    assert meta["tqc.tokenizer"] == "packaged:minilm" and meta["tqc.task"] == "feature-extraction"
    info = export(ExportSpec("minilm", task="sentence-embedding"), tmp_path / "emb.onnx")
    assert info["outputs"] == ["token_embeddings", "sentence_embedding"]
    model = st.SentenceTransformer(str(packaged_minilm_path()), device="cpu", local_files_only=True)
    sentences = ["Quantization keeps the answer.", "Mean pooling then L2 normalisation, inside the graph."]
    feed = {k: v.astype(np.int64) for k, v in model.tokenizer(sentences, padding=True, return_tensors="np").items()}
    session = ort.InferenceSession(str(tmp_path / "emb.onnx"), providers=["CPUExecutionProvider"])
    embedding = session.run(["sentence_embedding"], feed)[0]
    assert np.abs(embedding - model.encode(sentences, convert_to_numpy=True)).max() <= 1e-4
