"""Printable ASCII text to BERT WordPiece ids, word by word from a cache: the fast path of both Triton python
models tqc writes (``serve/stub_model.py``, and ``tools/triton_tokenizer_model.py`` of ``export-triton --text``),
each of which loads this file from beside itself (the standard library only).
"""

import json
import re


class Ids:
    """An encoding of ``WordPieceWords``: what the Triton models read of the tokenizer's Encoding (ids, type ids,
    overflowing)."""

    __slots__ = ("ids", "overflowing")

    def __init__(self, ids, overflowing):
        self.ids = ids
        self.overflowing = overflowing

    @property
    def type_ids(self):
        return [0] * len(self.ids)

    def __len__(self):
        return len(self.ids)


class WordPieceWords:
    """``encode`` of a printable ASCII text for a BERT WordPiece tokenizer, word by word from a cache.

        "Hello, world!" -> lowercased (if the normalizer lowercases) -> words as BertPreTokenizer splits printable
        ASCII ("hello" "," "world" "!": runs of letters and digits; any other non-space character alone) ->
        each word's ids from the cache, filled by the tokenizer's own WordPiece (``model.tokenize``) -> [CLS] ...
        [SEP] around, the words cut at the limit as the tokenizer's truncation cuts them

    Same ids as the tokenizer (checked at load on probe texts, else not used; ``test_stub`` checks real sentences
    and hostile strings). A text holding an added token's text ("[MASK]") is left to the tokenizer (None). The
    Rust encode's cost is mostly building its Encoding (tokens, offsets, masks as Python objects): on the
    2-core Xeon, 175 -> 20 us for a text of 128 tokens with its words cached, 67 -> 18 us a real sentence with an
    empty cache. The cache holds at most ``max_words`` words of at most ``longest`` characters (then starts
    again)."""

    WORDS = re.compile(r"[A-Za-z0-9]+|[^A-Za-z0-9 ]")
    PROBES = ("Hello, World! It's 3.14 -- [ok]? ~^|{}\\ `quoted' 1,234.5e-6 CamelCaseWord  double  spaces_x",
              "the compiler fuses attention and quantizes matrix products " * 30, "x" * 150 + " tail", "a")

    def __init__(self, tokenizer, spec, empty, max_length, max_words=1 << 16):
        """``empty``: the tokenizer's encoding of "" (its special tokens alone)."""
        self.model = tokenizer.model
        self.lowercase = (spec.get("normalizer") or {}).get("lowercase", True)
        self.prefix, self.suffix = empty.ids[:1], empty.ids[1:]
        self.room = max_length - len(empty.ids)  # words' ids that fit with the special tokens
        self.added = tuple({(t["content"].lower() if self.lowercase else t["content"])
                            for t in spec.get("added_tokens") or []})
        # a word longer than WordPiece takes is one [UNK]: not cached, so no client text fills memory
        self.longest = int((spec.get("model") or {}).get("max_input_chars_per_word") or 100)
        self.cache = {}
        self.max_words = max_words

    @classmethod
    def for_tokenizer(cls, tokenizer, max_length):
        """The fast path if this tokenizer is one it reproduces (BertNormalizer, BertPreTokenizer, WordPiece, one
        special token before and the rest after, right truncation, type ids 0) and gives its ids on the probes."""
        spec = json.loads(tokenizer.to_str())
        kinds = [(spec.get(key) or {}).get("type") for key in ("normalizer", "pre_tokenizer", "model")]
        truncation = spec.get("truncation") or {}
        if kinds != ["BertNormalizer", "BertPreTokenizer", "WordPiece"] or truncation.get("direction", "Right") != "Right":
            return None
        empty = tokenizer.encode("")
        if len(empty.ids) != 2 or any(empty.type_ids):
            return None
        fast = cls(tokenizer, spec, empty, max_length)
        for text in cls.PROBES:
            mine, theirs = fast.encode(text), tokenizer.encode(text)
            if mine is None or mine.ids != theirs.ids or any(theirs.type_ids) or bool(mine.overflowing) != bool(theirs.overflowing):
                return None
        fast.cache.clear()
        return fast

    def encode(self, text):
        if self.lowercase:
            text = text.lower()
        for added in self.added:
            if added in text:
                return None
        cache, room, ids = self.cache, self.room, []
        for word in self.WORDS.findall(text):
            pieces = cache.get(word)
            if pieces is None:
                pieces = [token.id for token in self.model.tokenize(word)]
                if len(word) <= self.longest:
                    if len(cache) >= self.max_words:
                        cache.clear()
                    cache[word] = pieces
            ids += pieces
            if len(ids) > room:
                return Ids(self.prefix + ids[:room] + self.suffix, True)
        return Ids(self.prefix + ids + self.suffix, False)
