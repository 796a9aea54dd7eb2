"""The edge's LoRA weights for cloud-held sites (dlora), built with PEFT in PEFT's own format.

A :class:`LoraBank` holds a weightless stand-in of every remote site's projection under its full-model
name (``model.layers.5.self_attn.q_proj``) and lets PEFT inject LoRA into them
(:func:`peft.inject_adapter_in_model`): PEFT's layers, initialisation (``lora_A`` Kaiming-uniform,
``lora_B`` zero) and scaling ``alpha / r``. The bank computes only the LoRA branch of a site,
``lora_B(lora_A(x)) * scaling`` (dropout 0): the frozen projection itself runs on the cloud. Its state
is read and written with :func:`peft.get_peft_model_state_dict` / :func:`peft.set_peft_model_state_dict`,
so one adapter directory holds the edge-held and the cloud-held modules under PEFT's saved names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from emulator.adapters.lora import LoraSettings
from emulator.adapters.peft_names import add_prefix, saved_module, strip_prefix
from emulator.adapters.remote_sites import RemoteSite, SiteGroup, flatten

_ADAPTER = "default"


def _stand_in(in_features: int, out_features: int) -> nn.Linear:
    """A projection of the right shape holding no weights: one zero broadcast to ``(out, in)``, a buffer."""
    linear = nn.Linear(1, 1, bias=False)
    linear.in_features, linear.out_features = in_features, out_features
    del linear.weight
    linear.register_buffer("weight", torch.zeros(()).expand(out_features, in_features), persistent=False)
    return linear


def _place(root: nn.Module, name: str, module: nn.Module) -> None:
    *parents, leaf = name.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(leaf, module)


class LoraBank(nn.Module):
    """PEFT LoRA layers of remote sites, by full-model site name.

    Args:
        groups: the session's site groups (see :func:`emulator.adapters.remote_sites.plan_remote_sites`).
        settings: rank and alpha, the same as the segments' LoRA.
    """

    def __init__(self, groups: Sequence[SiteGroup], settings: LoraSettings) -> None:
        super().__init__()
        self.groups = list(groups)
        self.sites = flatten(groups)
        self.tree = nn.Module()  # the full model's module names, only the sites' projections in it
        for site in self.sites:
            _place(self.tree, site.name, _stand_in(site.in_features, site.out_features))
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, bias="none",
                            target_modules=[site.name for site in self.sites])
        # PEFT reads the device off the model's first parameter, and the stand-ins have none.
        object.__setattr__(self.tree, "hf_device_map", {"": torch.device("cpu")})
        inject_adapter_in_model(config, self.tree, adapter_name=_ADAPTER)
        object.__delattr__(self.tree, "hf_device_map")
        self._names = {site.name for site in self.sites}

    def layer(self, site: RemoteSite) -> LoraLayer:
        layer = self.tree.get_submodule(site.name)
        assert isinstance(layer, LoraLayer)
        return layer

    def forward(self, group: SiteGroup, x: torch.Tensor) -> torch.Tensor:
        """LoRA outputs of the group's sites, concatenated: ``(batch, seq, group.out_features)``."""
        return torch.cat([self._branch(self.layer(site), x) for site in group.sites], dim=-1)

    @staticmethod
    def _branch(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        a, b = layer.lora_A[_ADAPTER], layer.lora_B[_ADAPTER]
        return b(a(x)) * layer.scaling[_ADAPTER]

    def lora_weights(self, site: RemoteSite) -> tuple[nn.Parameter, nn.Parameter]:
        """``(lora_A.weight (r, in), lora_B.weight (out, r))`` of a site."""
        layer = self.layer(site)
        a, b = layer.lora_A[_ADAPTER], layer.lora_B[_ADAPTER]
        assert isinstance(a, nn.Linear) and isinstance(b, nn.Linear)
        assert isinstance(a.weight, nn.Parameter) and isinstance(b.weight, nn.Parameter)
        return a.weight, b.weight

    def site_parameters(self, site: RemoteSite) -> list[nn.Parameter]:
        return list(self.lora_weights(site))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under PEFT's saved names (``base_model.model.<site>.lora_A.weight``), fp32 copies."""
        state = get_peft_model_state_dict(self.tree, adapter_name=_ADAPTER)
        return add_prefix({k: v.detach().to(torch.float32).clone() for k, v in state.items()})

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copies this bank's weights out of a PEFT adapter state (other keys are ignored)."""
        mine = {k: v for k, v in state.items() if self.owns(k)}
        missing = sorted(set(self.adapter_state_dict()) - set(mine))
        if missing:
            raise KeyError(f"adapter has no {missing[0]!r}; was it trained in dlora mode with these targets?")
        set_peft_model_state_dict(self.tree, strip_prefix(mine), adapter_name=_ADAPTER)

    def owns(self, key: str) -> bool:
        """Whether a PEFT adapter key belongs to one of this bank's sites."""
        return saved_module(key) in self._names
