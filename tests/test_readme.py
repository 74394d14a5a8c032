"""The README's first hour: its two commands are the install-and-run and the test command,
CI runs the test command verbatim, the first one works, the docs' links resolve and the API
reference is current."""
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest tests -q -n 2 --dist loadfile'
# Docs other sessions are writing; a link to one is fine until it lands (then drop it here).
def shell_commands(markdown: str) -> list[str]:
    """Commands of the fenced bash / sh / shell blocks, in order (continuations joined)."""
    out = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", markdown, re.M | re.S):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        body = re.sub(r"\\\n\s*", "", body)
        out += [line.strip().removeprefix("$ ") for line in body.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    return out


def test_first_two_commands_install_run_and_test():
    first, second = shell_commands(README)[:2]
    install, _, run = first.partition(" && ")
    assert install == "pip install -e ."
    assert shlex.split(run)[:2] == ["jaxformer", "generate"]
    assert second == TEST_COMMAND


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert shell_commands(README)[1] in [line.strip() for line in ci]


def test_the_jaxformer_command_is_installed_by_pip():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["jaxformer"] == "jaxformer.cli:main"
    extras = " ".join(meta["project"]["optional-dependencies"]["test"])
    for pkg in ("pytest", "torch", "transformers", "nbclient", "nbformat", "ipykernel",
                "matplotlib"):
        assert pkg in extras, f"the test extra lacks {pkg}"


def test_first_command_runs(capsys, monkeypatch, smollm2, smollm2_ref):
    """`jaxformer generate ...` exactly as the README writes it (in this process), on the
    cached SmolLM2 copy: its greedy reply is transformers' greedy reply from the same GGUF."""
    import torch

    from jaxformer import cli
    from jaxformer.tokenizer import load_tokenizer
    ckpt, _, cache = smollm2
    monkeypatch.setenv("JAXFORMER_CACHE", str(cache))
    run = shell_commands(README)[0].partition(" && ")[2]
    argv = shlex.split(run)[1:]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    prompt = argv[argv.index("--prompt") + 1]
    n = int(argv[argv.index("--max-new-tokens") + 1])
    tok = load_tokenizer(ckpt / "tokenizer")
    ids = tok.encode(prompt)
    with torch.no_grad():
        ref = smollm2_ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    reply = ref[0, len(ids):].tolist()
    if tok.eos_id in reply:
        reply = reply[: reply.index(tok.eos_id)]
    text = tok.decode(reply)
    assert "Paris" in text  # a trained model, not noise
    assert f"=== prompt 0: {prompt!r}\n{text}" in out, (out, text)


def _links(path: Path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        yield target.split("#")[0]


@pytest.mark.parametrize("doc", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))],
                         ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    for target in _links(doc):
        resolved = (doc.parent / target).resolve()
        assert resolved.exists(), f"{doc.name} links to {target}, which does not exist"


def test_api_reference_is_current():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_api
    finally:
        sys.path.pop(0)
    committed = (ROOT / "docs" / "api.md").read_text()
    assert gen_api.generate() == committed, \
        "docs/api.md is out of date: run python docs/gen_api.py"


def test_docs_exist():
    for name in ("installation", "conversion", "parallelism", "performance", "api"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name
