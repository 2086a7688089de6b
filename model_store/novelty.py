"""Feature-space novelty: u(x) = sqrt(phi^T (Phi^T Phi + lam I)^-1 phi), a bolt-on uncertainty for any RM.

Head disagreement barely moves on a pretrained trunk (shift AUROC 0.48-0.75 on the MiniLM review
data), while the epistemic width of a linear head on the model's own pooled features told shifted
responses from held-out ones at 0.91 (issue 21; AdvPO, arXiv 2403.05171). phi is the row the heads'
final linear layer reads; Phi holds a reference set's rows. No centring or scaling: the issue's formula.

Stored form (chosen by bench/novelty_bench.py, see /work/notes/novelty-spec.md): the eigenvectors of
G = Phi^T Phi as `basis` [R, H] and per-direction weights `coef` [R], so that
u^2 = sum_r coef_r (basis_r . phi)^2 + resid * (|phi|^2 - |basis phi|^2). Full rank (R = H, resid 0)
is a sum of positive terms: no fp32 cancellation, unlike phi^T A^-1 phi with the inverse stored.
Pure torch; the service and the kernel read the tensors, the manifest carries `NoveltyInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model_store.uncertainty import NOVELTY_FILE, NoveltyInfo, fit_quantiles

# 0.01, not the 1.0: on every model and draw of `hydra-rm experiment novelty-shift` the
# validation split chose the bottom of the grid (all-shifts AUROC flat below 0.01, 0.78 vs 0.70 at 1
# for a fine-tuned MiniLM; docs/experiments/novelty-shift.md). Cholesky at 0.01 keeps fp32 u within
# 3e-7 of float64 on real features (bench/results/novelty-forms-cpu.md).
DEFAULT_LAMBDA = 0.01


@dataclass(frozen=True)
class NoveltyStat:
    """The fitted statistic; tensors are float32 on whatever device they were moved to."""

    basis: torch.Tensor  # [R, H]: L^-1 (Cholesky, R = H) or the top eigenvectors (eigen form)
    coef: torch.Tensor  # [R]
    resid: float  # weight of phi's part outside span(basis); 0 at full rank
    lam: float
    n: int

    @property
    def hidden_size(self) -> int:
        return int(self.basis.shape[1])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def to(self, device: torch.device | str) -> NoveltyStat:
        return NoveltyStat(self.basis.to(device), self.coef.to(device), self.resid, self.lam, self.n)


def fit_novelty(
    features: torch.Tensor, lam: float = DEFAULT_LAMBDA, *, rank: int | None = None
) -> NoveltyStat:
    """Summarise reference features [N, H] (computed in float64). `rank` None: the exact inverse Cholesky
    factor; `rank=R`: the top R eigen-directions (exact only when N <= R)."""
    if features.dim() != 2 or features.shape[0] < 1:
        raise ValueError(f"features must be [N >= 1, H], got shape {tuple(features.shape)}")
    if not lam > 0:
        raise ValueError(f"lambda must be > 0, got {lam}")
    phi = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(phi).all():
        raise ValueError("reference features contain NaN or inf")
    n, h = phi.shape
    r = h if rank is None else int(rank)
    if not 1 <= r <= h:
        raise ValueError(f"rank must be in [1, {h}], got {rank}")
    gram = phi.T @ phi
    if rank is None:
        a = gram + lam * torch.eye(h, dtype=torch.float64)
        chol = torch.linalg.cholesky(a)
        w = torch.linalg.solve_triangular(chol, torch.eye(h, dtype=torch.float64), upper=False)
        return NoveltyStat(w.float().contiguous(), torch.ones(h), 0.0, float(lam), int(n))
    s, v = torch.linalg.eigh(gram)  # ascending
    s, v = s.flip(0).clamp(min=0.0), v.flip(1)
    s, v = s[:r], v[:, :r]
    coef = 1.0 / (s + lam)
    resid = 0.0 if r == h else 1.0 / lam  # the dropped directions, taken as eigenvalue 0
    return NoveltyStat(v.T.contiguous().float(), coef.float(), float(resid), float(lam), int(n))


def novelty(features: torch.Tensor, stat: NoveltyStat, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """u [B] for features [B, H] in `dtype`; NaN where a row is not finite."""
    x = features.to(stat.basis.device, dtype)
    proj = x @ stat.basis.to(dtype).T
    u2 = (proj * proj) @ stat.coef.to(dtype)
    if stat.resid:
        u2 = u2 + stat.resid * ((x * x).sum(1) - (proj * proj).sum(1))
    u = u2.clamp(min=0.0).sqrt()
    return u.masked_fill(~torch.isfinite(x).all(1), float("nan"))


def novelty_exact(features: torch.Tensor, reference: torch.Tensor, lam: float) -> torch.Tensor:
    """The float64 oracle by a linear solve (tests): sqrt(phi^T (Phi^T Phi + lam I)^-1 phi)."""
    ref = reference.to(torch.float64)
    x = features.to(torch.float64)
    a = ref.T @ ref + lam * torch.eye(ref.shape[1], dtype=torch.float64)
    return (x * torch.linalg.solve(a, x.T).T).sum(1).clamp(min=0.0).sqrt()


def describe(stat: NoveltyStat, held_out_u: list[float], reward_std: float, feature: str) -> NoveltyInfo:
    """The manifest entry for `stat`, with quantiles of u over a held-out split."""
    return NoveltyInfo(
        hidden_size=stat.hidden_size,
        rank=stat.rank,
        lam=stat.lam,
        resid=stat.resid,
        n=stat.n,
        feature=feature,
        quantiles=fit_quantiles(held_out_u),
        reward_std=max(float(reward_std), 1e-12),
    )


def save_novelty(stat: NoveltyStat, directory: Path) -> Path:
    """Write `novelty.safetensors` into a model directory (weights only from safetensors)."""
    from safetensors.torch import save_file

    path = Path(directory) / NOVELTY_FILE
    save_file({"basis": stat.basis.cpu().contiguous(), "coef": stat.coef.cpu().contiguous()}, str(path))
    return path


def load_novelty(directory: Path, info: NoveltyInfo) -> NoveltyStat:
    """Read and check the tensors against the manifest entry (shape, dtype, finiteness)."""
    from safetensors.torch import load_file

    path = Path(directory) / info.file
    if not path.is_file():
        raise ValueError(f"{path} is missing but the manifest describes a novelty statistic")
    tensors = load_file(str(path))
    basis, coef = tensors.get("basis"), tensors.get("coef")
    if basis is None or coef is None or set(tensors) != {"basis", "coef"}:
        raise ValueError(f"{path} must hold exactly the tensors `basis` and `coef`, has {sorted(tensors)}")
    if tuple(basis.shape) != (info.rank, info.hidden_size) or tuple(coef.shape) != (info.rank,):
        raise ValueError(
            f"{path}: basis {tuple(basis.shape)} / coef {tuple(coef.shape)} do not match the manifest's "
            f"rank={info.rank}, hidden_size={info.hidden_size}"
        )
    if basis.dtype != torch.float32 or coef.dtype != torch.float32:
        raise ValueError(f"{path}: basis and coef must be float32")
    if not (torch.isfinite(basis).all() and torch.isfinite(coef).all()) or bool((coef < 0).any()):
        raise ValueError(f"{path}: non-finite or negative values: the file is corrupted")
    return NoveltyStat(basis.contiguous(), coef.contiguous(), info.resid, info.lam, info.n)
