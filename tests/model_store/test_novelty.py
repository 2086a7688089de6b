"""The novelty statistic: its math against a float64 solve, its file, its manifest entry, the store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from model_store import ChecksumMismatch, ModelStore, ModelStoreError, RewardManifest
from model_store.loader import load_reward_model
from model_store.manifest import MANIFEST_NAME, attach_novelty
from model_store.novelty import (
    NOVELTY_FILE,
    NoveltyInfo,
    describe,
    fit_novelty,
    load_novelty,
    novelty,
    novelty_exact,
    save_novelty,
)


def _features(n: int, h: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, generator=g, dtype=torch.float64) * torch.logspace(1, -2, h) + 3.0


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
def test_full_form_is_the_formula(lam: float) -> None:
    ref, test = _features(300, 50, 0), _features(40, 50, 1) + torch.randn(40, 50, dtype=torch.float64)
    stat = fit_novelty(ref, lam)
    assert stat.rank == stat.hidden_size == 50 and stat.resid == 0.0 and stat.n == 300
    want = novelty_exact(test, ref, lam)
    torch.testing.assert_close(novelty(test, stat), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        novelty(test.float(), stat, dtype=torch.float32).double(), want, rtol=1e-4, atol=1e-6
    )


def test_eigen_form_is_exact_when_the_reference_fits_in_its_rank() -> None:
    ref, test = _features(12, 40, 2), _features(8, 40, 3)
    exact = novelty_exact(test, ref, 0.5)
    low = fit_novelty(ref, 0.5, rank=12)  # G has rank 12: the dropped eigenvalues are really 0
    assert low.rank == 12 and low.resid == pytest.approx(2.0)
    torch.testing.assert_close(novelty(test, low), exact, rtol=1e-5, atol=1e-7)
    assert (novelty(test, fit_novelty(ref, 0.5, rank=4)) > exact * 1.01).any()  # a real truncation


def test_shifted_rows_are_more_novel_and_nan_stays_nan() -> None:
    ref = _features(500, 30, 4)
    stat = fit_novelty(ref, 1.0)
    held_out, shifted = _features(100, 30, 5), _features(100, 30, 6).flip(1)
    assert novelty(shifted, stat).median() > 3 * novelty(held_out, stat).median()
    bad = held_out.clone()
    bad[0, 3] = float("nan")
    u = novelty(bad, stat)
    assert torch.isnan(u[0]) and torch.isfinite(u[1:]).all()


def test_fit_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="lambda"):
        fit_novelty(_features(5, 4, 0), 0.0)
    with pytest.raises(ValueError, match="rank"):
        fit_novelty(_features(5, 4, 0), 1.0, rank=5)
    with pytest.raises(ValueError, match="NaN"):
        fit_novelty(torch.full((3, 4), float("nan")), 1.0)


def _info(stat, u: list[float]) -> NoveltyInfo:
    return describe(stat, u, reward_std=0.8, feature="last_token")


def test_file_round_trip_and_checks(tmp_path: Path) -> None:
    stat = fit_novelty(_features(60, 16, 7), 1.0)
    info = _info(stat, [0.1, 0.2, 0.3, 0.5])
    save_novelty(stat, tmp_path)
    back = load_novelty(tmp_path, info)
    assert torch.equal(back.basis, stat.basis) and torch.equal(back.coef, stat.coef) and back.lam == 1.0
    assert info.median == pytest.approx(0.25) and info.quantiles.n == 4
    with pytest.raises(ValueError, match="do not match"):
        load_novelty(tmp_path, info.model_copy(update={"rank": 8}))
    again = RewardManifest.default_for(2, novelty=info)
    assert RewardManifest.model_validate_json(again.model_dump_json()).novelty == info
    with pytest.raises(ValueError, match="novelty.file"):
        NoveltyInfo.model_validate({**info.model_dump(), "file": "../x.safetensors"})


def test_store_round_trip_verify_and_tamper(tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, src)
    store = ModelStore(tmp_path / "store")
    plain = load_reward_model(str(store.publish(src, "plain").path), store)
    assert plain.novelty is None and plain.manifest.novelty is None
    assert "novelty" not in (store.resolve("plain").path / MANIFEST_NAME).read_text()  # as before
    h = plain.model.score.in_features
    stat = fit_novelty(_features(80, h, 8), 1.0)
    attach_novelty(src, stat, _info(stat, [0.4, 0.5, 0.6]))
    ref = store.publish(src, "nov")
    manifest = RewardManifest.read(ref.path)
    assert manifest is not None and NOVELTY_FILE in manifest.files  # checksummed like the weights
    rm = load_reward_model("nov", store)
    assert rm.novelty is not None and torch.equal(rm.novelty.basis, stat.basis)
    # a flipped byte in the statistic fails verification before anything loads
    p = ref.path / NOVELTY_FILE
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.chmod(0o644)
    p.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match=NOVELTY_FILE):
        load_reward_model("nov", store)


def test_wrong_width_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, src)
    stat = fit_novelty(_features(40, 7, 9), 1.0)  # the heads read 32 features, not 7
    attach_novelty(src, stat, _info(stat, [0.4, 0.5]))
    with pytest.raises(ModelStoreError, match="size 7"):
        load_reward_model(str(src), ModelStore(tmp_path / "s"))
