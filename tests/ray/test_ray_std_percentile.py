"""The Ray job's rows carry `std_percentile` because its actors run the local job's own record code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jobs.local import ScoreJob
from jobs.ray_job import ChunkScorer, chunk_index
from model_store.manifest import RewardManifest
from model_store.uncertainty import fit_quantiles, std_percentile
from scoring.engine import Item
from scoring.settings import Settings, build_engine


def test_ray_chunk_scorer_rows_carry_std_percentile(
    tiny_engine, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    q = fit_quantiles([s.std for s in tiny_engine.score([Item(text=f"reference {n}") for n in range(40)])])
    manifest = RewardManifest.read(model)
    assert manifest is not None and manifest.disagreement is None
    manifest.model_copy(update={"disagreement": q}).write(model)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"item {n} " * (1 + n % 5)}) + "\n" for n in range(12)))

    settings = Settings(model=str(model), store_root=tmp_path / "store")
    job_args = {"input_path": src, "output_path": tmp_path / "ray.jsonl", "chunk_size": 12}
    scorer = ChunkScorer(settings, job_args, threads=1)  # what each Ray Data actor runs, called directly
    (chunk,) = chunk_index(src, 1, 12)
    got = scorer({k: [v] for k, v in chunk.items()})
    rows = [json.loads(x) for x in bytes(got["out"][0]).decode().splitlines()]
    assert len(rows) == 12
    for r in rows:
        assert r["std_percentile"] is not None and r["std_percentile"] == std_percentile(r["std"], q)

    ScoreJob(build_engine(settings), src, tmp_path / "local.jsonl").run(progress_bar=False)
    assert (tmp_path / "local.jsonl").read_bytes() == bytes(
        got["out"][0]
    )  # the local job's rows, byte for byte
