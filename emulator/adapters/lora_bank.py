"""The edge's LoRA weights for cloud-held sites (dlora), in the same PEFT format as the segments'.

A :class:`LoraBank` holds one :class:`LoraBranch` per remote site. It computes exactly what PEFT's
LoRA layer adds to a projection, ``lora_B(lora_A(x)) * alpha / r`` (dropout 0), with PEFT's
initialisation (``lora_A`` Kaiming-uniform like ``nn.Linear``, ``lora_B`` zero), and saves under
PEFT's full-model names, so one adapter directory holds the edge-held and the cloud-held modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from emulator.adapters.lora import LoraSettings
from emulator.adapters.remote_sites import RemoteSite, SiteGroup, flatten

_PEFT_PREFIX = "base_model.model."


class LoraBranch(nn.Module):
    """The LoRA branch of one projection: ``(batch, seq, in)`` -> ``(batch, seq, out)``."""

    def __init__(self, in_features: int, out_features: int, settings: LoraSettings) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, settings.rank, bias=False)  # noqa: N815 - PEFT's names
        self.lora_B = nn.Linear(settings.rank, out_features, bias=False)  # noqa: N815
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = settings.alpha / settings.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scaling


def _key(site_name: str) -> str:
    return site_name.replace(".", "/")  # module names may not contain dots


class LoraBank(nn.Module):
    """LoRA branches of remote sites, by full-model site name.

    Args:
        groups: the session's site groups (see :func:`emulator.adapters.remote_sites.plan_remote_sites`).
        settings: rank and alpha, the same as the segments' LoRA.
    """

    def __init__(self, groups: Sequence[SiteGroup], settings: LoraSettings) -> None:
        super().__init__()
        self.groups = list(groups)
        self.sites = flatten(groups)
        self.branches = nn.ModuleDict({_key(s.name): LoraBranch(s.in_features, s.out_features, settings)
                                       for s in self.sites})

    def branch(self, site: RemoteSite) -> LoraBranch:
        return self.branches[_key(site.name)]  # type: ignore[return-value]

    def forward(self, group: SiteGroup, x: torch.Tensor) -> torch.Tensor:
        """LoRA outputs of the group's sites, concatenated: ``(batch, seq, group.out_features)``."""
        return torch.cat([self.branch(site)(x) for site in group.sites], dim=-1)

    def site_parameters(self, site: RemoteSite) -> list[nn.Parameter]:
        return list(self.branch(site).parameters())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under PEFT's saved names (``base_model.model.<site>.lora_A.weight``)."""
        state = {}
        for site in self.sites:
            branch = self.branch(site)
            for matrix in ("lora_A", "lora_B"):
                weight = getattr(branch, matrix).weight
                state[f"{_PEFT_PREFIX}{site.name}.{matrix}.weight"] = weight.detach().to(torch.float32).clone()
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copies this bank's weights out of a PEFT adapter state (other keys are ignored)."""
        with torch.no_grad():
            for key, value in self.adapter_state_dict().items():
                if key not in state:
                    raise KeyError(f"adapter has no {key!r}; was it trained in dlora mode with these targets?")
                module, matrix = key[len(_PEFT_PREFIX):].rsplit(".", 2)[:2]
                getattr(self.branches[_key(module)], matrix).weight.copy_(state[key].to(value.dtype))

    def owns(self, key: str) -> bool:
        """Whether a PEFT adapter key belongs to one of this bank's sites."""
        module = key[len(_PEFT_PREFIX):].rsplit(".", 2)[0]
        return _key(module) in self.branches
