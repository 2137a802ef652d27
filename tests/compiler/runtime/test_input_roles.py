"""Text data for any input names: tokenizer outputs reach a user export's inputs (ids/mask, reversed order, odd
names) by the role the graph gives them, checked numerically against the torch model on the same tokens."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from tqc.compiler.analysis.calib_data import DataSpec, FeedSource
from tqc.compiler.cli.main import main
from tqc.compiler.core.errors import TqcError
from tqc.compiler.runtime.feeds import input_roles, synthesize_feeds
from tqc.compiler.io.model import load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SENTENCES = ["The cat sat on the mat.", "Graphs do not name their inputs the way tokenizers do, and that is fine.",
             "Short one.", "A fourth sentence, for a second batch."]


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=30522, max_position_embeddings=128)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def tokenizer_dir():
    from tqc.compiler.io.packaged import packaged_minilm_path

    return str(packaged_minilm_path())  # bert-base-uncased's vocabulary (30522)


# Each wrapper is what a user might write: (input names in order, the role of each, forward).
WRAPPERS = {
    "ids_mask": (["ids", "mask"], ["input_ids", "attention_mask"],
                 lambda m, ids, mask: m(input_ids=ids, attention_mask=mask).last_hidden_state),
    "reversed_odd": (["key_padding", "words"], ["attention_mask", "input_ids"],
                     lambda m, pad, words: m(input_ids=words, attention_mask=pad).last_hidden_state),
    "three_odd": (["s", "m", "w"], ["token_type_ids", "attention_mask", "input_ids"],
                  lambda m, s, mk, w: m(input_ids=w, attention_mask=mk, token_type_ids=s).last_hidden_state),
}


class Wrapper(torch.nn.Module):
    def __init__(self, model, forward):
        super().__init__()
        self.model, self.fn = model, forward

    def forward(self, *args):
        return self.fn(self.model, *args)


def user_export(bert, kind: str, path, exporter: str = "legacy"):
    names, roles, forward = WRAPPERS[kind]
    sample = {"input_ids": torch.randint(5, 1000, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
              "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}
    args = tuple(sample[role] for role in roles)
    wrapper = Wrapper(bert, forward).eval()
    if exporter == "legacy":
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=["hidden"], dynamic_axes={n: {0: "b", 1: "s"} for n in names})
    else:
        batch, seq = torch.export.Dim("b", min=1, max=64), torch.export.Dim("s", min=1, max=120)
        program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=18, input_names=names,
                                    output_names=["hidden"],
                                    dynamic_shapes=(tuple({0: batch, 1: seq} for _ in names),))  # forward(*args)
        program.save(str(path))
    return dict(zip(names, roles))


@pytest.mark.parametrize("kind, exporter", [("ids_mask", "legacy"), ("reversed_odd", "legacy"),
                                            ("three_odd", "legacy"), ("ids_mask", "dynamo")])
def test_roles_from_the_graph_feed_text_exactly(kind, exporter, bert, tokenizer_dir, tmp_path):
    path = tmp_path / "user.onnx"
    expected_roles = user_export(bert, kind, path, exporter)
    model = load_model(path)
    assert input_roles(model) == expected_roles
    text = tmp_path / "s.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    feeds = list(FeedSource(DataSpec(str(text), tokenizer=tokenizer_dir, batch_size=2), model))
    assert len(feeds) == 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for start, feed in zip((0, 2), feeds):
        encoded = tokenizer(SENTENCES[start:start + 2], padding=True, return_tensors="pt")
        for name, role in expected_roles.items():
            assert feed[name].tolist() == encoded[role].tolist(), (name, role)
        got = session.run(["hidden"], feed)[0]
        with torch.no_grad():
            reference = bert(**{k: v for k, v in encoded.items()}).last_hidden_state.numpy()
        assert np.abs(got - reference).max() <= 1e-4
    # Verification inputs drawn for this graph: ids within the vocabulary, a padded mask.
    synthesized = synthesize_feeds(model, count=1)[0]
    names = {role: name for name, role in expected_roles.items()}
    assert synthesized[names["input_ids"]].max() < 30522
    assert synthesized[names["attention_mask"]].min() == 0 and synthesized[names["attention_mask"]].max() == 1


def test_calibrate_and_compile_cli_on_ids_mask(bert, tokenizer_dir, tmp_path, capsys):
    path = tmp_path / "user.onnx"
    user_export(bert, "ids_mask", path)
    text = tmp_path / "s.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    with pytest.raises(SystemExit) as info:
        main(["-q", "calibrate", str(path), "--data", str(text), "--tokenizer", tokenizer_dir, "-o",
              str(tmp_path / "t.json")])
    assert info.value.code == 0, capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", str(path), "-p", "fold,qdq", "--target", "ort-cpu", "--calib", str(text),
              "--tokenizer", tokenizer_dir, "-o", str(tmp_path / "q.onnx"), "--verify", "numeric"])
    assert info.value.code == 0, capsys.readouterr().err


class TwoMasks(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, a, b):
        return self.model(input_ids=ids, attention_mask=a * b).last_hidden_state


def test_ambiguous_inputs_ask_for_input_map(bert, tokenizer_dir, tmp_path, capsys):
    path = tmp_path / "two.onnx"
    ids, mask = torch.randint(5, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    torch.onnx.export(TwoMasks(bert).eval(), (ids, mask, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["ids", "a", "b"], output_names=["hidden"],
                      dynamic_axes={n: {0: "b", 1: "s"} for n in ["ids", "a", "b"]})
    model = load_model(path)
    text = tmp_path / "s.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    with pytest.raises(TqcError, match="cannot tell from the graph which tokenizer output feeds model input 'a': "
                                       "give --input-map a="):
        FeedSource(DataSpec(str(text), tokenizer=tokenizer_dir), model)
    feeds = list(FeedSource(DataSpec(str(text), tokenizer=tokenizer_dir,
                                     input_map={"a": "attention_mask", "b": "attention_mask"}), model))
    assert feeds[0]["a"].tolist() == feeds[0]["b"].tolist() and feeds[0]["a"].min() == 0
    # CLI: the same through --input-map, and a malformed or wrong map is one line, exit 2.
    for args, code, message in [
        (["--input-map", "a=attention_mask,b=attention_mask"], 0, None),
        ([], 2, "cannot tell from the graph"),
        (["--input-map", "a"], 2, "--input-map: 'a' is not MODEL_INPUT=NAME"),
        (["--input-map", "x=attention_mask"], 2, "--input-map: 'x' is not an input of the model"),
        (["--input-map", "a=mask,b=attention_mask"], 2, "--input-map: 'mask' is not a tokenizer output"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(["-q", "calibrate", str(path), "--data", str(text), "--tokenizer", tokenizer_dir, "-o",
                  str(tmp_path / "t.json"), *args])
        err = capsys.readouterr().err
        assert info.value.code == code, err
        if message:
            assert len(err.strip().splitlines()) == 1 and message in err, err


def test_input_map_renames_npz_arrays(bert, tmp_path):
    path = tmp_path / "user.onnx"
    user_export(bert, "ids_mask", path)
    data = tmp_path / "d.npz"
    np.savez(data, input_ids=np.full((2, 6), 7, np.int64), attention_mask=np.ones((2, 6), np.int64))
    with pytest.raises(TqcError, match="no data for model input"):
        list(FeedSource(DataSpec(str(data)), load_model(path)))
    feeds = list(FeedSource(DataSpec(str(data), input_map={"ids": "input_ids", "mask": "attention_mask"}),
                            load_model(path)))
    assert set(feeds[0]) == {"ids", "mask"} and feeds[0]["ids"][0, 0] == 7
