"""The `jaxformer` command line (issue 26): one-line errors with exit status 2 for bad input,
defaults in every --help, --version, the first-devices mesh, dtype and sampling defaults shared
with the API, streamed text printed once and cut at stop strings, and `jaxformer chat`.

Commands run in-process through cli.main(argv) (one subprocess check); the demo model is built
once and handed to the CLI; references are the model's own non-streamed greedy generate()."""
import ast
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import jaxformer as jf
import harness as bench
from jaxformer import cli, memory
from jaxformer.cli_args import HelpFormatter, sampling_from
from jaxformer.cli_chat import TextStream, find_template
from jaxformer.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo():
    return jf.demo_model(mesh=jf.make_mesh(devices=jax.devices()[:1]))


@pytest.fixture
def served(demo, monkeypatch):
    """The CLI's demo model is the shared one; `calls` records the CLI's keyword arguments."""
    calls = []

    def fake(**kw):
        calls.append(kw)
        return demo
    monkeypatch.setattr(jf, "demo_model", fake)
    return calls


class Loaded(Exception):
    pass


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the CLI loads a model; records what it would have loaded with."""
    calls = []

    def refuse(*a, **kw):
        calls.append((a, kw))
        raise Loaded(f"loaded: {a} {kw}")
    monkeypatch.setattr(jf, "demo_model", refuse)
    monkeypatch.setattr(jf, "load", refuse)
    return calls


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "prompts.txt").write_text("hello\n")
    (d / "empty.txt").write_text("\n\n")
    hf = d / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                "model_type": "llama"}))
    bad = d / "bad-json"
    (bad / "params").mkdir(parents=True)
    (bad / "config.json").write_text("{not json")
    ckpt = d / "ckpt"  # config + params/: enough for every check before loading
    (ckpt / "params").mkdir(parents=True)
    ModelConfig.from_preset("demo").save_json(ckpt / "config.json")
    (d / "template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    return d


def run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- bad input: exit 2, one line, no traceback, nothing loaded ---------------------------------
def bad_inputs(p):
    missing = str(p / "no-such-dir")
    gen = ["generate", "--no-compile-cache"]
    return [
        ([], "required: COMMAND"), (["frobnicate"], "invalid choice"),
        (["--bogus"], "required"),
        # generate: every flag with an invalid value
        (gen + ["--tensor", "0"], "--tensor"), (gen + ["--pipe", "0"], "--pipe"),
        (gen + ["--data", "-1"], "--data"), (gen + ["--tensor", "two"], "--tensor"),
        (gen + ["--tensor", "16"], "16 devices, but 8"),
        (gen + ["--devices", "0,0"], "--devices"), (gen + ["--devices", "a,b"], "--devices"),
        (gen + ["--devices", "0,1"], "--devices names 2 devices"),
        (gen + ["--tensor", "2", "--devices", "0,99"], "no device 99"),
        (gen + ["--dtype", "int3"], "--dtype"), (gen + ["--attention", "magic"], "--attention"),
        (gen + ["--quantize", "int5"], "--quantize"), (gen + ["--kv-cache", "int4"], "--kv-cache"),
        (gen + ["--max-new-tokens", "0"], "--max-new-tokens"),
        (gen + ["--max-new-tokens", "600"], "context of demo (512"),
        (gen + ["--temperature", "-1"], "--temperature"),
        (gen + ["--temperature", "nan"], "--temperature"),
        (gen + ["--top-k", "-1"], "--top-k"), (gen + ["--top-p", "0"], "top_p"),
        (gen + ["--top-p", "1.5"], "top_p"), (gen + ["--min-p", "2"], "min_p"),
        (gen + ["--repetition-penalty", "0"], "--repetition-penalty"),
        (gen + ["--presence-penalty", "x"], "--presence-penalty"),
        (gen + ["--frequency-penalty", "inf"], "--frequency-penalty"),
        (gen + ["--num-beams", "0"], "--num-beams"), (gen + ["--length-penalty", "x"], "--length"),
        (gen + ["--seed", "-1"], "--seed"), (gen + ["--stop", ""], "stop_strings"),
        (gen + ["--checkpoint", missing], "no such directory"),
        (gen + ["--checkpoint", str(p / "prompts.txt")], "is a file"),
        (gen + ["--checkpoint", str(p / "hf-model")], "python -m conversion.hf"),
        (gen + ["--checkpoint", str(p / "bad-json")], "not valid JSON"),
        (gen + ["--checkpoint", str(p)], "no config.json"),
        (gen + ["--model", "no-such-model"], "no-such-model"),
        (gen + ["--model", "x", "--checkpoint", str(p / "ckpt")], "not allowed with"),
        (gen + ["--prompts-file", missing], "--prompts-file"),
        (gen + ["--prompts-file", str(p / "empty.txt")], "holds no prompt"),
        # info
        (["info", "--preset", "llama-70b", "--tensor", "0"], "--tensor"),
        (["info", "--preset", "llama-70b", "--pipe", "0"], "--pipe"),
        (["info", "--preset", "llama-7b", "--batch", "0"], "--batch"),
        (["info", "--preset", "llama-7b", "--batch", "-1"], "--batch"),
        (["info", "--preset", "llama-7b", "--max-length", "100000"], "4096"),
        (["info", "--preset", "llama-7b", "--max-length", "1"], "--max-length"),
        (["info", "--preset", "llama-7b", "--device-memory", "0"], "--device-memory"),
        (["info", "--preset", "llama-7b", "--device-memory", "lots"], "--device-memory"),
        (["info", "--preset", "llama-7b", "--prefill-tokens", "0"], "--prefill-tokens"),
        (["info", "--preset", "llama-7b", "--rules", "nope"], "sharding rules"),
        (["info", "--preset", "llama-7b", "--quantize", "int5"], "--quantize"),
        (["info", "--preset", "llama-70b", "--tensor", "3"], "not divisible"),
        (["info", "--preset", "nope"], "unknown model preset"), (["info"], "required"),
        (["info", "--checkpoint", missing], "no such directory"),
        (["info", "--checkpoint", str(p / "prompts.txt")], "is a file"),
        (["info", "--checkpoint", str(p / "hf-model")], "conversion.hf"),
        (["info", "--checkpoint", str(p / "bad-json")], "not valid JSON"),
        # chat
        (["chat", "--tensor", "0"], "--tensor"), (["chat", "--max-new-tokens", "0"], "--max"),
        (["chat", "--temperature", "-1"], "--temperature"),
        (["chat", "--chat-template", str(p / "none.jinja")], "--chat-template"),
        (["chat", "--checkpoint", str(p / "hf-model")], "conversion.hf"),
        (["chat", "--num-beams", "2"], "unrecognized"),
        # bench
        (["bench", "--batches", "0"], "--batches"), (["bench", "--prompts", "-5"], "--prompts"),
        (["bench", "--new", "0"], "--new"), (["bench", "--presets", "nope"], "nope"),
        (["bench", "--quantize", "int5"], "int5"), (["bench", "--kv-cache", "int4"], "int4"),
        (["bench", "--dtype", "int8"], "--dtype"), (["bench", "--hf-timeout", "-1"], "--hf"),
        (["bench", "--json", missing + "/rows.json"], "--json"),
    ]


def test_bad_input_exits_2_with_one_line_before_loading(paths, no_load, capsys, monkeypatch):
    monkeypatch.setattr(bench, "ceilings", lambda tiny: pytest.fail("bench ran"))
    wrong = []
    for argv, needle in bad_inputs(paths):
        rc, out, err = run(argv, capsys)
        if not (rc == 2 and err.count("\n") == 1 and err.startswith("jaxformer")
                and needle in err and not out):
            wrong.append((argv, rc, err, out))
    assert wrong == []
    assert no_load == []  # every refusal came before a model was loaded


def test_bad_json_names_the_file_once(paths, no_load, capsys):
    rc, _, err = run(["info", "--checkpoint", str(paths / "bad-json")], capsys)
    assert rc == 2 and err.count(str(paths / "bad-json" / "config.json")) == 1


def test_bad_input_in_a_subprocess_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "jaxformer.cli", "info", "--preset",
                           "llama-70b", "--tensor", "0"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "jaxformer info: error: argument --tensor: must be a positive integer, got '0' "
        "(see jaxformer info --help)"]


# ---- help, version, defaults --------------------------------------------------------------------
def _subparsers():
    ap = cli._parser()
    sub = next(a for a in ap._actions if a.dest == "command")
    return {**sub.choices, "bench": bench.parser()}


def test_version_and_every_help_shows_its_defaults(capsys):
    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.strip() == f"jaxformer {jf.__version__}"
    for name, parser in _subparsers().items():
        rc, out, _ = run([name, "--help"], capsys)
        assert rc == 0 and out.startswith(f"usage: jaxformer {name}"), name
        assert issubclass(parser.formatter_class, HelpFormatter)
        fmt = parser.formatter_class(prog="x")
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"jaxformer {name} {action.option_strings}: no help"
            if action.default not in (None, False, []):
                text = fmt._get_help_string(action) % {"default": action.default}
                assert f"(default: {action.default})" in text
                assert f"(default: {action.default})" in " ".join(out.split()), (name, action)
    out = " ".join(run(["generate", "--help"], capsys)[1].split())
    assert "(default: 32)" in out and "(default: auto)" in out


def test_defaults_agree_with_the_api_and_between_commands(capsys, monkeypatch):
    """--temperature defaults to jf.Sampling()'s; generate and info resolve --dtype auto the
    same way (float32 on this CPU; bfloat16 for a plan against given device memory)."""
    args = cli._parser().parse_args(["generate"])
    assert sampling_from(args) == jf.Sampling()
    assert sampling_from(cli._parser().parse_args(["chat", "--greedy"])).greedy
    monkeypatch.delenv(memory.ENV_DEVICE_MEMORY, raising=False)
    rc, out, _ = run(["info", "--preset", "llama-7b"], capsys)
    assert rc == 0 and "--dtype auto: float32" in out and ", float32, rules" in out
    rc, out, _ = run(["info", "--preset", "llama-7b", "--device-memory", "80"], capsys)
    assert rc == 0 and "--dtype auto: bfloat16" in out and ", bfloat16, rules" in out


# ---- meshes: the first devices, or the named ones -------------------------------------------------
def test_make_mesh_takes_the_first_devices():
    mesh = jf.make_mesh(pipe=2, tensor=2)
    assert list(mesh.devices.flat) == jax.devices()[:4]
    assert dict(mesh.shape) == {"data": 1, "pipe": 2, "tensor": 2}
    with pytest.raises(ValueError, match="tensor must be a positive"):
        jf.make_mesh(tensor=0)


def test_generate_mesh_flags_and_attention_reach_the_model(no_load):
    with pytest.raises(Loaded):  # no_load stops it when it loads
        cli.main(["generate", "--tensor", "2", "--pipe", "2", "--attention", "xla"])
    kw = no_load[0][1]
    assert list(kw["mesh"].devices.flat) == jax.devices()[:4]
    assert kw["attention"] == "xla" and kw["dtype"] == "float32"
    no_load.clear()
    with pytest.raises(Loaded):
        cli.main(["generate", "--tensor", "2", "--devices", "6,3"])
    assert list(no_load[0][1]["mesh"].devices.flat) == [jax.devices()[6], jax.devices()[3]]


def test_model_flag_resolves_through_hub(paths, no_load):
    with pytest.raises(Loaded):
        cli.main(["generate", "--model", str(paths / "ckpt")])
    assert Path(no_load[0][0][0]) == paths / "ckpt"


# ---- the memory plan ------------------------------------------------------------------------------
def test_largest_batch_is_the_largest_that_fits():
    """info's table agrees with a plan for that batch: it fits, one more does not."""
    cfg = ModelConfig.from_preset("llama-7b")

    def fits(b, length):
        return memory.plan(cfg, None, "bfloat16", batch=b, max_length=length,
                           device_memory="24GiB").fits
    plan = memory.plan(cfg, None, "bfloat16", batch=1, max_length=2048, device_memory="24GiB")
    for length, best in plan.fit_table():
        assert best == 0 and not fits(1, length) or fits(best, length) \
            and not fits(best + 1, length), (length, best)
    assert dict(plan.fit_table())[512] >= 8  # the issue: --batch 8 --max-length 512 fits
    with pytest.raises(ValueError, match="batch must be at least 1"):
        memory.plan(cfg, None, "bfloat16", batch=0, max_length=64)
    with pytest.raises(ValueError, match="exceeds the context"):
        memory.plan(cfg, None, "bfloat16", batch=1, max_length=100000)


# ---- streaming, chat and greedy rows ---------------------------------------------------------------
def _stop_inside(text: str) -> tuple[str, int]:
    """A two-character stop string whose first occurrence in text is past its start."""
    for k in range(3, len(text) - 2):
        s = text[k:k + 2]
        if text.find(s) == k and "\n" not in s and "\ufffd" not in s:
            return s, k
    pytest.skip("the demo text has no usable stop string")


def test_stream_prints_the_text_once_and_cuts_at_stop(demo, served, capsys):
    ref = demo.generate(["Hello"], 16, None).texts[0]
    base = ["generate", "--stream", "--greedy", "--max-new-tokens", "16", "--prompt", "Hello",
            "--no-compile-cache"]
    rc, out, err = run(base, capsys)
    assert rc == 0 and served[0]["dtype"] == "float32" and "(float32, mesh 1x1x1)" in err
    assert out.startswith(f"=== prompt 0: 'Hello'\n{ref}\n# 16 tokens in ")
    stop, k = _stop_inside(ref)
    rc, out, _ = run(base + ["--stop", stop], capsys)
    assert rc == 0 and out.startswith(f"=== prompt 0: 'Hello'\n{ref[:k]}\n# ")


def test_text_stream_holds_back_what_may_still_change():
    class Chars:  # one token per character; 0 is an incomplete byte
        def decode(self, ids):
            return "".join("\ufffd" if i == 0 else chr(i) for i in ids)
    s = TextStream(Chars(), ["xyz"])
    assert s.push([ord("a"), ord("x")]) == "a"  # "x" may begin "xyz"
    assert s.push([ord("y"), ord("b")]) == "xyb"
    assert s.push([0]) == ""
    assert s.push([ord("x"), ord("y"), ord("z"), ord("c")]) == "\ufffd" and s.done
    assert s.finish("axyb\ufffd") == ""


def test_chat_streams_replies_with_the_template(demo, served, paths, capsys, monkeypatch):
    prompts = []
    real = type(demo).generate

    def spy(self, prompts_, *a, **kw):
        prompts.append(prompts_)
        return real(self, prompts_, *a, **kw)
    monkeypatch.setattr(type(demo), "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nwhat?\n/exit\nnever read\n"))
    rc, out, _ = run(["chat", "--chat-template", str(paths / "template.jinja"), "--greedy",
                      "--max-new-tokens", "6", "--system", "be brief", "--no-compile-cache"],
                     capsys)
    assert rc == 0 and len(prompts) == 2
    enc = demo.tokenizer.encode
    first = "<system>be brief</system><user>hi</user><assistant>"
    reply1 = real(demo, [enc(first)], 6, None).texts[0]
    second = (f"<system>be brief</system><user>hi</user><assistant>{reply1}</assistant>"
              f"<user>what?</user><assistant>")
    reply2 = real(demo, [enc(second)], 6, None).texts[0]
    assert prompts == [[enc(first)], [enc(second)]]
    assert out == f"{reply1}\n{reply2}\n"
    prompts.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # end of input quits
    assert cli.main(["chat", "--no-compile-cache"]) == 0 and prompts == []


def test_chat_template_comes_from_the_checkpoint(tmp_path):
    class NoTemplate:
        tokenizer = object()
    (tmp_path / "tokenizer").mkdir()
    cfg = tmp_path / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": [{"name": "tool", "template": "T"},
                                                 {"name": "default", "template": "D"}]}))
    assert find_template(NoTemplate(), tmp_path, None) == "D"
    (tmp_path / "tokenizer" / "chat_template.jinja").write_text("J")
    assert find_template(NoTemplate(), tmp_path, None) == "J"
    assert find_template(NoTemplate(), None, str(cfg)) == "D"
    assert find_template(NoTemplate(), None, None) is None


def test_sampling_list_may_hold_none_for_greedy_rows(demo):
    greedy = demo.generate(["ab", "cd"], 4, None).tokens
    assert demo.generate(["ab", "cd"], 4, [None, jf.Sampling(temperature=0)]).tokens == greedy


# ---- bench, README, converters ----------------------------------------------------------------------
def test_bench_tiny_is_a_small_smoke_run(monkeypatch, capsys):
    shapes = []
    monkeypatch.setattr(bench, "ceilings", lambda tiny: {"copy_GBps": 1, "matmul_TFLOPs": 1})

    def fake(cfg, batch, prompt, new, *a, **kw):
        shapes.append((cfg.name, batch, prompt, new))
        raise RuntimeError("not run")
    monkeypatch.setattr(bench, "run_jax", fake)
    assert cli.main(["bench", "--tiny"]) == 0
    assert shapes == [("demo", 1, 16, 8), ("demo", 2, 16, 8)]
    capsys.readouterr()
    assert cli.main(["bench", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: jaxformer bench")


def test_readme_python_snippet_defines_every_name():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    tree = ast.parse(code)
    defined = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
               and isinstance(n.ctx, ast.Store)}
    defined |= {a.asname or a.name for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
            and isinstance(n.ctx, ast.Load)}
    assert used <= defined | set(dir(__builtins__)) | {"print"}, used - defined


def test_converters_share_one_line_errors(tmp_path, monkeypatch, capsys):
    from conversion import hf
    from conversion.megatron import cli as mcli
    (tmp_path / "model_optim_rng.pt").write_bytes(b"not a torch file")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails as when missing
    assert mcli.main(["--input", str(tmp_path / "model_optim_rng.pt"),
                      "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m conversion.megatron: error: ") and "[megatron]" in err
    assert err.count("\n") == 1
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 96,
        "num_hidden_layers": 2, "intermediate_size": 96}))
    assert hf.main(["--input", str(src), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m conversion.hf: error: ") and err.count("\n") == 1
    assert "'max_position_embeddings'" in err and not os.path.exists(tmp_path / "o")
    import tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(d.startswith("torch") for d in extras["megatron"])


def test_chat_template_renders_as_transformers_does():
    """bos_token / eos_token / add_generation_prompt reach the template, a leading bos string
    becomes the bos id, and raise_exception is a one-line ValueError."""
    from jaxformer.cli_chat import compile_template, encode, render
    from jaxformer.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    t = compile_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}"
                         "{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    text = render(t, [{"role": "user", "content": "hi"}], tok)
    assert text == "<bos>hi<eos>>"
    assert encode(tok, text) == [257] + list(b"hi<eos>>")
    bad = compile_template("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        render(bad, [], tok)
    with pytest.raises(ValueError, match="does not parse"):
        compile_template("{% for %}")
