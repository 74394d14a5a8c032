"""Tokenizers against independent references, on files built here (no model hub).

References: the raw sentencepiece processor; transformers' GPT2Tokenizer and a pure-Python
port of OpenAI's original GPT-2 encoder; transformers' BertTokenizer and its pure-Python
BertTokenizerLegacy.
"""

import json
import random
from functools import lru_cache

import numpy as np
import pytest
import regex

from jaxformer import tokenizer as jt

WORDS = ("the quick brown fox jumps over lazy dog model token layer tensor pipeline shard "
         "mesh attention cache decode prefill sample greedy jax flax kernel vocabulary Hello World "
         "naïve café résumé Straße 東京 日本語 emoji 😀 🚀 42 3.14159 1,000,000 don't it's").split()

TEXTS = [
    "Hello world",
    " Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé — Straße",
    "東京は日本語です",
    "emoji: 😀🚀👍🏽 and ZWJ 👨‍👩‍👧",
    "numbers 42, 3.14159 and 1,000,000!",
    "  leading, trailing   and   multiple spaces  ",
    "tabs\tand\nnewlines\n\n and\r\nCRLF",
    "don't it's we'll THEY'RE",
    "UPPER lower MiXeD",
    "unseenwordxyz qqqq zzzz",
    "",
]


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


# --------------------------------------------------------------------------- fixtures: files


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(corpus()), "utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, pad_id=3,
        minloglevel=2, num_threads=1)
    (d / "corpus.txt").unlink()
    (d / "tokenizer.vocab").unlink()
    return d


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("bpe")
    trainer = ByteLevelBPETokenizer(add_prefix_space=False)
    trainer.train_from_iterator(corpus(), vocab_size=400, min_frequency=2,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    trainer.save_model(str(d))
    assert sorted(p.name for p in d.iterdir()) == ["merges.txt", "vocab.json"]
    return d


BERT_WORDS = ("the quick brown fox jump over lazy dog model token layer hello world cafe resume "
              "naive strasse 東 京 日 本 42 3 14159 1 000 don t it s we ll they re upper lower mixed "
              ", . ! ' - : — ( )").split()
BERT_PIECES = ("##s ##ed ##ing ##er ##a ##b ##c ##d ##e ##f ##g ##h ##i ##j ##k ##l ##m ##n ##o ##p "
               "##q ##r ##t ##u ##v ##w ##x ##y ##z ##1 ##2 ##4 ##5 ##9").split()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    letters = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS + ["Hello", "World", "UPPER"] \
        + letters + BERT_PIECES
    (d / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", "utf-8")
    return d


# ------------------------------------------------------------- reference: OpenAI's GPT-2 encoder


@lru_cache()
def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class OpenAIEncoder:
    """openai/gpt-2 src/encoder.py, the algorithm every GPT-2 tokenizer must reproduce."""

    PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, d):
        self.encoder = json.loads((d / "vocab.json").read_text("utf-8"))
        self.decoder = {v: k for k, v in self.encoder.items()}
        lines = (d / "merges.txt").read_text("utf-8").split("\n")[1:]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(x for x in lines if x)}
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}

    def bpe(self, token):
        word = tuple(token)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    def encode(self, text):
        ids = []
        for tok in regex.findall(self.PAT, text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(tok))
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------ sentencepiece


def test_sentencepiece_matches_processor(spm_dir):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    tok = jt.SentencePieceTokenizer(spm_dir / "tokenizer.model")
    assert tok.vocab_size == ref.get_piece_size() == 400
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_id(), ref.eos_id(), 3)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids), text
    # Byte fallback covers characters the tiny model never saw, so round trips are exact
    # up to sentencepiece's own whitespace normalisation (runs of spaces collapse).
    assert tok.decode(tok.encode("emoji 😀 東京 42")) == "emoji 😀 東京 42"
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id


def test_sentencepiece_disabled_specials_are_none(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(200)), model_prefix=str(tmp_path / "tokenizer"), vocab_size=80,
        bos_id=-1, pad_id=-1, character_coverage=1.0, minloglevel=2, num_threads=1)
    tok = jt.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 2, None)
    assert tok.special_ids == {2}
    with pytest.raises(ValueError, match="no bos"):
        tok.encode("hello", add_bos=True)


def test_sentencepiece_decode_skips_specials(spm_dir):
    tok = jt.SentencePieceTokenizer(spm_dir / "tokenizer.model")
    ids = tok.encode("the quick brown fox")
    padded = [tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(padded) == "the quick brown fox"
    # numpy input, as generation hands back arrays
    assert tok.decode(np.array(padded, dtype=np.int32)) == "the quick brown fox"
    # an id from a padded embedding row past the vocabulary carries no text
    assert tok.decode([*ids, tok.vocab_size + 5]) == "the quick brown fox"


# ------------------------------------------------------------------------------- GPT-2 BPE


def test_gpt2_bpe_matches_transformers_and_openai(bpe_dir):
    from transformers import GPT2Tokenizer

    hf = GPT2Tokenizer.from_pretrained(str(bpe_dir))
    ref = OpenAIEncoder(bpe_dir)
    tok = jt.GPT2BPETokenizer(bpe_dir / "vocab.json", bpe_dir / "merges.txt")
    assert tok.vocab_size == len(ref.encoder) == len(hf)
    eot = ref.encoder["<|endoftext|>"]
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (eot, eot, None)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text == ref.decode(ids)
    # the learned merges are really used: a corpus word is far fewer tokens than bytes
    assert len(tok.encode(" pipeline attention")) < len(" pipeline attention") // 2


def test_gpt2_bpe_endoftext_is_one_special_id(bpe_dir):
    from transformers import GPT2Tokenizer

    hf = GPT2Tokenizer.from_pretrained(str(bpe_dir))
    tok = jt.GPT2BPETokenizer(bpe_dir / "vocab.json", bpe_dir / "merges.txt")
    text = "end of doc<|endoftext|>next doc"
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ids.count(tok.eos_id) == 1
    assert tok.decode(ids) == "end of docnext doc"
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_gpt2_bpe_decode_invalid_utf8_replaces(bpe_dir):
    ref = OpenAIEncoder(bpe_dir)
    tok = jt.GPT2BPETokenizer(bpe_dir / "vocab.json", bpe_dir / "merges.txt")
    # first byte of a 4-byte emoji alone: not valid UTF-8
    lone = ref.encoder[_bytes_to_unicode()[0xF0]]
    assert tok.decode([lone]) == ref.decode([lone]) == "\ufffd"


# ------------------------------------------------------------------------------- WordPiece


@pytest.mark.parametrize("lowercase", [True, False])
def test_wordpiece_matches_bert(bert_dir, lowercase):
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = str(bert_dir / "vocab.txt")
    hf = BertTokenizer.from_pretrained(str(bert_dir), do_lower_case=lowercase)
    legacy = BertTokenizerLegacy(vocab, do_lower_case=lowercase)
    tok = jt.WordPieceTokenizer(bert_dir / "vocab.txt", lowercase=lowercase)
    assert tok.vocab_size == len(legacy.vocab)
    unk = legacy.vocab["[UNK]"]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ids == legacy.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert unk not in tok.encode("hello world")
    cased = tok.encode("Hello World")
    assert (cased == tok.encode("hello world")) is lowercase


def test_wordpiece_encode_for_model(bert_dir):
    from transformers import BertTokenizer

    hf = BertTokenizer.from_pretrained(str(bert_dir))
    tok = jt.WordPieceTokenizer(bert_dir / "vocab.txt")
    ids, types = tok.encode_for_model("the quick fox")
    ref = hf("the quick fox")
    assert ids == ref["input_ids"] and types == ref["token_type_ids"]
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and set(types) == {0}

    ids, types = tok.encode_pair("hello world", "the lazy dogs jumped")
    ref = hf("hello world", "the lazy dogs jumped")
    assert ids == ref["input_ids"] and types == ref["token_type_ids"]
    assert ids.count(tok.sep_id) == 2 and types[-1] == 1 and types[0] == 0
    assert tok.decode(ids) == "hello world the lazy dogs jumped"


# -------------------------------------------------------------------------------------- bytes


def test_byte_tokenizer_round_trip_and_specials():
    tok = jt.ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (259, 256, 257, 258)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    ids = tok.encode("é😀", add_bos=True)
    assert ids[0] == 257 and len(ids) == 1 + 2 + 4
    assert tok.decode([*ids, 256, 258, 258]) == "é😀"
    assert tok.decode([257, 104, 105, 256], skip_special_tokens=False) == "<bos>hi<eos>"


def test_byte_tokenizer_invalid_utf8_never_raises():
    tok = jt.ByteTokenizer()
    assert tok.decode([0xFF, 0xFE, ord("a")]) == "\ufffd\ufffda"
    assert tok.decode([0xF0, 0x9F]) == "\ufffd"  # truncated emoji
    rng = np.random.default_rng(0)
    for _ in range(50):
        tok.decode(rng.integers(0, 259, size=32))
    # ids past the vocabulary (padded embedding rows) carry no text; negative ids are a bug
    assert tok.decode([104, 300, 105, 259]) == "hi"
    with pytest.raises(ValueError, match="negative"):
        tok.decode([104, -1])


# ---------------------------------------------------------------------- load_tokenizer / save


def test_load_tokenizer_detects_each_kind(spm_dir, bpe_dir, bert_dir, tmp_path):
    assert isinstance(jt.load_tokenizer(spm_dir), jt.SentencePieceTokenizer)
    assert isinstance(jt.load_tokenizer(spm_dir / "tokenizer.model"), jt.SentencePieceTokenizer)
    assert isinstance(jt.load_tokenizer(bpe_dir), jt.GPT2BPETokenizer)
    assert isinstance(jt.load_tokenizer(bert_dir), jt.WordPieceTokenizer)
    assert isinstance(jt.load_tokenizer(bert_dir / "vocab.txt"), jt.WordPieceTokenizer)

    from transformers import GPT2Tokenizer

    hf_dir = tmp_path / "hf"
    GPT2Tokenizer.from_pretrained(str(bpe_dir)).backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    hf_dir.mkdir()
    (tmp_path / "tokenizer.json").rename(hf_dir / "tokenizer.json")
    tok = jt.load_tokenizer(hf_dir)
    ref = jt.GPT2BPETokenizer(bpe_dir / "vocab.json", bpe_dir / "merges.txt")
    assert isinstance(tok, jt.HFJsonTokenizer)
    assert tok.eos_id == ref.eos_id
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["spm", "bpe", "bert", "byte", "hf_json"])
def test_save_load_round_trip(kind, spm_dir, bpe_dir, bert_dir, tmp_path):
    if kind == "spm":
        tok = jt.SentencePieceTokenizer(spm_dir / "tokenizer.model")
    elif kind == "bpe":
        tok = jt.GPT2BPETokenizer(bpe_dir / "vocab.json", bpe_dir / "merges.txt")
    elif kind == "bert":
        tok = jt.WordPieceTokenizer(bert_dir / "vocab.txt", lowercase=False)
    elif kind == "byte":
        tok = jt.ByteTokenizer()
    else:
        tok = jt.HFJsonTokenizer(_hf_json(bpe_dir, tmp_path))
    out = tok.save(tmp_path / "ckpt" / "tokenizer")
    back = jt.load_tokenizer(tmp_path / "ckpt")  # found in the tokenizer/ subdirectory
    assert type(back) is type(tok) and back.name == tok.name
    assert (back.vocab_size, back.bos_id, back.eos_id, back.pad_id) == \
        (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)
    # saving onto its own source directory must not corrupt the files
    tok2 = jt.load_tokenizer(out)
    tok2.save(out)
    assert jt.load_tokenizer(out).encode(TEXTS[2]) == tok.encode(TEXTS[2])


def _hf_json(bpe_dir, tmp_path):
    from transformers import GPT2Tokenizer

    path = tmp_path / "src_json" / "tokenizer.json"
    path.parent.mkdir()
    GPT2Tokenizer.from_pretrained(str(bpe_dir)).backend_tokenizer.save(str(path))
    return path


def test_special_token_configs_are_honoured(spm_dir, bert_dir, tmp_path):
    import shutil

    d = tmp_path / "spm_cfg"
    shutil.copytree(spm_dir, d)
    base = jt.load_tokenizer(d)
    pieces = [base.id_to_token(i) for i in (10, 11, 12)]
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": pieces[0], "eos_token": {"content": pieces[1], "special": True}, "pad_token": None}))
    tok = jt.load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (10, 11, base.pad_id)
    # special_tokens_map.json overrides tokenizer_config.json, as in transformers
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": pieces[2]}))
    assert jt.load_tokenizer(d).eos_id == 12
    # an unknown token warns and keeps the model's own id rather than pointing at unk
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<definitely-missing>"}))
    with pytest.warns(UserWarning, match="definitely-missing"):
        assert jt.load_tokenizer(d).eos_id == base.eos_id != base.token_to_id("<unk>")

    b = tmp_path / "bert_cfg"
    shutil.copytree(bert_dir, b)
    assert jt.load_tokenizer(b).encode("Hello") == jt.load_tokenizer(b).encode("hello")
    (b / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert jt.load_tokenizer(b).encode("Hello") != jt.load_tokenizer(b).encode("hello")


def test_load_tokenizer_errors(tmp_path, bpe_dir):
    with pytest.raises(FileNotFoundError) as err:
        jt.load_tokenizer(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "tokenizer.model" in msg and "vocab.txt" in msg and "merges.txt" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jt.load_tokenizer(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="weights.bin"):
        jt.load_tokenizer(tmp_path / "weights.bin")
    # vocab.json without merges.txt is not a GPT-2 tokenizer
    (tmp_path / "vocab.json").write_bytes((bpe_dir / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        jt.load_tokenizer(tmp_path)


def test_batch_encode_and_decode_shape_check():
    tok = jt.ByteTokenizer()
    assert tok.batch_encode(["ab", "", "c"]) == [[97, 98], [], [99]]
    assert tok.batch_encode(["a"], add_bos=True) == [[257, 97]]
    with pytest.raises(ValueError, match="shape"):
        tok.decode(np.zeros((2, 3), dtype=np.int32))
