"""Integrity records: sha256 and size of every bundle file, in chunks for large ones.

Recorded in the manifest as
    "integrity": {"algorithm": "sha256", "chunk_bytes": 64 MiB,
                  "files": {NAME: {"bytes": N, "sha256": HEX, "chunks": [HEX, ...]}}, "manifest_sha256": HEX}
`sha256` is the whole file's (what `sha256sum NAME` prints); `chunks` (files larger than one
chunk) are the digests of consecutive `chunk_bytes` slices, so a large file is checked in
parallel and a mismatch is located. `manifest_sha256` covers the manifest itself: the digest
of its canonical JSON (sorted keys, no spaces) without that one field.

Sizes are checked on every open (a stat per file); digests on request (`check_integrity`).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from llmexport import LLMExportError

ALGORITHM = "sha256"
CHUNK_BYTES = 64 * 1024 * 1024
_READ = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileDigest:
    bytes: int
    sha256: str
    chunks: tuple[str, ...] = ()  # files larger than one chunk only

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.sha256} | ({"chunks": list(self.chunks)} if self.chunks else {})

    @classmethod
    def from_dict(cls, entry: dict, name: str, where: str) -> "FileDigest":
        chunks = entry.get("chunks", [])
        if not (type(entry.get("bytes")) is int and isinstance(entry.get("sha256"), str) and isinstance(chunks, list)):
            raise LLMExportError(f"{where}: integrity entry for {name!r} is malformed; re-export the bundle")
        return cls(entry["bytes"], entry["sha256"], tuple(chunks))


@dataclass(frozen=True)
class Integrity:
    """The manifest's `integrity` record (module docstring); `manifest_sha256` is None until written."""
    algorithm: str
    chunk_bytes: int
    files: dict[str, FileDigest]
    manifest_sha256: str | None = None

    def to_dict(self) -> dict:
        record = {"algorithm": self.algorithm, "chunk_bytes": self.chunk_bytes,
                  "files": {name: f.to_dict() for name, f in self.files.items()}}
        return record | ({"manifest_sha256": self.manifest_sha256} if self.manifest_sha256 else {})

    @classmethod
    def from_dict(cls, record: dict, where: str) -> "Integrity":
        files, chunk = record["files"], record["chunk_bytes"]
        if not (isinstance(files, dict) and type(chunk) is int and chunk > 0):
            raise LLMExportError(f"{where}: integrity record is malformed; re-export the bundle")
        return cls(record.get("algorithm", ALGORITHM), chunk,
                   {name: FileDigest.from_dict(e, name, where) for name, e in files.items()},
                   record.get("manifest_sha256"))

    def adding(self, bundle_dir: Path, names: list[str]) -> "Integrity":
        """This record with the files `names` hashed now and added (files already recorded keep their digests)."""
        return replace(self, files={**self.files, **describe(bundle_dir, names, self.chunk_bytes).files},
                       manifest_sha256=None)


def canonical_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without integrity.manifest_sha256."""
    integrity = dict(manifest.get("integrity") or {})
    integrity.pop("manifest_sha256", None)
    content = {**manifest, "integrity": integrity}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def describe(bundle_dir: Path, names: list[str], chunk_bytes: int = CHUNK_BYTES) -> Integrity:
    """The integrity record of `names` (files inside bundle_dir), one sequential pass per file."""
    files = {}
    for name in names:
        path = bundle_dir / name
        whole, chunks, current, in_chunk, size = hashlib.sha256(), [], hashlib.sha256(), 0, 0
        with open(path, "rb") as f:
            while block := f.read(min(_READ, chunk_bytes - in_chunk)):
                whole.update(block)
                current.update(block)
                in_chunk += len(block)
                size += len(block)
                if in_chunk == chunk_bytes:
                    chunks.append(current.hexdigest())
                    current, in_chunk = hashlib.sha256(), 0
        if in_chunk:
            chunks.append(current.hexdigest())
        files[name] = FileDigest(size, whole.hexdigest(), tuple(chunks) if len(chunks) > 1 else ())
    return Integrity(ALGORITHM, chunk_bytes, files)


def check_sizes(record: Integrity, path_of, where: str) -> None:
    """Every recorded file exists with its recorded size (cheap: one stat each)."""
    for name, entry in record.files.items():
        path = path_of(name)
        if not path.is_file():
            raise LLMExportError(f"bundle {path.parent} is missing {name}; re-copy or re-export the bundle")
        size = path.stat().st_size
        if size != entry.bytes:
            raise LLMExportError(f"{where}: {name} has {size} bytes, the manifest records {entry.bytes}: "
                                 f"the file is truncated or replaced; re-copy or re-export the bundle")


def _digest(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0 and (block := f.read(min(_READ, length))):
            digest.update(block)  # hashlib releases the GIL on large blocks: threads run in parallel
            length -= len(block)
    return digest.hexdigest()


def check_digests(record: Integrity, path_of, where: str, workers: int | None = None) -> None:
    """Every file (every chunk of chunked files) hashes to its record, checked in parallel; the
    error names each mismatching file and chunk."""
    chunk = record.chunk_bytes
    jobs = []  # (file, chunk index or None, path, offset, length, expected)
    for name, entry in record.files.items():
        path = path_of(name)
        if entry.chunks:
            jobs += [(name, i, path, i * chunk, chunk, h) for i, h in enumerate(entry.chunks)]
        else:
            jobs.append((name, None, path, 0, entry.bytes, entry.sha256))
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        found = list(pool.map(lambda job: _digest(*job[2:5]), jobs))
    bad = []
    for (name, index, _, offset, length, expected), got in zip(jobs, found, strict=True):
        if got != expected:
            end = min(offset + length, record.files[name].bytes)
            bad.append(name if index is None else f"{name} chunk {index} (bytes {offset}..{end - 1})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise LLMExportError(f"{where}: sha256 mismatch in {', '.join(bad[:3])}{more}: the bundle was modified or "
                             f"damaged after export; re-copy or re-export it")
