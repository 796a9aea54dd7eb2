"""dlora on the edge: LoRA for every block, including the cloud-held ones, trained and kept here.

The edge-held blocks carry PEFT LoRA as in split mode. The cloud-held blocks' LoRA lives in a
:class:`~emulator.adapters.lora_bank.LoraBank`; when the cloud reaches an active site group it sends the
group's input (``SITE_INPUT``) and gets the LoRA outputs back (``SITE_OUTPUT``), and in the backward
the output gradient (``SITE_GRAD_OUTPUT``) for the input gradient (``SITE_GRAD_INPUT``), while the
bank's weight gradients accumulate here. :class:`SiteServer` answers those call-outs;
:class:`DloraMiddle` serves them over the training stream and :class:`LocalDloraMiddle` in-process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForCausalLM

from edge.rpc.client import CloudCallError, TrainStream
from emulator.adapters.lora import load_into_segments
from emulator.adapters.lora_bank import LoraBank
from emulator.adapters.remote_sites import RemoteSiteCalls, SiteGroup, plan_remote_sites
from emulator.model.arch import ArchSpec
from emulator.model.bundle import read_plan
from emulator.model.runner import SegmentRunner
from emulator.model.segments import BlockStack, EdgeModel, full_model_name, plan_for
from protocol.accounting import Traffic
from protocol.types import Phase


def plan_bank_sites(bundle: Path, targets: Sequence[str], remote_sites: Sequence[str] = ()) -> list[SiteGroup]:
    """The cloud-held LoRA sites, planned from the bundle's config on a weightless ``meta`` skeleton.

    Raises:
        CloudCallError: when the cloud announced different sites (``remote_sites``) than planned here.
    """
    config = AutoConfig.from_pretrained(bundle)
    plan, _ = read_plan(bundle)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    groups = plan_remote_sites(skeleton, plan_for(config, plan.edge_layers), targets)
    names = tuple(s.name for g in groups for s in g.sites)
    if remote_sites and names != tuple(remote_sites):
        raise CloudCallError(f"the cloud plans LoRA sites {list(remote_sites)[:2]}... but this edge plans "
                             f"{list(names)[:2]}...; are both on the same model and edge version?")
    return groups


@dataclass
class SiteLedger:
    """Per-site traffic of the site exchanges: each exchange's bytes split evenly over its sites."""

    exchanges: dict[str, int] = field(default_factory=dict)
    bytes_sent: dict[str, float] = field(default_factory=dict)
    bytes_received: dict[str, float] = field(default_factory=dict)

    def record(self, group: SiteGroup, traffic: Traffic) -> None:
        share = 1 / max(len(group.sites), 1)
        for site in group.sites:
            self.exchanges[site.name] = self.exchanges.get(site.name, 0) + 1
            self.bytes_sent[site.name] = self.bytes_sent.get(site.name, 0) + traffic.bytes_sent * share
            self.bytes_received[site.name] = self.bytes_received.get(site.name, 0) + traffic.bytes_received * share


class SiteServer:
    """Answers the cloud's site call-outs of one step with the bank's LoRA branches.

    ``active`` (site indices) is what a training forward computes; evaluation computes every site,
    like the saved adapter does. A site outside ``active`` contributes nothing.
    """

    def __init__(self, bank: LoraBank) -> None:
        self.bank = bank
        self.groups = {g.index: g for g in bank.groups}
        self.all_sites = frozenset(s.index for s in bank.sites)
        self.active = self.all_sites
        self._current = self.all_sites
        self._train = False
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin(self, train: bool) -> tuple[int, ...]:
        """Starts a forward; returns the indices of the sites it computes."""
        self._train, self._pending = train, {}
        self._current = self.active if train else self.all_sites
        return tuple(sorted(self._current))

    @property
    def training(self) -> bool:
        """Whether the current forward is a training forward."""
        return self._train

    def group(self, index: int) -> SiteGroup:
        """The group as computed now (only its current sites)."""
        group = self.groups.get(index)
        restricted = group.restrict(self._current) if group is not None else None
        if restricted is None or not restricted.sites:
            raise CloudCallError(f"the cloud asked for site group {index}, which has no active site this step")
        return restricted

    def answer(self, phase: Phase, index: int, tensor: torch.Tensor) -> tuple[Phase, torch.Tensor]:
        if phase is Phase.SITE_INPUT:
            return Phase.SITE_OUTPUT, self.forward(index, tensor)
        if phase is Phase.SITE_GRAD_OUTPUT:
            return Phase.SITE_GRAD_INPUT, self.backward(index, tensor)
        raise CloudCallError(f"the cloud sent {phase.name} in the middle of a step")

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(batch, seq, in)`` -> the group's LoRA outputs ``(batch, seq, sum(out))``."""
        group = self.group(index)
        if not self._train:
            with torch.no_grad():
                return self.bank(group, x)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.bank(group, x)
        self._pending[index] = (x, out)
        return out.detach()

    def backward(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        """Accumulates the group's LoRA weight gradients; returns the gradient w.r.t. its input."""
        if index not in self._pending:
            raise CloudCallError(f"the cloud asked for the backward of site group {index} without its forward")
        x, out = self._pending.pop(index)
        out.backward(grad)
        assert x.grad is not None
        return x.grad


@dataclass
class DloraMiddle:
    """The cloud's middle over the training stream, serving its site call-outs until the step's reply."""

    stream: TrainStream
    server: SiteServer
    wire_dtype: str = "float32"
    ledger: SiteLedger = field(default_factory=SiteLedger)

    def forward(self, step, hidden, train, traffic):
        active = self.server.begin(train)
        phase = Phase.FORWARD_TRAIN if train else Phase.FORWARD_EVAL
        self.stream.send(step, phase, hidden, traffic, self.wire_dtype, active_sites=active)
        return self._serve(step, Phase.ACTIVATION, traffic)

    def backward(self, step, grad, traffic):
        self.stream.send(step, Phase.BACKWARD, grad, traffic, self.wire_dtype)
        return self._serve(step, Phase.GRADIENT, traffic)

    def _serve(self, step: int, final: Phase, traffic: Traffic) -> tuple[torch.Tensor, float]:
        compute_s = 0.0
        while True:
            exchange = Traffic()
            reply = self.stream.receive(step, exchange)
            compute_s += reply.compute_s
            if reply.phase is final:
                exchange.round_trips += 1
                traffic.add(exchange)
                return reply.tensor, compute_s
            phase, out = self.server.answer(reply.phase, reply.site_group, reply.tensor)
            self.stream.send(step, phase, out, exchange, self.wire_dtype, site_group=reply.site_group)
            exchange.round_trips += 1
            if self.server.training:  # the ledger is per-module training traffic; evaluation is apart
                self.ledger.record(self.server.group(reply.site_group), exchange)
            traffic.add(exchange)


@dataclass(frozen=True)
class _DirectExchange:
    """Site call-outs without the wire; like the wire, the edge computes in fp32 whatever dtype the
    middle runs in (a bf16 middle gets its answers back in bf16)."""

    server: SiteServer

    def forward(self, group: SiteGroup, x: torch.Tensor) -> torch.Tensor:
        return self.server.forward(group.index, x.float()).to(x.dtype)

    def backward(self, group: SiteGroup, grad: torch.Tensor) -> torch.Tensor:
        return self.server.backward(group.index, grad.float()).to(grad.dtype)


class LocalDloraMiddle:
    """dlora with the middle in this process: the same runner and site exchanges, no network (reference path)."""

    def __init__(self, middle: BlockStack, server: SiteServer) -> None:
        self.middle, self.server = middle, server
        self.runner = SegmentRunner(middle)

    def forward(self, step, hidden, train, traffic):
        active = frozenset(self.server.begin(train))
        sites = RemoteSiteCalls(self.server.bank.groups, active, _DirectExchange(self.server))
        self.runner.release("local")  # a forward replaces one left without its backward
        out, _ = self.runner.forward("local", step, hidden, train, sites)
        return out, 0.0

    def backward(self, step, grad, traffic):
        out, _ = self.runner.backward("local", step, grad)
        return out, 0.0


def lora_step_flops(tokens: int, rank: int, in_features: int, out_features: int) -> int:
    """FLOPs of one LoRA branch over a training step: forward ``2 T r (in + out)`` plus backward
    twice that (weight gradients and input gradient), as ``torch.utils.flop_counter`` counts them."""
    return 6 * tokens * rank * (in_features + out_features)


class LoraModules:
    """Every LoRA module of an edge by full-model name: the edge-held PEFT layers and, in dlora, the bank.

    The unit that Kill-and-Revive turns on and off. A module that is off contributes nothing: PEFT's
    layer returns its base output, a bank site is left out of its group's exchange (a group with no
    site left costs no exchange at all), and neither gets a gradient; the weights stay as they are.
    """

    def __init__(self, model: EdgeModel, spec: ArchSpec, server: SiteServer | None = None) -> None:
        self.server = server
        self.layers: dict[str, LoraLayer] = {
            full_model_name(name + ".", spec).rstrip("."): module
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}
        self.sites = {site.name: site for site in server.bank.sites} if server is not None else {}
        self.names = [*self.layers, *self.sites]

    def only(self, params: Sequence[torch.nn.Parameter]) -> LoraModules:
        """These modules without the edge-held layers that have a weight outside ``params``: a frozen
        layer is never switched on or off (PEFT's switch would make its weights trainable again)."""
        training = {id(p) for p in params}
        self.layers = {n: layer for n, layer in self.layers.items()
                       if all(id(p) in training for p in self.parameters(n))}
        self.names = [*self.layers, *self.sites]
        return self

    def placement(self, name: str) -> str:
        return "edge" if name in self.layers else "cloud"

    def dims(self, name: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of the module's projection."""
        if name in self.layers:
            layer = self.layers[name]
            assert layer.in_features is not None and layer.out_features is not None
            return layer.in_features, layer.out_features
        return self.sites[name].in_features, self.sites[name].out_features

    def set_active(self, active: frozenset[str]) -> None:
        for name, layer in self.layers.items():
            layer.enable_adapters(name in active)
        if self.server is not None:
            self.server.active = frozenset(s.index for n, s in self.sites.items() if n in active)

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        if name in self.layers:
            layer = self.layers[name]
            return [*layer.lora_A.parameters(), *layer.lora_B.parameters()]
        assert self.server is not None
        return self.server.bank.site_parameters(self.sites[name])

    def drop_grads(self, names: frozenset[str]) -> None:
        """Forgets the gradients of ``names``: the optimizer then leaves those modules as they are."""
        for name in names:
            for p in self.parameters(name):
                p.grad = None

    def importance(self, score: str) -> dict[str, float]:
        """Each computed module's Kill-and-Revive measurement for this step (``--kr-score``):

        * ``grad``: ``sqrt(||dL/dA||^2 + ||dL/dB||^2)`` (:meth:`grad_norms`);
        * ``taylor``: ``|<dL/dB, B>|`` = ``|<dL/dW, B A>|``, the first-order change of the loss if the
          module's learnt update were taken away (zero while ``B`` is still zero).
        """
        if score == "grad":
            return self.grad_norms()
        out = {}
        for name in self.names:
            b = self._lora_b(name)
            if b.grad is not None:
                out[name] = abs(float((b.grad.float() * b.detach().float()).sum()))
        return out

    def _lora_b(self, name: str) -> torch.Tensor:
        if name in self.layers:
            (b,) = self.layers[name].lora_B.parameters()
            return b
        assert self.server is not None
        return self.server.bank.lora_weights(self.sites[name])[1]

    def grad_norms(self) -> dict[str, float]:
        """``sqrt(sum ||grad||^2)`` over each module's LoRA weights, for the modules that got gradients."""
        norms = {}
        for name in self.names:
            grads = [p.grad for p in self.parameters(name) if p.grad is not None]
            if grads:
                norms[name] = float(torch.stack([(g.float() ** 2).sum() for g in grads]).sum().sqrt())
        return norms


def load_dlora_adapter(model: EdgeModel, bank: LoraBank, state: dict[str, torch.Tensor], spec: ArchSpec) -> None:
    """Loads a dlora adapter: edge-held modules into the segments, cloud-held ones into the bank."""
    load_into_segments(model, {k: v for k, v in state.items() if not bank.owns(k)}, spec)
    bank.load_adapter_state(state)
