"""Batch scoring of JSONL files: streaming, ordered, resumable, and nothing dropped silently.

Resume protocol: a small sidecar `<output>.progress.json` is written before any output, then after
each chunk is written and fsynced; it records how many input lines are done and the byte lengths of
the output and errors files. On restart both files are truncated back to those lengths (discarding
a half-written chunk) and the input is skipped to that line, so an interrupted run + resume gives
exactly the lines of an uninterrupted one, with no duplicates and no re-scoring of finished chunks.

Lines are split on `\\n` only and decoded strictly as UTF-8, so line numbers always match what
`wc -l`/editors show and bytes that are not text are reported, never silently replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from model_store.aggregation import Aggregation
from model_store.manifest import resolve_aggregation
from model_store.tokenization import EncodedItem, Item, ItemError
from scoring.batching import forward_isolating
from scoring.interface import Engine
from scoring.items import ScoreItem, validation_message
from scoring.results import NON_FINITE, ItemScore, item_result

PROGRESS_VERSION = 1

# Scores one chunk of (line number, raw line) into the output and errors streams, in input order;
# returns (scored, errors). `ScoreJob.score_chunk` is the local one; jobs/ray_job.py plugs in its own.
ChunkFn = Callable[[list[tuple[int, bytes]], IO[bytes], IO[bytes]], tuple[int, int]]


class JobError(Exception):
    """The job cannot start or continue as asked (e.g. an unrelated output file is in the way)."""


@dataclass
class JobResult:
    lines: int
    scored: int
    errors: int
    skipped: int  # lines already done by an earlier run (resume)


def _progress_path(output: Path) -> Path:
    return output.with_name(output.name + ".progress.json")


def default_errors_path(output: Path) -> Path:
    return output.with_name(output.stem + ".errors.jsonl")


def check_paths(input_path: Path, *outputs: Path) -> None:
    """JobError, one line naming the path, when the input cannot be read or an output cannot be
    written: checked before the model loads, so a typo costs no load and prints no traceback."""
    if input_path.is_dir():
        raise JobError(f"input {input_path} is a directory, not a JSONL file")
    if not input_path.is_file():
        raise JobError(f"input file {input_path} does not exist")
    if not os.access(input_path, os.R_OK):
        raise JobError(f"cannot read input {input_path}: permission denied")
    for path in outputs:
        if path.is_dir():
            raise JobError(f"output {path} is a directory, not a file")
        if not path.parent.is_dir():
            raise JobError(f"cannot write {path}: its directory {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise JobError(f"cannot write {path}: permission denied")


def os_error(e: OSError) -> JobError:
    """An OSError while writing the job's files (a read-only /proc, a full disk) as one line."""
    where = f" {e.filename}" if e.filename else ""
    return JobError(f"cannot write{where}: {e.strerror or e}")


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_fingerprint(engine: Engine) -> str:
    """Identifies the weights and the settings that change rewards, so a resume never mixes two models."""
    return hashlib.sha256(json.dumps(engine.fingerprint(), sort_keys=True, default=str).encode()).hexdigest()


def _count_lines(path: Path) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def _read_chunks(f: IO[bytes], start_line: int, chunk_size: int) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    for lineno, line in enumerate(f, start=1):  # binary iteration splits on b"\n" only
        if lineno <= start_line:
            continue
        chunk.append((lineno, line))
        if len(chunk) >= chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _parse(lineno: int, raw: bytes) -> tuple[Item, Any]:
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise ItemError(f"line is not valid UTF-8 (byte {e.start})", field="line") from e
    if not line.strip():
        raise ItemError("empty line", field="line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ItemError(f"invalid JSON: {e.msg} at column {e.colno}", field="line") from e
    if not isinstance(obj, dict):
        raise ItemError("each line must be a JSON object", field="line")
    item_id = obj.pop("id", None)
    try:  # the same validator as an item of a /v1/score body: same field, same message
        return ScoreItem.model_validate(obj).to_item(), item_id
    except ValidationError as e:
        field, message = validation_message(e.errors(), root="item")
        raise ItemError(message, field=field) from e


def _raw_excerpt(raw: bytes) -> str:
    return raw[:200].decode("utf-8", errors="backslashreplace").rstrip("\r\n")


class ScoreJob:
    """Scores `input` into `output` (JSONL); bad lines go to `errors` with their line number and reason."""

    def __init__(
        self,
        engine: Engine,
        input_path: Path,
        output_path: Path,
        errors_path: Path | None = None,
        *,
        aggregation: Aggregation | None = None,
        chunk_size: int = 512,
        chunk_scorer: ChunkFn | None = None,
    ) -> None:
        """`chunk_scorer` scores the chunks instead of this job's own `score_chunk` (e.g. on a Ray
        actor pool); the job keeps reading, ordering, writing and checkpointing them."""
        self.engine = engine
        self.chunk_scorer = chunk_scorer
        self.input = Path(input_path)
        self.output = Path(output_path)
        self.errors = Path(errors_path) if errors_path else default_errors_path(self.output)
        self.progress = _progress_path(self.output)
        self.aggregation = aggregation or resolve_aggregation(engine.manifest)
        self.chunk_size = chunk_size
        paths = [p.resolve() for p in (self.input, self.output, self.errors, self.progress)]
        if len(set(paths)) != len(paths):
            raise JobError("input, output and errors files must all be different files")

    def _job_identity(self) -> dict[str, Any]:
        ident = {
            "input": _fingerprint(self.input),
            "model": f"{self.engine.name}:{self.engine.version}",
            "model_fingerprint": model_fingerprint(self.engine),
            "aggregation": self.aggregation.name,
            "uwo_lambda": self.aggregation.uwo_lambda,
            "errors": str(self.errors.resolve()),
        }
        if self.aggregation.kind == "lcb":
            ident["lcb_beta"] = self.aggregation.lcb_beta
        if self.aggregation.kind == "stdp":
            ident["stdp_beta"] = self.aggregation.stdp_beta
        return ident

    def _load_state(self, restart: bool) -> dict[str, Any]:
        fresh = {
            "version": PROGRESS_VERSION,
            "job": self._job_identity(),
            "lines_done": 0,
            "output_bytes": 0,
            "errors_bytes": 0,
            "complete": False,
        }
        if not restart and self.progress.exists():
            state = json.loads(self.progress.read_text())
            if state.get("job") != fresh["job"]:
                raise JobError(
                    f"{self.output} belongs to a different job (input, model or aggregation changed); "
                    "pass --restart to score from scratch"
                )
            for path, key in ((self.output, "output_bytes"), (self.errors, "errors_bytes")):
                size = path.stat().st_size if path.exists() else 0
                if size < state[key]:
                    raise JobError(
                        f"{path} is shorter than at its last checkpoint (it was changed or removed); "
                        "pass --restart to score from scratch"
                    )
            return state
        if not restart:
            for path in (self.output, self.errors):
                if path.exists() and path.stat().st_size > 0:
                    raise JobError(f"{path} exists and is not from this job; pass --restart to overwrite it")
        # Record the fresh state before touching any output: a crash from here on can resume.
        self._save_state(fresh)
        for path in (self.output, self.errors):
            path.parent.mkdir(parents=True, exist_ok=True)
            open(path, "wb").close()  # noqa: SIM115 - create/empty
        return fresh

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.progress.with_name(self.progress.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.progress)

    def run(self, *, restart: bool = False, progress_bar: bool = True) -> JobResult:
        check_paths(self.input, self.output, self.errors, self.progress)
        try:
            state = self._load_state(restart)
        except OSError as e:
            raise os_error(e) from e
        total = _count_lines(self.input)
        if state["complete"]:
            return JobResult(total, 0, 0, state["lines_done"])
        skipped = state["lines_done"]
        scored = errors = 0
        bar = _progress(total, skipped, progress_bar)
        with open(self.output, "r+b") as out, open(self.errors, "r+b") as err, open(self.input, "rb") as src:
            # Drop anything written after the last checkpoint (a chunk cut short by a crash).
            for f, key in ((out, "output_bytes"), (err, "errors_bytes")):
                f.truncate(state[key])
                f.seek(state[key])
            try:
                score_chunk = self.chunk_scorer or self.score_chunk
                for chunk in _read_chunks(src, skipped, self.chunk_size):
                    n_ok, n_err = score_chunk(chunk, out, err)
                    scored, errors = scored + n_ok, errors + n_err
                    for f in (out, err):
                        f.flush()
                        os.fsync(f.fileno())
                    state.update(lines_done=chunk[-1][0], output_bytes=out.tell(), errors_bytes=err.tell())
                    self._save_state(state)
                    if bar is not None:
                        bar.update(len(chunk))
                        bar.set_postfix(errors=errors, refresh=False)
            finally:
                if bar is not None:
                    bar.close()
        state.update(lines_done=total, complete=True)
        self._save_state(state)
        return JobResult(total, scored, errors, skipped)

    def score_chunk(self, chunk: list[tuple[int, bytes]], out: IO[bytes], err: IO[bytes]) -> tuple[int, int]:
        """Parse, encode and score one chunk; records to `out`, failures to `err`, in input order."""
        encoded: list[EncodedItem] = []
        meta: list[tuple[int, Any]] = []
        failures: dict[int, dict[str, Any]] = {}
        raw = dict(chunk)
        for lineno, line in chunk:
            try:
                item, item_id = _parse(lineno, line)
                encoded.append(self.engine.encode(item))
                meta.append((lineno, item_id))
            except ItemError as e:
                failures[lineno] = _failure(lineno, e.field, str(e), line)
        results = self._score_isolating(encoded, meta, failures, raw)
        by_line: dict[int, tuple[Any, ItemScore]] = {}
        for (lineno, item_id), s in zip(meta, results, strict=True):
            if s is None:
                continue
            if not s.finite:  # JSON has no NaN; a broken row is an error
                failures[lineno] = _failure(lineno, "item", NON_FINITE, raw[lineno])
            else:
                by_line[lineno] = (item_id, s)
        for lineno, _ in chunk:  # input order
            if lineno in by_line:
                item_id, s = by_line[lineno]
                out.write((json.dumps(self._record(lineno, item_id, s), allow_nan=False) + "\n").encode())
            else:
                err.write((json.dumps(failures[lineno]) + "\n").encode())
        return len(by_line), len(chunk) - len(by_line)

    def _score_isolating(
        self,
        encoded: list[EncodedItem],
        meta: list[tuple[int, Any]],
        failures: dict[int, dict[str, Any]],
        raw: dict[int, bytes],
    ) -> list[ItemScore | None]:
        """Score the chunk in the engine's batches (the service's policy); a batch that fails is bisected
        down to the culprit, which is recorded, never dropped."""
        results: list[ItemScore | None] = [None] * len(encoded)
        lost = 0
        for idxs in self.engine.policy.plan_items(encoded):
            scored = forward_isolating(self.engine.forward, [encoded[i] for i in idxs])
            for i, r in zip(idxs, scored, strict=True):
                if isinstance(r, Exception):
                    lost += 1
                    lineno = meta[i][0]
                    failures[lineno] = _failure(lineno, "item", f"scoring failed: {r!r}", raw[lineno])
                else:
                    results[i] = r
        if len(encoded) > 1 and lost == len(encoded):
            raise JobError("every item of a chunk failed to score: the model is broken, not the data")
        return results

    def _record(self, lineno: int, item_id: Any, s: ItemScore) -> dict[str, Any]:
        rec: dict[str, Any] = {}
        if item_id is not None:
            rec["id"] = item_id
        novelty = self.engine.manifest.novelty
        result = item_result(
            s,
            self.aggregation,
            self.engine.head_names,
            self.engine.manifest.disagreement,
            novelty_quantiles=novelty.quantiles if novelty is not None else None,
        )
        rec.update(line=lineno, reward=result.pop("reward"), aggregation=self.aggregation.name, **result)
        return rec


def _failure(lineno: int, field: str, error: str, raw: bytes) -> dict[str, Any]:
    return {"line": lineno, "field": field, "error": error, "raw": _raw_excerpt(raw)}


def _progress(total: int, done: int, enabled: bool):  # noqa: ANN202 - tqdm or None
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="item", dynamic_ncols=True, smoothing=0.1, desc="scoring")
