"""PEFT's naming, in one place: saved adapter keys and LoRA target modules.

A PEFT adapter saved for a causal LM names each weight ``base_model.model.<module>.lora_A.weight``:
``<module>`` is the full model's module name (``model.layers.5.self_attn.q_proj``). Target modules are
given as projection names (``q_proj``), ``all`` (every linear projection of the family) or nothing
(the family's default from :mod:`emulator.model.arch`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from emulator.model.arch import ArchSpec

PEFT_PREFIX = "base_model.model."  # PeftModel wraps the model as ``base_model`` (LoraModel) -> ``model``


def saved_key(module: str, matrix: str, kind: str = "weight") -> str:
    """``model.layers.5.self_attn.q_proj``, ``A`` -> ``base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight``.
    """
    return f"{PEFT_PREFIX}{module}.lora_{matrix}.{kind}"


def saved_module(key: str) -> str:
    """The full-model module name of a saved adapter key (inverse of :func:`saved_key`)."""
    return key.removeprefix(PEFT_PREFIX).rpartition(".lora_")[0]


def add_prefix(state: dict, prefix: str = PEFT_PREFIX) -> dict:
    return {f"{prefix}{k}": v for k, v in state.items()}


def strip_prefix(state: dict) -> dict:
    return {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}


def resolve_targets(targets: Sequence[str], spec: ArchSpec) -> tuple[str, ...]:
    """Projection names LoRA adapts: ``("all",)`` -> every linear of the family, ``()`` -> its default."""
    if tuple(targets) == ("all",):
        return spec.all_linear
    return tuple(targets) or spec.lora_targets


def target_leaves(target_modules: Iterable[str]) -> tuple[str, ...]:
    """The projection names of a PEFT config's ``target_modules`` (full module names or leaves), sorted."""
    return tuple(sorted({t.rsplit(".", 1)[-1] for t in target_modules}))
