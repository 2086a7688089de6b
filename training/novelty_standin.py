"""STAND-IN for `model_store/novelty.py` (branch `novelty`, /work/notes/novelty-spec.md, 15:50 UTC).

A local copy of the spec's math so the pretrained experiment runs before the coordinator merges that
branch; once merged, delete this file and import `fit_novelty` / `novelty` from `model_store.novelty`.
u(x) = sqrt(phi^T (Phi^T Phi + lam I)^-1 phi), no centring or scaling of the features, stored as the
eigen-decomposition of the Gram (full rank here: coef = 1 / (s + lam), resid = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_LAMBDA = 1.0


@dataclass(frozen=True)
class NoveltyStat:
    basis: torch.Tensor  # [R, H] float32, orthonormal rows, eigenvalue-descending
    coef: torch.Tensor  # [R] float32
    resid: float
    lam: float
    n: int

    @property
    def hidden_size(self) -> int:
        return int(self.basis.shape[1])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])


def fit_novelty(
    features: torch.Tensor, lam: float = DEFAULT_LAMBDA, *, rank: int | None = None
) -> NoveltyStat:
    phi = features.double()
    s, v = torch.linalg.eigh(phi.T @ phi)  # ascending
    s, v = s.flip(0).clamp(min=0.0), v.flip(1)
    r = phi.shape[1] if rank is None else min(rank, phi.shape[1])
    resid = 0.0 if r == phi.shape[1] else 1.0 / lam
    return NoveltyStat(v.T[:r].float().contiguous(), (1.0 / (s[:r] + lam)).float(), resid, lam, phi.shape[0])


def novelty(features: torch.Tensor, stat: NoveltyStat, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    phi = features.to(dtype)
    proj = phi @ stat.basis.to(dtype).T
    u2 = (stat.coef.to(dtype) * proj.pow(2)).sum(1)
    if stat.resid:
        u2 = u2 + stat.resid * (phi.pow(2).sum(1) - proj.pow(2).sum(1))
    u = u2.clamp(min=0.0).sqrt()
    return torch.where(torch.isfinite(phi).all(1), u, torch.full_like(u, float("nan")))
