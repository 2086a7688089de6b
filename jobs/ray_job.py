"""`hydra-rm score-ray`: the batch job of jobs/local.py with its chunks scored by a Ray Data actor pool.

The local job stays in charge of everything a job promises (checkpointed progress and resume, input
order, the errors file, refusing a foreign output); only the scoring of a chunk moves to Ray, plugged
into the local job as its chunk scorer (`RayChunks`). Each actor holds one engine and runs the local
job's own chunk scorer (`ScoreJob.score_chunk`) on the
lines of a chunk, so records and error lines are byte-for-byte the local job's, and Ray Data
(`preserve_order=True`; it reorders otherwise, DESIGN.md) streams the finished chunks back in order
to the driver, which writes and checkpoints them as the local job does.

The driver loads the model once too: the job's resume identity fingerprints the weights and the
settings that change rewards (jobs/local.py), and the aggregation is checked against the heads.
"""

from __future__ import annotations

import io
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import ray

from jobs.local import JobError, JobResult, ScoreJob, _count_lines
from scoring.settings import Settings, build_engine, ray_gpus

# A chunk is one Ray task and one checkpoint: at most this many lines, so that progress is saved often.
MAX_CHUNK_LINES = 512
CHUNKS_PER_ACTOR = 4  # enough tasks that every actor stays busy while the driver writes in order


def auto_chunk_size(lines: int, actors: int) -> int:
    """Lines per chunk when none is given: the file spread over CHUNKS_PER_ACTOR tasks per actor, capped
    at MAX_CHUNK_LINES (a fixed 512 made a 200-line file one task for one of the actors)."""
    return max(1, min(MAX_CHUNK_LINES, math.ceil(lines / (CHUNKS_PER_ACTOR * max(1, actors)))))


def wait_for_resources(
    actors: int, num_cpus: float, num_gpus: float, wait_s: float, say: Callable[[str], None] | None = None
) -> None:
    """Ray Data waits silently ("pending: 2 CPU") for an actor pool the cluster cannot place. Say why we
    wait (what is free of what), and give up with JobError after `wait_s` seconds."""
    need = {"CPU": actors * num_cpus, "GPU": actors * num_gpus}
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        free, total = ray.available_resources(), ray.cluster_resources()
        short = {k: v for k, v in need.items() if v > 0 and free.get(k, 0.0) + 1e-9 < v}
        if not short:
            return
        what = ", ".join(
            f"{v:g} {k} ({actors} actors x {v / actors:g}): {free.get(k, 0.0):g} of {total.get(k, 0.0):g} {k} free"
            for k, v in short.items()
        )
        if time.monotonic() >= deadline:
            raise JobError(
                f"gave up after {wait_s:g} s waiting for {what}; something else on the cluster holds them "
                "(a Serve app? see `ray status`): stop it, or use fewer --actors / --num-cpus"
            )
        if not said:
            (say or _stderr)(f"waiting for {what} (a Serve app or another job holds the rest; `ray status` shows which); "
                f"giving up after {wait_s:g} s (--wait-s)")  # fmt: skip
            said = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def chunk_index(path: Path, first_line: int, chunk_size: int) -> list[dict[str, int]]:
    """Byte offset and line count of each chunk from `first_line` (1-based) on, split on b"\\n" only,
    exactly as the local job reads them."""
    chunks: list[dict[str, int]] = []
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno >= first_line and (lineno - first_line) % chunk_size == 0:
                chunks.append({"start": lineno, "offset": offset, "lines": 0})
            if lineno >= first_line:
                chunks[-1]["lines"] += 1
            offset += len(line)
    return chunks


def read_chunk(path: Path, start: int, offset: int, lines: int) -> list[tuple[int, bytes]]:
    with open(path, "rb") as f:
        f.seek(offset)
        return [(start + i, f.readline()) for i in range(lines)]


class ChunkScorer:
    """A Ray Data actor: one engine, the local job's chunk scorer, one chunk per row."""

    def __init__(self, settings: Settings, job_args: dict[str, Any], threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))  # the actor's CPUs, not the whole machine's
        self.job = ScoreJob(build_engine(settings), **job_args)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out_cols: dict[str, list[Any]] = {
            "start": [],
            "stop": [],
            "out": [],
            "err": [],
            "ok": [],
            "failed": [],
        }
        for start, offset, lines in zip(batch["start"], batch["offset"], batch["lines"], strict=True):
            chunk = read_chunk(self.job.input, int(start), int(offset), int(lines))
            out, err = io.BytesIO(), io.BytesIO()
            ok, failed = self.job.score_chunk(chunk, out, err)
            out_cols["start"].append(chunk[0][0])
            out_cols["stop"].append(chunk[-1][0])
            out_cols["out"].append(out.getvalue())
            out_cols["err"].append(err.getvalue())
            out_cols["ok"].append(ok)
            out_cols["failed"].append(failed)
        return out_cols


class RayChunks:
    """The chunk scorer a `ScoreJob` plugs in: each chunk comes back scored, in order, from an actor
    pool that works ahead of the job's writes."""

    def __init__(
        self,
        settings: Settings,
        job_args: dict[str, Any],
        *,
        chunk_size: int,
        actors: int,
        num_cpus: float,
        num_gpus: float | None,
        wait_s: float = 120.0,
    ) -> None:
        self.settings = settings
        self.wait_s = wait_s
        self.job_args = job_args
        self.input = Path(job_args["input_path"])
        self.chunk_size = chunk_size
        self.actors = actors
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self._results: Iterator[dict[str, Any]] | None = None

    def close(self) -> None:
        """Stop Ray Data's iterator (and its prefetching) with the job."""
        if self._results is not None:
            self._results.close()
            self._results = None

    def _stream(self, first_line: int) -> Iterator[dict[str, Any]]:
        """Scored chunks from `first_line` on, in input order, computed ahead by the actor pool."""
        if not ray.is_initialized():
            raise RuntimeError("connect to Ray first (ray.init)")
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # default False: 2 actors do reorder
        num_gpus = ray_gpus(self.num_gpus)
        wait_for_resources(self.actors, self.num_cpus, num_gpus, self.wait_s)
        index = chunk_index(self.input, first_line, self.chunk_size)
        ds = ray.data.from_items(index, override_num_blocks=max(1, min(len(index), 4 * self.actors)))
        scored = ds.map_batches(
            ChunkScorer,
            fn_constructor_kwargs={
                "settings": self.settings,
                "job_args": self.job_args,
                "threads": int(self.num_cpus),
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_cpus=self.num_cpus,
            num_gpus=num_gpus or None,
        )
        for batch in scored.iter_batches(batch_size=1, batch_format="pandas", prefetch_batches=self.actors):
            yield batch.iloc[0].to_dict()

    def __call__(self, chunk: list[tuple[int, bytes]], out: IO[bytes], err: IO[bytes]) -> tuple[int, int]:
        if self._results is None:  # the first chunk the job asks for: resume point known now
            self._results = self._stream(chunk[0][0])
        got = next(self._results)
        if (got["start"], got["stop"]) != (chunk[0][0], chunk[-1][0]):  # never write a chunk out of place
            raise RuntimeError(
                f"Ray returned lines {got['start']}-{got['stop']} where {chunk[0][0]}-{chunk[-1][0]} were due"
            )
        out.write(bytes(got["out"]))
        err.write(bytes(got["err"]))
        return int(got["ok"]), int(got["failed"])


class RayScoreJob:
    """A local `ScoreJob` whose chunks are scored ahead, in parallel, by `actors` Ray actors."""

    def __init__(
        self,
        settings: Settings,
        input_path: Path,
        output_path: Path,
        errors_path: Path | None = None,
        *,
        actors: int = 2,
        num_cpus: float = 1.0,
        num_gpus: float | None = None,
        wait_s: float = 120.0,
        **job_kwargs: Any,
    ) -> None:
        """`job_kwargs` (aggregation, chunk_size, ...) are ScoreJob's own, passed as they are to the
        driver's job and to every actor's, so the two always agree on what a record is."""
        if job_kwargs.get("chunk_size") is None:
            lines = _count_lines(Path(input_path)) if Path(input_path).is_file() else 0
            job_kwargs["chunk_size"] = auto_chunk_size(lines, actors)
        engine = build_engine(settings)
        # Resolved once here (settings over the manifest, as `score` does) and shipped to every actor.
        job_kwargs.setdefault("aggregation", settings.resolved_aggregation(engine))
        self.job = ScoreJob(engine, input_path, output_path, errors_path, **job_kwargs)
        self.errors = self.job.errors
        job_args = {
            "input_path": self.job.input,
            "output_path": self.job.output,
            "errors_path": self.job.errors,
            **job_kwargs,
        }
        self.chunks = RayChunks(
            settings,
            job_args,
            chunk_size=self.job.chunk_size,
            actors=actors,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            wait_s=wait_s,
        )
        self.job.chunk_scorer = self.chunks

    def run(self, *, restart: bool = False, progress_bar: bool = True) -> JobResult:
        try:
            return self.job.run(restart=restart, progress_bar=progress_bar)
        finally:
            self.chunks.close()
