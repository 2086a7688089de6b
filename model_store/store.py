"""A directory of reward models: `<root>/<name>/<version>/`, published atomically, verified on load.

Atomicity: a version is copied into a hidden `.tmp-*` sibling, its manifest (with checksums) is
written and fsynced, and only then is the directory renamed into place. `rename(2)` of a directory
onto a missing path is atomic on POSIX, so a reader sees either no version or a whole one; a crash
leaves only a `.tmp-*` directory, which listing ignores and the next publish sweeps.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model_store.errors import ChecksumMismatch, InvalidModelName, ModelNotFound, ModelStoreError, UnsafeModel
from model_store.manifest import (
    BRANCHES_FILE,
    MANIFEST_NAME,
    RewardManifest,
    checksum_tree,
    config_num_labels,
    resolve_manifest,
    sha256_file,
)
from model_store.uncertainty import NOVELTY_FILE

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Trainer checkpoint artefacts: pickles that are never weights. They are left out of the store.
_TRAINER_ARTEFACTS = re.compile(
    r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$"
)
_STALE_TMP_SECONDS = 24 * 3600.0
# What a publish does not copy (shutil.ignore_patterns matches each file and directory name).
_NOT_COPIED = (MANIFEST_NAME, ".*", "training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt",
               "rng_state*.pth")  # fmt: skip


def check_name(kind: str, value: str) -> str:
    """Names become path components: only a conservative charset, never `.`/`..` or separators."""
    if not _NAME_RE.fullmatch(value) or value in {".", ".."} or ".." in value:
        raise InvalidModelName(
            f"invalid model {kind} {value!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (at most 128 characters)"
        )
    return value


def _version_key(v: str) -> tuple:
    """Natural order so that v10 sorts after v9 and 1.10 after 1.9."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", v) if p)


def find_pickled_weights(directory: Path) -> list[Path]:
    """Pickled files that could be weights (anything pickled but the known Trainer artefacts)."""
    return sorted(
        p
        for p in Path(directory).rglob("*")
        if p.is_file() and p.suffix in PICKLE_SUFFIXES and not _TRAINER_ARTEFACTS.match(p.name)
    )


def _refuse_symlinks(directory: Path) -> None:
    """A link could point anywhere (and change after verification): models are plain files only."""
    links = [p for p in Path(directory).rglob("*") if p.is_symlink()]
    if links:
        raise UnsafeModel(f"{directory} contains symbolic links ({', '.join(str(p) for p in links[:3])})")


def check_weights_safe(directory: Path, allow_pickle: bool = False) -> None:
    """Refuse a checkpoint whose weights would be unpickled (arbitrary code) unless the operator allows it."""
    directory = Path(directory)
    has_safetensors = any(directory.glob("*.safetensors"))
    pickled = find_pickled_weights(directory)
    if pickled and not allow_pickle:
        names = ", ".join(p.name for p in pickled[:5])
        raise UnsafeModel(
            f"{directory} contains pickled weights ({names}); only safetensors are loaded. "
            "Convert the checkpoint to safetensors, or set HYDRA_RM_ALLOW_PICKLE=true if you trust it."
        )
    if not has_safetensors and not pickled:
        raise ModelNotFound(f"{directory} has no *.safetensors weights")


def verify_checksums(directory: Path, manifest: RewardManifest) -> None:
    """The files on disk must be exactly those in the manifest, each with its sha256; else nothing loads."""
    directory = Path(directory)
    _refuse_symlinks(directory)
    if not manifest.files:
        raise ChecksumMismatch(f"{directory}: the manifest lists no file checksums")
    on_disk = {
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }
    problems = [f"{rel}: not listed in the manifest" for rel in sorted(on_disk - manifest.files.keys())]
    for rel, expected in manifest.files.items():
        p = directory / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != expected:
            problems.append(f"{rel}: sha256 mismatch")
    if problems:
        raise ChecksumMismatch(f"{directory} failed verification: " + "; ".join(problems))


def _publishable_files(directory: Path) -> set[str]:
    """Relative paths a publish copies: everything but the manifest, hidden files and trainer artefacts."""
    out = set()
    for p in Path(directory).rglob("*"):
        rel = p.relative_to(directory)
        if p.is_file() and not any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in _NOT_COPIED):
            out.add(rel.as_posix())
    return out


def check_no_stray_weights(directory: Path) -> None:
    """Refuse safetensors files that transformers would not load: they would be published and
    checksummed as if they mattered (an attack left `extra.safetensors` beside the model and it was
    imported and served), and a stray shard usually means a half-copied or mixed checkpoint."""
    directory = Path(directory)
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*.safetensors") if p.is_file()}
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            used = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelStoreError(f"{index} is not a valid safetensors index: {e}") from e
        missing = sorted(used - present)
        if missing:
            raise ModelStoreError(
                f"{directory}: shards listed in {index.name} are missing: {', '.join(missing)}"
            )
    else:
        used = {"model.safetensors"} & present
    # The novelty statistic and per-head branches are read by hydra-rm, not HF (a branches file the
    # manifest does not declare is refused by the loader: the manifest says what is served).
    stray = sorted(present - used - {NOVELTY_FILE, BRANCHES_FILE})
    if stray:
        raise ModelStoreError(
            f"{directory} holds weight files the model would not load ({', '.join(stray[:5])}); "
            "remove them (or fix the shard index) so the store holds exactly what is served"
        )


def _compare_files(found: dict[str, str], expected: dict[str, str]) -> list[str]:
    problems = [f"{rel}: not listed in the manifest" for rel in sorted(found.keys() - expected.keys())]
    for rel in sorted(expected):
        if rel not in found:
            problems.append(f"{rel}: missing")
        elif found[rel] != expected[rel]:
            problems.append(f"{rel}: sha256 mismatch")
    return problems


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    path: Path

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


class ModelStore:
    """Versioned reward models under one root directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()

    def _model_dir(self, name: str) -> Path:
        return self.root / check_name("name", name)

    def versions(self, name: str) -> list[str]:
        d = self._model_dir(name)
        if not d.is_dir():
            return []
        found = [p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(found, key=_version_key)

    def list(self) -> list[ModelRef]:
        if not self.root.is_dir():
            return []
        refs = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and _NAME_RE.fullmatch(d.name):
                refs.extend(ModelRef(d.name, v, d / v) for v in self.versions(d.name))
        return refs

    def resolve(self, spec: str) -> ModelRef:
        """`name` (latest version) or `name:version`."""
        name, _, version = spec.partition(":")
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"no model named {name!r} in store {self.root}")
        if version:
            check_name("version", version)
            if version not in versions:
                raise ModelNotFound(f"model {name!r} has no version {version!r} (has: {', '.join(versions)})")
        else:
            version = versions[-1]
        return ModelRef(name, version, self._model_dir(name) / version)

    def contains(self, spec: str) -> bool:
        try:
            self.resolve(spec)
        except (ModelNotFound, InvalidModelName):
            return False
        return True

    def _next_version(self, name: str) -> str:
        numeric = [int(v[1:]) for v in self.versions(name) if re.fullmatch(r"v\d+", v)]
        return f"v{max(numeric, default=0) + 1}"

    def _sweep_stale(self, model_dir: Path) -> None:
        now = time.time()
        for p in model_dir.glob(".tmp-*"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass

    def publish(
        self,
        source: Path | str,
        name: str,
        version: str | None = None,
        manifest: RewardManifest | None = None,
        *,
        allow_pickle: bool = False,
        check: Callable[[Path], None] | None = None,
    ) -> ModelRef:
        """Copy a checkpoint directory in as a new version; the version appears whole or not at all.

        When the source carries a manifest with checksums (a copied store version, a hub model
        published by hydra-rm), the copy must match them exactly. `check(copy)` runs on the complete
        copy (manifest written) before it becomes visible: `hydra-rm models import` loads and probes
        the model there, so what is checked is byte for byte what is published. Any failure leaves
        nothing behind, not even an empty `<name>/` directory.
        """
        source = Path(source)
        model_dir = self._model_dir(name)  # names and versions are checked before anything is written
        if version:
            check_name("version", version)
        if not source.is_dir():
            raise ModelNotFound(f"{source} is not a directory")
        _refuse_symlinks(source)
        check_weights_safe(source, allow_pickle=allow_pickle)
        check_no_stray_weights(source)
        if manifest is None:
            try:
                manifest = RewardManifest.read(source)
            except ValueError as e:  # invalid JSON or fields: pydantic's ValidationError is a ValueError
                raise ModelStoreError(f"{source / MANIFEST_NAME} is not a valid manifest: {e}") from e
        manifest = resolve_manifest(manifest, config_num_labels(source))
        if manifest.files:  # fail fast, before copying: the copy is compared again below
            problems = _compare_files({rel: "" for rel in _publishable_files(source)}, manifest.files)
            missing_or_unlisted = [p for p in problems if not p.endswith("sha256 mismatch")]
            if missing_or_unlisted:
                raise ChecksumMismatch(
                    f"{source} does not match its own {MANIFEST_NAME}: " + "; ".join(missing_or_unlisted)
                )
        created = not model_dir.exists()
        model_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._sweep_stale(model_dir)
            for _attempt in range(100):  # auto-versions: a concurrent publisher may take vN first
                target = version or self._next_version(name)
                try:
                    return self._publish_as(source, model_dir, name, target, manifest, check)
                except FileExistsError:
                    if version:
                        raise
            raise ModelStoreError(f"could not find a free version for {name!r}")
        except BaseException:
            if created:
                try:
                    model_dir.rmdir()  # only if still empty: a concurrent publisher's version stays
                except OSError:
                    pass
            raise

    def _publish_as(
        self,
        source: Path,
        model_dir: Path,
        name: str,
        version: str,
        manifest: RewardManifest,
        check: Callable[[Path], None] | None = None,
    ) -> ModelRef:
        final = model_dir / version
        if final.exists():
            raise FileExistsError(f"{name}:{version} already exists in {self.root}; versions are immutable")
        tmp = model_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(*_NOT_COPIED))
            _umask_modes(tmp)
            files = checksum_tree(tmp)
            if manifest.files:  # the source's own checksums: a tampered copy of a version is refused
                problems = _compare_files(files, manifest.files)
                if problems:
                    raise ChecksumMismatch(
                        f"{source} does not match its own {MANIFEST_NAME}: " + "; ".join(problems)
                    )
            manifest = manifest.model_copy(update={"files": files})
            manifest.write(tmp)
            _fsync_tree(tmp)
            if check is not None:
                check(tmp)
            try:
                os.rename(tmp, final)  # atomic: the version becomes visible whole
            except OSError as e:  # a concurrent publisher won the same version
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FileExistsError(f"{name}:{version} was published concurrently") from e
                raise
            _fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return ModelRef(name, version, final)

    def remove(self, spec: str) -> ModelRef:
        ref = self.resolve(spec)
        trash = ref.path.with_name(f".tmp-rm-{ref.version}-{uuid.uuid4().hex[:8]}")
        os.rename(ref.path, trash)  # disappears atomically, then is deleted
        shutil.rmtree(trash, ignore_errors=True)
        return ref


def _umask(default: int = 0o022) -> int:
    """The process umask, read without changing it (os.umask would, for every thread, for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return default


def _umask_modes(root: Path) -> None:
    """Give a version's files the modes a file created here would get (0644 under umask 022).
    safetensors >= 0.8 writes its files 0600 and copytree keeps modes, so a model trained by one user
    was unreadable to a server running as another (a container's user on a shared store volume)."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
