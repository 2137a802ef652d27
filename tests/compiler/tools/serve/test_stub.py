"""The text model's host side (``stub_model.py``) run through ``stub_harness`` with ONNX Runtime CPU inside: the
token tensors it feeds the model are the tokenizer's own padding (the path before session 7: the ids, mask and
type ids of ``transformers`` with ``padding=True``), on the CPU path and on the CUDA-graph buckets; embeddings
and token counts equal the model run on each text alone; several requests, errors among them, answer apart.
No tritonserver here (``test_serve.py`` runs the same stub inside one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.compiler.tools.test_triton_text import sentences

pytest.importorskip("tokenizers")

from tqc.compiler.tools.serve.repository import ServeOptions, tokenizer_env, write_repository  # noqa: E402
from tqc.compiler.tools.serve.stub_harness import Request, answer, load_stub, text_request  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def minilm(exports) -> Path:
    return exports.get("minilm")


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    from tqc.compiler.io.packaged import packaged_minilm_path

    return AutoTokenizer.from_pretrained(str(packaged_minilm_path()), local_files_only=True)


@pytest.fixture(scope="module")
def session(minilm):
    import onnxruntime as ort

    return ort.InferenceSession(str(minilm), providers=["CPUExecutionProvider"])


def stub(minilm: Path, folder: Path, bucketed: bool = False, **conf_changes):
    """The stub of a written repository's text model, initialized, its runner's feeds recorded in ``.fed``."""
    write_repository(ServeOptions(model=str(minilm), name="m", endpoints=("text",), threads=1), folder / "repo", [])
    version = folder / "repo" / "m_text" / "1"
    conf = dict(json.loads((version / "serve.json").read_text()), **conf_changes)
    model = load_stub(version, conf).TritonPythonModel()
    model.initialize({})
    model.runner.bucketed = bucketed  # ORT CPU runs the CUDA path's bucket shapes as well
    model.fed = []
    run = model.runner.run
    model.runner.run = lambda feed: (model.fed.append({k: v.copy() for k, v in feed.items()}), run(feed))[1]
    return model


def alone(session, hf_tokenizer, texts: list[str], max_length: int = 256) -> np.ndarray:
    """Each text on its own, unpadded: mean over its tokens, L2-normalised (sentence-transformers)."""
    rows = []
    for text in texts:
        enc = hf_tokenizer([text], truncation=True, max_length=max_length, return_tensors="np")
        hidden = session.run(None, {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask",
                                                                           "token_type_ids")})[0][0]
        rows.append(hidden.mean(axis=0) / np.linalg.norm(hidden.mean(axis=0)))
    return np.stack(rows)


def padded(hf_tokenizer, texts: list[str], **kwargs) -> dict[str, np.ndarray]:
    enc = hf_tokenizer(texts, truncation=True, return_tensors="np", **{"max_length": 256, **kwargs})
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def test_token_tensors_are_the_tokenizers_padding_and_answers_are_exact(minilm, session, hf_tokenizer, tmp_path):
    """One group (max_padding 1): the feed equals transformers' padded batch exactly, long text truncated."""
    texts = sentences(6, skip=10) + ["Été à Zürich: naïve café ☕", " ".join(sentences(40))]
    model = stub(minilm, tmp_path, max_padding=1.0)
    got = answer(model.execute([text_request(texts)])[0])
    expected = padded(hf_tokenizer, texts, padding=True)
    assert len(model.fed) == 1
    for name, value in expected.items():
        np.testing.assert_array_equal(model.fed[0][name], value, err_msg=name)
    np.testing.assert_array_equal(got["token_count"][:, 0], expected["attention_mask"].sum(axis=1))
    assert got["token_count"][-1, 0] == 256
    np.testing.assert_allclose(got["embeddings"], alone(session, hf_tokenizer, texts), atol=TOL, rtol=0)
    assert model.single_encode in ("encode", "encode_batch_fast")  # the faster on this host, raced at load
    for single in (lambda tokenizer, text: [tokenizer.encode(text)],
                   lambda tokenizer, text: model.encode_batch(tokenizer, [text])):
        model.encode_one = single  # batch 1, either way: its own ids, no padding, truncated alike
        for text in (texts[0], texts[-1]):
            one = answer(model.execute([text_request([text])])[0])
            np.testing.assert_array_equal(model.fed[-1]["input_ids"], padded(hf_tokenizer, [text])["input_ids"])
            np.testing.assert_allclose(one["embeddings"], got["embeddings"][texts.index(text)][None], atol=TOL, rtol=0)


def test_cuda_graph_buckets_pad_to_powers_of_two_and_copy_the_first_row(minilm, session, hf_tokenizer, tmp_path):
    texts = sentences(5, skip=40)
    model = stub(minilm, tmp_path, bucketed=True)
    got = answer(model.execute([text_request(texts)])[0])
    feed = model.fed[0]
    longest = max(len(hf_tokenizer(t)["input_ids"]) for t in texts)
    seq = max(16, 1 << (longest - 1).bit_length())
    assert feed["input_ids"].shape == (8, seq)
    expected = padded(hf_tokenizer, texts, padding="max_length")  # 256, cut to the bucket below
    for name, value in expected.items():
        np.testing.assert_array_equal(feed[name][:5], value[:, :seq], err_msg=name)
        np.testing.assert_array_equal(feed[name][5:], np.repeat(value[:1, :seq], 3, axis=0), err_msg=name)
    np.testing.assert_allclose(got["embeddings"], alone(session, hf_tokenizer, texts), atol=TOL, rtol=0)
    answer(model.execute([text_request(["short"])])[0])
    assert model.fed[-1]["input_ids"].shape == (1, 16)


def test_several_requests_with_errors_among_them(minilm, session, hf_tokenizer, tmp_path):
    """Length groups (max_padding 0.5), one request of three texts, bad requests in between: each answered apart."""
    short = [" ".join(t.split()[:3]) for t in sentences(2, skip=150)]
    long_ = [" ".join(sentences(3, skip=160 + 3 * i)) for i in range(2)]
    model = stub(minilm, tmp_path)
    requests = [text_request([long_[0], short[0], long_[1]]), text_request(["   "]),
                Request({"TEXT": np.array([[0xFF, 0xFE, 0x41]], dtype=np.uint8)}), text_request([short[1]]),
                Request({})]
    got = [answer(r) for r in model.execute(requests)]
    assert "empty" in got[1] and "UTF-8" in got[2] and "missing" in got[4], got
    assert len(model.fed) == 2  # the short and the long texts ran apart
    np.testing.assert_allclose(got[0]["embeddings"], alone(session, hf_tokenizer, [long_[0], short[0], long_[1]]),
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(got[3]["embeddings"], alone(session, hf_tokenizer, [short[1]]), atol=TOL, rtol=0)
    assert list(got[3]["token_count"][:, 0]) == [len(hf_tokenizer(short[1])["input_ids"])]


def test_long_text_error_refuses_a_cut_text_but_not_one_exactly_at_the_limit(minilm, hf_tokenizer, tmp_path):
    prefixes = [(" ".join(words[:n]), " ".join(words[:n + 3])) for words in
                (" ".join(sentences(3, skip=skip)).split() for skip in range(20, 40)) for n in range(1, 20)]
    exact, longer = next(pair for pair in prefixes if len(hf_tokenizer(pair[0])["input_ids"]) == 16)
    model = stub(minilm, tmp_path, long_text="error", max_length=16)
    ok, cut, both = (answer(r) for r in model.execute([text_request([exact]), text_request([longer]),
                                                        text_request([exact, longer])]))
    assert ok["token_count"][0, 0] == 16
    assert "longer than the model's limit of 16 tokens" in cut and "longer than" in both


def test_timings_split_execute_into_its_steps(minilm, tmp_path):
    model = stub(minilm, tmp_path, timings=str(tmp_path / "m_text.timings.json"))
    for _ in range(3):
        model.execute([text_request(sentences(1, skip=5))])
    model.finalize()
    shapes = json.loads((tmp_path / "m_text.timings.json").read_text())
    (shape, entry), = shapes.items()
    tokenize, run, pool, calls, decode, respond, execute = entry
    assert shape.startswith("1x") and calls == 3
    assert min(tokenize, run, decode, respond) > 0 and tokenize + run + pool + decode + respond <= execute


def test_tokenizer_threads_are_the_cores_divided_among_the_instances():
    assert tokenizer_env(1, cores=16) == {"RAYON_NUM_THREADS": "16"}
    assert tokenizer_env(4, cores=16) == {"RAYON_NUM_THREADS": "4"}
    assert tokenizer_env(3, cores=16) == {"RAYON_NUM_THREADS": "5"}
    assert tokenizer_env(2, cores=2) == {"TOKENIZERS_PARALLELISM": "false"}
    assert tokenizer_env(64, cores=16) == {"TOKENIZERS_PARALLELISM": "false"}


def test_long_texts_tokenized_by_their_heads_give_the_whole_texts_tokens(minilm, hf_tokenizer, tmp_path):
    """cut_chars: a text longer than that is tokenized up to a space first; the ids fed are transformers' for the
    whole text truncated at the limit, one text or a batch, whether the head reached the limit or not."""
    base = " ".join(sentences(30, skip=60))
    texts = [base,  # real English: the head reaches the limit
             "Été à Zürich, naïve café ☕ " * 20,  # accents, an emoji
             "東京は日本の首都です。" * 20,  # CJK: a token per character, no space to cut at
             "a\tb\nc  d\u00a0e \u0301f " * 40,  # tabs, newlines, double spaces, NBSP, a mark after a space
             ("x" * 150 + " ") * 6 + base,  # words over WordPiece's 100 characters ([UNK]): the head falls short
             "[MASK] a " * 30 + base,  # special tokens in the text
             "antidisestablishmentarianism " * 30,  # long words: few tokens per character
             "hello " + "qz" * 46 + "ꙮ and the words after it " * 4,  # the cut word: [UNK] whole, 92 pieces cut
             sentences(1, skip=3)[0]]  # short: never cut
    model = stub(minilm, tmp_path, max_padding=1.0, max_length=16, cut_chars=96)
    seen = set()  # every text handed to the tokenizer, one text or a batch
    run = model._run_tokenizer
    model._run_tokenizer = lambda batch: (seen.update(batch), run(batch))[1]
    expected = padded(hf_tokenizer, texts, padding=True, max_length=16)
    got = answer(model.execute([text_request(texts)])[0])
    np.testing.assert_array_equal(model.fed[-1]["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["token_count"][:, 0], expected["attention_mask"].sum(axis=1))
    whole = {2, 4, 7, 8}  # CJK (no space after 96 characters), the heads that fell short, the short text
    assert {row for row, text in enumerate(texts) if text in seen} == whole
    assert len(seen) == len(texts) + 2  # seven heads, the CJK and short texts, then two texts whole
    for row, text in enumerate(texts):
        seen.clear()
        answer(model.execute([text_request([text])])[0])
        np.testing.assert_array_equal(model.fed[-1]["input_ids"], padded(hf_tokenizer, [text], max_length=16)["input_ids"])
        assert (text in seen) == (row in whole)
        assert seen == {text} if row in (2, 8) else min(map(len, seen)) < len(text)  # a head tokenized first
    model = stub(minilm, tmp_path / "error", long_text="error", max_length=16, cut_chars=96)
    refused, ok = (answer(r) for r in model.execute([text_request([texts[0]]), text_request([texts[-1][:40]])]))
    assert "longer than the model's limit of 16 tokens" in refused and ok["token_count"][0, 0] < 16


def test_only_tokenizers_whose_words_end_at_a_space_are_cut(minilm, hf_tokenizer, tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from tqc.compiler.tools.serve.repository import cut_at_space

    write_repository(ServeOptions(model=str(minilm), name="m", endpoints=("text",), max_length=128), tmp_path, [])
    assert json.loads((tmp_path / "m_text" / "1" / "serve.json").read_text())["cut_chars"] == 6 * 128

    minilm = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    assert cut_at_space(minilm)
    words = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    words.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase()])
    words.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    assert cut_at_space(json.loads(words.to_str()))
    words.add_tokens(["new york"])  # an added token holding a space may span the cut
    assert not cut_at_space(json.loads(words.to_str()))
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert not cut_at_space(json.loads(byte_level.to_str()))
    assert not cut_at_space(dict(minilm, normalizer={"type": "Replace", "pattern": {"String": " "}, "content": "_"}))
    assert not cut_at_space(dict(minilm, pre_tokenizer={"type": "Metaspace", "replacement": "▁"}))


def test_printable_ascii_texts_go_to_the_cached_words_or_the_plain_tokenizer_with_the_same_tokens(
        minilm, hf_tokenizer, tmp_path):
    """BertNormalizer on printable ASCII only lowercases: those texts run without it (by their cached words, or, when
    one holds an added token's text, by the tokenizer without the normalizer), every other text with it."""
    ascii_texts = [t for t in sentences(400) if t.isascii() and t.isprintable()][:300] + [
        "~^|{}\\ `quoted' 1,234.5e-6 CamelCaseWord  double  spaces", "ALL CAPS TEXT!!! ??? ... ---", "x" * 150 + " tail"]
    added = ["Hello [MASK] world [mask] [CLS]x[SEP]", "[UNK][PAD] tokens"]
    others = ["Été à Zürich", "tab\there", "line\nbreak", "control\x07char", "東京 Tokyo", "soft\u00adhyphen"]
    model = stub(minilm, tmp_path, max_padding=1.0)
    assert model.ascii_tokenizer is not None and str(model.ascii_tokenizer.normalizer) == "Lowercase()"
    assert model.wordpiece_words is not None
    for text in ascii_texts + added + others:
        assert model.ascii_tokenizer.encode(text).ids == model.tokenizer.encode(text).ids or text in others
    used = []
    for name in ("tokenizer", "ascii_tokenizer", "wordpiece_words"):
        tokenizer = getattr(model, name)
        setattr(model, name, type("Recorded", (), {
            "encode": lambda self, text, tokenizer=tokenizer, name=name: (used.append(name), tokenizer.encode(text))[1],
            "encode_batch_fast": lambda self, texts, tokenizer=tokenizer, name=name: (
                used.append(name), tokenizer.encode_batch_fast(texts))[1]})())
    for batch, expect in ((ascii_texts[:20], ["wordpiece_words"] * 20), (ascii_texts[-3:] + others[:1], ["tokenizer"]),
                          ([ascii_texts[-3]], ["wordpiece_words"]), ([others[3]], ["tokenizer"]),
                          (ascii_texts[:2] + added[:1], ["wordpiece_words"] * 3 + ["ascii_tokenizer"]),
                          (added[1:], ["wordpiece_words", "ascii_tokenizer"])):
        used.clear()
        got = answer(model.execute([text_request(batch)])[0])
        np.testing.assert_array_equal(model.fed[-1]["input_ids"], padded(hf_tokenizer, batch, padding=True)["input_ids"])
        assert used == expect and got["token_count"].shape == (len(batch), 1)


def test_cached_words_give_the_tokenizers_ids_type_ids_and_truncation(minilm, tmp_path):
    """``WordPieceWords`` against the tokenizer itself: ids, type ids and whether the text was cut, on real
    sentences, on every printable ASCII character, at and around the token limit, and with its cache emptied
    when full; a tokenizer it does not reproduce gets no fast path."""
    from tokenizers import pre_tokenizers

    model = stub(minilm, tmp_path, max_length=32)
    fast, tokenizer = model.wordpiece_words, model._load_tokenizer()
    assert fast is not None and fast.room == 30
    printable = "".join(chr(c) for c in range(32, 127))
    words = " ".join(sentences(10)).split()
    texts = [t for t in sentences(200, skip=100) if t.isascii() and t.isprintable()] + [
        printable, printable[::-1], " ".join(printable), "a" * 101, "b" * 100 + "!", "  lead and trail  "] + [
        " ".join(words[:count]) for count in range(16, 36)]
    cut = 0
    for max_words in (1 << 16, 7):
        fast.cache.clear()
        fast.max_words = max_words
        for text in texts:
            mine, theirs = fast.encode(text), tokenizer.encode(text)
            assert mine.ids == theirs.ids and mine.type_ids == theirs.type_ids, text
            assert bool(mine.overflowing) == bool(theirs.overflowing) and len(mine) <= 32, text
            cut += bool(mine.overflowing)
        assert len(fast.cache) <= max_words
        assert max(map(len, fast.cache)) <= fast.longest == 100 and "a" * 101 not in fast.cache
    assert 10 < cut < len(texts) * 2  # both sides of the limit were seen
    assert fast.encode("a [MASK] here") is None and fast.encode("a [mask] here") is None
    byte_level = model._load_tokenizer()
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert type(fast).for_tokenizer(byte_level, 32) is None


def test_one_text_and_a_batch_pad_with_the_tokenizers_pad_id(minilm, hf_tokenizer, tmp_path):
    """The batch-1 path (one block for every input) and the batch path pad alike, with the pad id the repository
    recorded (7 here, so a zero left over would show)."""
    texts = sentences(3, skip=70)
    model = stub(minilm, tmp_path, bucketed=True, pad_id=7)
    for batch in ([texts[0]], texts):
        answer(model.execute([text_request(batch)])[0])
        fed, expected = model.fed[-1], padded(hf_tokenizer, batch, padding=True)
        length = expected["input_ids"].shape[1]
        real = expected["attention_mask"].astype(bool)
        for name, value in expected.items():
            np.testing.assert_array_equal(fed[name][:len(batch), :length][real], value[real], err_msg=name)
            np.testing.assert_array_equal(fed[name][:len(batch), :length][~real], 7 if name == "input_ids" else 0)
        assert (fed["input_ids"][:len(batch), length:] == 7).all() and fed["input_ids"].shape[1] in (16, 32, 64)
        assert not fed["attention_mask"][:len(batch), length:].any() and not fed["token_type_ids"][:, length:].any()


def test_cuda_graph_buffers_get_a_copy_only_of_the_inputs_that_changed(minilm, tmp_path):
    """``OrtCudaRunner`` with CUDA graphs, its ORT faked (no GPU here): a bucket's device buffers are copied into
    only when the feed differs from what they hold, so they always hold the last feed, and each bucket has its
    own buffers and graph id."""
    version = tmp_path / "repo" / "m_text" / "1"
    write_repository(ServeOptions(model=str(minilm), name="m", endpoints=("text",), threads=1), tmp_path / "repo", [])
    module = load_stub(version, json.loads((version / "serve.json").read_text()))
    copies = []

    class Device:  # an OrtValue on the device: what the graph reads
        def __init__(self, array):
            self.array = np.array(array)

        def update_inplace(self, array):
            copies.append(array.shape)
            self.array[...] = array

        def numpy(self):
            return self.array.copy()

    class Binding:
        def __init__(self):
            self.bound = {}

        def bind_ortvalue_input(self, name, value):
            self.bound[name] = value

        def bind_ortvalue_output(self, name, value):
            self.bound[name] = value

    class Options:
        def add_run_config_entry(self, key, value):
            self.graph_id = value

    def run_with_iobinding(binding, options):  # the "model": the sum of its inputs per row
        ran.append(options.graph_id)
        total = sum(binding.bound[name].array.sum(axis=1) for name in ("input_ids", "attention_mask", "token_type_ids"))
        binding.bound["out"].array[...] = total[:, None]

    ran = []
    runner = object.__new__(module.OrtCudaRunner)
    runner.cuda_graph, runner.graphs = True, {}
    runner.ort = type("Ort", (), {"OrtValue": type("V", (), {
        "ortvalue_from_numpy": staticmethod(lambda value, device, index: Device(value)),
        "ortvalue_from_shape_and_type": staticmethod(lambda shape, dtype, device, index: Device(np.zeros(shape, dtype)))}),
        "RunOptions": Options})
    runner.session = type("Session", (), {"io_binding": lambda self: Binding(),
                                          "run_with_iobinding": lambda self, b, o: run_with_iobinding(b, o)})()
    names = ("input_ids", "attention_mask", "token_type_ids")
    runner.inputs = {name: type("Meta", (), {"shape": ["batch", "seq"]}) for name in names}
    runner.outputs = [type("Meta", (), {"name": "out", "shape": ["batch", 1], "type": "tensor(int64)"})]
    rng = np.random.default_rng(0)
    feeds = []
    for length in (5, 5, 9, 9, 16, 3):
        for _ in range(2):
            seq = 16
            ids = np.zeros((1, seq), np.int64)
            ids[0, :length] = rng.integers(1, 100, length)
            mask = (np.arange(seq) < length).astype(np.int64)[None]
            feeds.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((1, seq), np.int64)})
    feeds.append({name: np.ones((2, 32), np.int64) for name in names})  # another bucket
    feeds.append(feeds[0])
    expected_copies = 0
    for index, feed in enumerate(feeds):
        copies_before = len(copies)
        got = runner.run(feed)["out"]
        assert got[:, 0].tolist() == sum(feed[name].sum(axis=1) for name in names).tolist()
        previous = [f for f in feeds[:index] if f["input_ids"].shape == feed["input_ids"].shape]
        if previous:
            expected = sum(not np.array_equal(feed[name], previous[-1][name]) for name in names)
            assert len(copies) - copies_before == expected
            expected_copies += expected
    assert len(copies) == expected_copies and 0 < expected_copies < 2 * len(feeds)
    assert ran[-2] == "2" and ran[-1] == ran[0] == "1"
