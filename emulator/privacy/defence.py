"""Defences on the hidden state the edge sends at the bottom cut.

Both roles import this module: the edge applies a defence while training and at inference; the
model owner's audit (:mod:`cloud.audit`) replays the *announced* defence with its own random draws
when it fits its inverters, as a real attacker who knows the algorithm would.

* ``noise`` — Gaussian noise scaled per position: each transmitted vector ``h_t`` gets
  ``noise * rms(h_t) * N(0, I)``, where ``rms(h_t)`` is the root-mean-square over the hidden
  dimension of that position. Per-position scaling needs no statistics of other rows (nothing about
  the batch leaks through the scale), keeps the signal-to-noise ratio equal at every position
  whatever its norm (the first position of a LLaMA-family model is ~50x larger than the rest), and
  is the scaling of the issue's probe, so numbers compare directly.
* ``nopeek`` — NoPeek (Vepakomma et al., 2020): the training loss gains ``nopeek * dCor(E, H)``,
  the distance correlation between the token embeddings ``E`` and the transmitted states ``H`` of
  the batch's positions, so the edge blocks learn states that carry less about their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DefenceError(ValueError):
    """A defence setting that cannot be used; the message names the flag and the fix."""


@dataclass(frozen=True)
class DefenceSettings:
    """What the edge does to the bottom-cut state before it crosses the wire.

    Attributes:
        noise: Gaussian noise std as a multiple of each position's RMS (0: off).
        nopeek: weight of the distance-correlation penalty in the training loss (0: off).
    """

    noise: float = 0.0
    nopeek: float = 0.0

    def problems(self) -> list[str]:
        out = []
        if not (0.0 <= self.noise <= 10.0):
            out.append(f"--defence-noise {self.noise}: must be between 0 and 10 (a multiple of each position's RMS)")
        if not (0.0 <= self.nopeek <= 100.0):
            out.append(f"--defence-nopeek {self.nopeek}: must be between 0 and 100 (weight of the dCor penalty)")
        return out

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise DefenceError("; ".join(problems))

    @property
    def active(self) -> bool:
        return self.noise > 0 or self.nopeek > 0

    def as_dict(self) -> dict[str, float]:
        return {"noise": self.noise, "nopeek": self.nopeek}


def add_noise(hidden: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``hidden + scale * rms(hidden_t) * N(0, I)`` per position; the noise carries no gradient.

    Args:
        hidden: ``(batch, seq, hidden)`` states.
        scale: multiple of each position's RMS (0 returns ``hidden`` itself).
        generator: the random source (the edge's own; the owner's audit uses a different one).
    """
    if scale <= 0:
        return hidden
    with torch.no_grad():
        rms = hidden.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
        draw = torch.randn(hidden.shape, generator=generator, dtype=torch.float32, device=hidden.device)
        noise = (scale * rms * draw).to(hidden.dtype)
    return hidden + noise


def _centred_distances(x: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Szekely et al., 2007) of paired rows, in [0, 1].

    Args:
        x: ``(n, d1)`` and z: ``(n, d2)``, row ``i`` of each describing the same sample.
    """
    a, b = _centred_distances(x.float()), _centred_distances(z.float())
    dcov2 = (a * b).mean().clamp_min(0)
    denom = ((a * a).mean() * (b * b).mean()).sqrt().clamp_min(1e-12)
    return (dcov2 / denom).sqrt()
