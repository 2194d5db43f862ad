"""Proof bundles: a directory (or one tar file) holding a versioned manifest and the checkpoint files.

    bundle/
      manifest.json                       spec, job id, records, Merkle root, commitment, file table, env
      checkpoints/step-000000000.safetensors
      checkpoints/step-000000010.safetensors
      ...

`open_bundle` validates everything before anything is used, and every problem raises a typed `BundleError` that
names the file or field: unknown version, missing/extra/renamed files, links or paths escaping the bundle, file
sizes and blake3 digests, every manifest field (types, sizes, finiteness), the job id against the spec, the record
steps against the spec, and the Merkle root and commitment against the records. Checkpoints are read with
safetensors (no pickle, no code) and their tensors checked against the committed state digest on load.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .canonical import Digest, canonical_json, parse_json_strict
from .digest import State, combine_digests, tensor_bytes, tensor_digest, tensor_digests
from .errors import ArchiveError, BundleError, BundleFileError, BundleVersionError, DigestMismatch, ManifestError, SpecError
from .merkle import InclusionProof, get_proof
from .spec import FORMAT_VERSION, JobSpec, spec_from_dict
from .trace import EMPTY_DATA, Record, compute_trace_commitment, record_from_dict

__all__ = [
    "Manifest",
    "FileEntry",
    "Bundle",
    "open_bundle",
    "write_manifest",
    "write_checkpoint",
    "checkpoint_name",
    "pack_bundle",
    "file_digest",
    "MANIFEST_NAME",
    "BUNDLE_FORMAT",
]

BUNDLE_FORMAT = "pol-bundle"
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 32 << 20
MAX_FILE_BYTES = 1 << 40
MAX_RECORDS = 1_000_000
MAX_ENV_ENTRIES = 32
MAX_ENV_CHARS = 512
_CHECKPOINT = re.compile(r"^checkpoints/step-(\d{9})\.safetensors$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_KEYS = {"format", "version", "spec", "job_id", "records", "merkle_root", "root", "files", "env"}


def checkpoint_name(step: int) -> str:
    return f"checkpoints/step-{step:09d}.safetensors"


def file_digest(path: Path) -> Digest:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if path.stat().st_size:
        h.update_mmap(path)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class FileEntry:
    size: int
    blake3: Digest

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "blake3": self.blake3}


@dataclass(frozen=True, slots=True)
class Manifest:
    spec: JobSpec
    records: tuple[Record, ...]
    merkle_root: Digest
    root: Digest  # the commitment: Merkle root bound to the job id and record count
    files: Mapping[str, FileEntry]
    env: Mapping[str, str | int] = field(default_factory=dict)  # information only, outside every digest
    version: int = FORMAT_VERSION

    @property
    def job_id(self) -> Digest:
        return self.spec.job_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "version": self.version,
            "spec": self.spec.to_dict(),
            "job_id": self.job_id,
            "records": [r.to_dict() for r in self.records],
            "merkle_root": self.merkle_root,
            "root": self.root,
            "files": {name: entry.to_dict() for name, entry in sorted(self.files.items())},
            "env": dict(self.env),
        }


def _hex_field(value: Any, name: str) -> Digest:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ManifestError(name, "expected 64 lowercase hex characters")
    return value


def _safe_relative(name: str) -> bool:
    parts = name.split("/")
    return not (name.startswith("/") or "\\" in name or ".." in parts or "" in parts or "." in parts or "\x00" in name)


def _check_path(name: Any, where: str) -> str:
    if not isinstance(name, str) or len(name) > 256:
        raise ManifestError(where, "file names must be strings of at most 256 characters")
    if not _safe_relative(name):
        raise BundleFileError(name, "path escapes the bundle")
    if not _CHECKPOINT.match(name):
        raise BundleFileError(name, "not a checkpoint name of the form checkpoints/step-NNNNNNNNN.safetensors")
    return name


def _files_from_dict(value: Any) -> dict[str, FileEntry]:
    if not isinstance(value, Mapping) or len(value) > MAX_RECORDS:
        raise ManifestError("files", "expected a table of at most 1e6 files")
    files = {}
    for name, entry in value.items():
        _check_path(name, "files")
        if not isinstance(entry, Mapping) or set(entry) != {"size", "blake3"}:
            raise ManifestError(f"files.{name}", "expected exactly the keys size and blake3")
        size = entry["size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
            raise ManifestError(f"files.{name}.size", "expected a non-negative integer size")
        files[name] = FileEntry(size, _hex_field(entry["blake3"], f"files.{name}.blake3"))
    return files


def _env_from_dict(value: Any) -> dict[str, str | int]:
    if not isinstance(value, Mapping) or len(value) > MAX_ENV_ENTRIES:
        raise ManifestError("env", f"expected a table of at most {MAX_ENV_ENTRIES} entries")
    for key, item in value.items():
        ok = isinstance(item, str) and len(item) <= MAX_ENV_CHARS or isinstance(item, int) and not isinstance(item, bool)
        if len(key) > 64 or not ok or (isinstance(item, int) and abs(item) > 2**63):
            raise ManifestError(f"env.{key}", f"expected a short string or an integer (at most {MAX_ENV_CHARS} characters)")
    return dict(value)


def manifest_from_dict(value: Any) -> Manifest:
    """Parse and check a manifest's structure and its internal consistency. Raises a BundleError subclass."""
    if not isinstance(value, Mapping):
        raise ManifestError("manifest", "expected a JSON object")
    if value.get("format") != BUNDLE_FORMAT:
        raise BundleVersionError(f"not a pol bundle: format is {str(value.get('format'))[:40]!r}, expected {BUNDLE_FORMAT!r}")
    if value.get("version") != FORMAT_VERSION:
        raise BundleVersionError(f"bundle version {str(value.get('version'))[:20]!r} is not supported (this reader knows {FORMAT_VERSION})")
    if set(value) != _MANIFEST_KEYS:
        missing, extra = sorted(_MANIFEST_KEYS - set(value)), sorted(set(value) - _MANIFEST_KEYS)
        raise ManifestError("manifest", f"missing keys {missing}, unknown keys {extra}")
    try:
        spec = spec_from_dict(value["spec"], require_resolved=True)
    except SpecError as exc:
        raise ManifestError("spec", str(exc)) from None
    job_id = _hex_field(value["job_id"], "job_id")
    if job_id != spec.job_id:
        raise DigestMismatch("job_id (blake3 of the canonical spec)", job_id, spec.job_id)
    raw_records = value["records"]
    if not isinstance(raw_records, list) or not 0 < len(raw_records) <= MAX_RECORDS:
        raise ManifestError("records", f"expected a list of 1 to {MAX_RECORDS} records")
    records = tuple(record_from_dict(r, f"records[{i}]") for i, r in enumerate(raw_records))
    expected_steps = spec.checkpoint_steps
    if [r.step for r in records] != expected_steps:
        raise ManifestError("records", f"record steps do not match the spec's checkpoints 0, {spec.every}, ..., {spec.steps}")
    if records[0].data != EMPTY_DATA or records[0].loss is not None:
        raise ManifestError("records[0]", "the step-0 record consumes no data and has no loss")
    manifest = Manifest(
        spec=spec,
        records=records,
        merkle_root=_hex_field(value["merkle_root"], "merkle_root"),
        root=_hex_field(value["root"], "root"),
        files=_files_from_dict(value["files"]),
        env=_env_from_dict(value["env"]),
    )
    expected_files = {checkpoint_name(s) for s in expected_steps}
    if set(manifest.files) != expected_files:
        missing, extra = sorted(expected_files - set(manifest.files)), sorted(set(manifest.files) - expected_files)
        raise ManifestError("files", f"the file table must list one checkpoint per record: missing {missing[:3]}, extra {extra[:3]}")
    merkle, commitment = compute_trace_commitment(job_id, records)
    if merkle != manifest.merkle_root:
        raise DigestMismatch("merkle_root (over the records)", manifest.merkle_root, merkle)
    if commitment != manifest.root:
        raise DigestMismatch("root (the commitment)", manifest.root, commitment)
    return manifest


def _read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        raise BundleFileError(MANIFEST_NAME, "missing (is this a bundle directory?)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest", f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        value = parse_json_strict(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ManifestError("manifest", f"not valid JSON: {exc}") from None
    return manifest_from_dict(value)


def _listing(directory: Path) -> set[str]:
    """Every entry below the directory as a relative path; links and special files are refused."""
    found = set()
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in dirs + files:
            full = Path(root) / name
            rel = full.relative_to(directory).as_posix()
            if full.is_symlink():
                raise BundleFileError(rel, "is a link; links could point outside the bundle and are refused")
            if full.is_dir():
                if rel != "checkpoints":
                    raise BundleFileError(rel, "unexpected directory in the bundle")
            elif not full.is_file():
                raise BundleFileError(rel, "not a regular file")
            else:
                found.add(rel)
    return found


def _check_files(directory: Path, manifest: Manifest) -> None:
    present = _listing(directory) - {MANIFEST_NAME}
    for name in sorted(set(manifest.files) - present):
        raise BundleFileError(name, "missing from the bundle")
    for name in sorted(present - set(manifest.files)):
        raise BundleFileError(name, "extra file not listed in the manifest")
    for name, entry in sorted(manifest.files.items()):
        path = directory / name
        size = path.stat().st_size
        if size != entry.size:
            raise BundleFileError(name, f"size {size} differs from the manifest's {entry.size}")
        got = file_digest(path)
        if got != entry.blake3:
            raise DigestMismatch(name, entry.blake3, got)


class Bundle:
    """An opened, fully validated bundle. Use as a context manager when opened from an archive."""

    def __init__(self, path: Path, manifest: Manifest, tmp: tempfile.TemporaryDirectory[str] | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self._tmp = tmp

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def spec(self) -> JobSpec:
        return self.manifest.spec

    @property
    def records(self) -> tuple[Record, ...]:
        return self.manifest.records

    def record_index(self, step: int) -> int:
        for i, r in enumerate(self.records):
            if r.step == step:
                return i
        raise BundleError(f"the bundle has no checkpoint at step {step}")

    def proof(self, index: int) -> InclusionProof:
        job = self.manifest.job_id
        return get_proof([r.leaf(job) for r in self.records], index)

    def load_state(self, step: int) -> dict[str, torch.Tensor]:
        """Read the checkpoint at `step` and check it against its committed state digest.

        Raises BundleError if unreadable, DigestMismatch (naming the first differing tensor) if it was altered.
        """
        record = self.records[self.record_index(step)]
        name = checkpoint_name(step)
        data = (self.path / name).read_bytes()
        try:
            state = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise BundleFileError(name, f"not a readable safetensors file: {exc}") from None
        got = combine_digests(tensor_digests(state))
        if got != record.state:
            raise DigestMismatch(f"state at step {step} ({name})", record.state, got)
        return state


def _extract_archive(archive: Path, dest: Path) -> None:
    """Extract a bundle archive member by member, refusing anything but regular files with bundle names."""
    seen: set[str] = set()
    total = 0
    try:
        with tarfile.open(archive, "r:") as tf:
            for member in tf:
                name = member.name
                if name in ("checkpoints", "checkpoints/") and member.isdir():
                    continue
                if not _safe_relative(name):
                    raise ArchiveError(f"archive member {name[:80]!r} escapes the bundle")
                if not member.isreg():
                    raise ArchiveError(f"archive member {name[:80]!r} is not a regular file (links are refused)")
                if name != MANIFEST_NAME and not _CHECKPOINT.match(name):
                    raise ArchiveError(f"archive member {name[:80]!r} is not a bundle file")
                if name in seen:
                    raise ArchiveError(f"archive member {name!r} appears twice")
                seen.add(name)
                total += member.size
                if member.size > MAX_FILE_BYTES or total > MAX_FILE_BYTES:
                    raise ArchiveError(f"archive member {name!r} is too large")
                source = tf.extractfile(member)
                assert source is not None
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
                if target.stat().st_size != member.size:
                    raise ArchiveError(f"archive is truncated inside {name!r}")
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"archive {archive.name} is truncated or malformed: {exc}") from None
    except OSError as exc:
        raise ArchiveError(f"cannot read archive {archive.name}: {exc.strerror or exc}") from None


def open_bundle(path: str | Path) -> Bundle:
    """Open a bundle directory or archive and validate all of it. Raises a BundleError subclass naming the problem."""
    path = Path(path)
    if path.is_dir():
        manifest = _read_manifest(path)
        _check_files(path, manifest)
        return Bundle(path, manifest)
    if not path.is_file():
        raise BundleFileError(str(path), "no such bundle directory or archive")
    tmp = tempfile.TemporaryDirectory(prefix="pol-bundle-")
    try:
        dest = Path(tmp.name)
        _extract_archive(path, dest)
        manifest = _read_manifest(dest)
        try:
            _check_files(dest, manifest)
        except BundleFileError as exc:
            raise ArchiveError(f"archive {path.name} is truncated or incomplete: {exc}") from None
        return Bundle(dest, manifest, tmp)
    except BaseException:
        tmp.cleanup()
        raise


def write_checkpoint(
    directory: Path, step: int, state: State, job_id: Digest, digests: dict[str, Digest] | None = None
) -> FileEntry:
    """Write one checkpoint atomically (temporary file, then rename) and return its file-table entry.

    `digests`, when given, is filled with the per-tensor digests of `state` (`pol.digest.tensor_digests`),
    computed from the same bytes in the same pass, so a solver hashes its state without reading it twice.
    """
    name = checkpoint_name(step)
    target = directory / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    size, digest = _stream_safetensors(tmp, state, {"pol": "checkpoint", "job_id": job_id, "step": str(step)}, digests)
    os.replace(tmp, target)
    return FileEntry(size, digest)


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_WRITE_BATCH = 1 << 20  # tensors smaller than this are gathered into one write (a state may hold hundreds)


def _stream_safetensors(
    path: Path, state: State, metadata: dict[str, str], digests: dict[str, Digest] | None = None
) -> tuple[int, Digest]:
    """Write `state` in the safetensors format straight from tensor memory, hashing the bytes as they go out.

    The same file `safetensors.torch.save_file` would write up to header layout, without building the whole file
    in memory first (for a 120 MB state that copy cost more than the disk write). Read back with the safetensors
    library, which validates it; a test holds the two writers to the same tensors. With `digests`, also the
    per-tensor digests (see `write_checkpoint`).
    """
    names = sorted(state)
    flat = {n: state[n].detach().to("cpu").contiguous() for n in names}
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for n in names:
        t = flat[n]
        nbytes = t.numel() * t.element_size()
        header[n] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    # canonical JSON, written directly: names, integers and our metadata need none of canonical_json's checks
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned, as the reference writer pads
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "wb") as f:

        def emit(chunk: bytes | bytearray | memoryview) -> None:
            hasher.update(chunk)
            f.write(chunk)

        pending = bytearray(len(text).to_bytes(8, "little") + text)  # small pieces gathered into one write
        for n in names:
            data = tensor_bytes(flat[n])
            if digests is not None:
                digests[n] = tensor_digest(n, flat[n], data)
            if data.nbytes >= _WRITE_BATCH:
                emit(pending)
                pending = bytearray()
                emit(data)
            else:
                pending += data
                if len(pending) >= _WRITE_BATCH:
                    emit(pending)
                    pending = bytearray()
        emit(pending)
    return 8 + len(text) + offset, hasher.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write manifest.json atomically."""
    tmp = directory / (MANIFEST_NAME + ".tmp")
    tmp.write_text(canonical_json(manifest.to_dict()) + "\n", encoding="ascii")
    os.replace(tmp, directory / MANIFEST_NAME)


def pack_bundle(directory: str | Path, archive: str | Path) -> Path:
    """Write a validated bundle directory as one deterministic tar file (manifest first). Raises BundleError."""
    directory, archive = Path(directory), Path(archive)
    bundle = open_bundle(directory)
    names = [MANIFEST_NAME, *sorted(bundle.manifest.files)]
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in names:
            data = (directory / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, archive)
    return archive
