"""Proof bundles: a directory (or one tar file) holding a versioned manifest and the checkpoint files.

    bundle/
      manifest.json                       spec, job id, records, Merkle root, commitment, file table, env
      checkpoints/step-000000000.safetensors
      checkpoints/step-000000010.safetensors
      ...

`open_bundle` validates everything before anything is used, and every problem raises a typed `BundleError` that
names the file or field: unknown version, missing/extra/renamed files, links or paths escaping the bundle, file
sizes, every manifest field (types, sizes, finiteness), the job id against the spec, the record steps against the
spec (computed, never enumerated from a claimed count), and the Merkle root and commitment against the records.
File digests are checked in full at open (`full=True`, the default; `pol inspect`) or lazily (`full=False`, what
`pol verify` does): each checkpoint's blake3 is then checked on the bytes actually read, in the same pass, the first
time the file is read in full (`Bundle.load_state`), so a verifier reads and hashes only the checkpoints its sample
needs. A corrupt checkpoint that is never read costs nothing and proves nothing either way; one that is read raises
DigestMismatch. `Bundle.bytes_read` counts the checkpoint bytes read so far (headers and digests included). An archive is read in place, member by member, and never extracted: nothing is written to disk, and
only regular, non-sparse members with bundle names are accepted. Checkpoints are read with safetensors (no pickle,
no code) and their tensors checked against the committed state digest on load; `Bundle.read_layout` reads a
checkpoint's tensor names, dtypes and shapes from its header alone.

Writing goes through one `BundleWriter` (the solver, the market's forger and the tests' forgers all use it):
checkpoints are added one by one (`add`), each written atomically, and `finish` writes the manifest last.
"""

from __future__ import annotations

import json
import math
import os
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import eq, itemgetter
from pathlib import Path
from typing import Any

import blake3
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from . import __version__
from .canonical import Digest, canonical_json, is_digest, is_digest_list, parse_json_strict
from .digest import State, combine_digests, tensor_bytes, tensor_digest, tensor_digests
from .errors import (
    ArchiveError,
    BundleError,
    BundleFileError,
    BundleNotFound,
    BundleVersionError,
    DigestMismatch,
    ManifestError,
    SpecError,
)
from .merkle import InclusionProof, get_proof
from .spec import FORMAT_VERSION, JobSpec, spec_from_dict
from .trace import EMPTY_DATA, Record, compute_leaves, compute_trace_commitment, compute_update_norm, records_from_dicts

__all__ = [
    "Manifest",
    "FileEntry",
    "Bundle",
    "BundleWriter",
    "Layout",
    "open_bundle",
    "write_bundle",
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
_CHECKPOINT = re.compile(r"checkpoints/step-(\d{9})\.safetensors")
_CHUNK = 1 << 24
_FILE_KEYS = {"size", "blake3"}
_MANIFEST_KEYS = {"format", "version", "spec", "job_id", "records", "merkle_root", "root", "files", "env"}


_CHECKPOINT_NAME = "checkpoints/step-{:09d}.safetensors"


def checkpoint_name(step: int) -> str:
    return _CHECKPOINT_NAME.format(step)


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
    if not is_digest(value):
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
    if not _CHECKPOINT.fullmatch(name):
        raise BundleFileError(name, "not a checkpoint name of the form checkpoints/step-NNNNNNNNN.safetensors")
    return name


def _files_from_dict(value: Any, expected: set[str] | frozenset[str] = frozenset()) -> dict[str, FileEntry]:
    """The file table, every name, size and digest checked. When the table names exactly the `expected` files
    (checkpoint names this reader computed, so safe and well formed), the names need no check of their own and
    the entries are checked in one pass; anything else is checked entry by entry, raising for the first bad one."""
    if type(value) is dict and value.keys() == expected:
        fast = _file_entries(value)
        if fast is not None:
            return fast
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


def _file_entries(value: dict[str, Any]) -> dict[str, FileEntry] | None:
    """The file table's entries when each is exactly {size, blake3} with an int size in range and a digest, else
    None (for `_files_from_dict`'s entry-by-entry check to name the problem)."""
    entries = list(value.values())
    if not (set(map(type, entries)) <= {dict} and all(map(eq, map(dict.keys, entries), repeat(_FILE_KEYS)))):
        return None
    sizes = list(map(itemgetter("size"), entries))
    digests = list(map(itemgetter("blake3"), entries))
    if not (set(map(type, sizes)) <= {int} and (not sizes or 0 <= min(sizes) and max(sizes) <= MAX_FILE_BYTES)
            and is_digest_list(digests)):
        return None
    return {name: FileEntry(size, digest) for name, size, digest in zip(value, sizes, digests, strict=True)}


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
    if not isinstance(raw_records, list) or len(raw_records) != spec.n_records:
        raise ManifestError("records", f"expected a list of the spec's {spec.n_records} records (steps 0, {spec.every}, ..., {spec.steps})")
    try:
        records = records_from_dicts(raw_records, "records")
    except ManifestError:
        made = spec.versions.get("pol")
        if made != __version__:  # another pol's record format: cannot verify here, rather than a broken bundle
            raise BundleVersionError(f"the bundle was made with pol {made}, whose records pol {__version__} does not "
                                     f"read; use pol {made}") from None
        raise
    _check_record_steps(spec, records)
    if records[0].data != EMPTY_DATA or records[0].loss is not None:
        raise ManifestError("records[0]", "the step-0 record consumes no data and has no loss")
    _check_record_metrics(spec, records)
    expected_files = set(map(_CHECKPOINT_NAME.format, (r.step for r in records)))  # checkpoint_name of each
    manifest = Manifest(
        spec=spec,
        records=records,
        merkle_root=_hex_field(value["merkle_root"], "merkle_root"),
        root=_hex_field(value["root"], "root"),
        files=_files_from_dict(value["files"], expected_files),
        env=_env_from_dict(value["env"]),
    )
    if set(manifest.files) != expected_files:
        missing, extra = sorted(expected_files - set(manifest.files)), sorted(set(manifest.files) - expected_files)
        raise ManifestError("files", f"the file table must list one checkpoint per record: missing {missing[:3]}, extra {extra[:3]}")
    merkle, commitment = compute_trace_commitment(job_id, records)
    if merkle != manifest.merkle_root:
        raise DigestMismatch("merkle_root (over the records)", manifest.merkle_root, merkle)
    if commitment != manifest.root:
        raise DigestMismatch("root (the commitment)", manifest.root, commitment)
    return manifest


def _check_record_steps(spec: JobSpec, records: Sequence[Record]) -> None:
    """Record i is at the spec's checkpoint i, and only record 0 lacks an update norm. Raises ManifestError for
    the first record that is not (compared in one pass first; record by record only to name it)."""
    steps = list(range(0, spec.steps, spec.every)) + [spec.steps]  # spec.checkpoint_step(i) for every i
    updates = [r.update is None for r in records]
    if [r.step for r in records] == steps and updates[0] and not any(updates[1:]):
        return
    for i, r in enumerate(records):
        if (r.update is None) != (i == 0):
            raise ManifestError(f"records[{i}].update", "the step-0 record has no update norm; every other record has one")
        if r.step != spec.checkpoint_step(i):
            raise ManifestError(f"records[{i}].step", f"{r.step} is not the spec's checkpoint {spec.checkpoint_step(i)}")


def _check_record_metrics(spec: JobSpec, records: Sequence[Record]) -> None:
    """Every record evaluates exactly the spec's metrics, or none when the spec names no evaluation. Raises
    ManifestError for the first record that does not."""
    metrics = [m.name for m in spec.evaluation.metrics] if spec.evaluation is not None else None
    expected = sorted(metrics) if metrics is not None else None
    if metrics is None and all(r.eval is None for r in records):
        return
    for i, r in enumerate(records):
        if metrics is None and r.eval is not None:
            raise ManifestError(f"records[{i}].eval", "the spec names no evaluation")
        if metrics is not None and (r.eval is None or sorted(r.eval) != expected):
            raise ManifestError(f"records[{i}].eval", f"expected exactly the spec's metrics {metrics}")


class _Source:
    """Where a bundle's files live: a directory, or a tar archive read in place (never extracted).

    `sizes` lists every regular file (manifest included) with its size; anything else (a link, a device, a fifo, a
    sparse or duplicated archive member, a name that is not a bundle name) was refused when the source was opened.
    """

    sizes: dict[str, int]
    bytes_read: int = 0  # checkpoint bytes read (the manifest is not counted)

    def _count(self, name: str, n: int) -> None:
        if name != MANIFEST_NAME:
            self.bytes_read += n

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def digest(self, name: str) -> Digest:
        """blake3 of a file's bytes, read in chunks."""
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        size = self.sizes[name]
        for offset in range(0, size, _CHUNK):
            h.update(self.read(name, offset, min(_CHUNK, size - offset)))  # counted by read
        return h.hexdigest()

    def close(self) -> None:
        return None


class _DirectorySource(_Source):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.sizes = _listing(directory)

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        with open(self.directory / name, "rb") as f:
            f.seek(start)
            data = f.read(self.sizes[name] - start if length is None else length)
        self._count(name, len(data))
        if len(data) != (self.sizes[name] - start if length is None else length):
            raise BundleFileError(name, "changed size while being read")
        return data

    def digest(self, name: str) -> Digest:
        self._count(name, self.sizes[name])
        return file_digest(self.directory / name)


class _ArchiveSource(_Source):
    """A bundle archive indexed in place: each member's data offset and size, bounded and checked against the
    archive's length. Reading a member reads that byte range; nothing is ever written to disk."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self._file = open(archive, "rb")
        try:
            self.offsets, self.sizes = _index_archive(self._file, archive)
        except BaseException:
            self._file.close()
            raise

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        size = self.sizes[name] - start if length is None else length
        self._file.seek(self.offsets[name] + start)
        data = self._file.read(size)
        self._count(name, len(data))
        if len(data) != size:
            raise ArchiveError(f"archive {self.archive.name} is truncated inside {name!r}")
        return data

    def close(self) -> None:
        self._file.close()


def _index_archive(f: Any, archive: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Index a bundle archive's members. Raises ArchiveError for anything but regular, non-sparse members with
    bundle names, each once, whose data lies inside the archive."""
    length = os.fstat(f.fileno()).st_size
    offsets: dict[str, int] = {}
    sizes: dict[str, int] = {}
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            for member in tf:
                name = member.name
                if name in ("checkpoints", "checkpoints/") and member.isdir():
                    continue
                if not _safe_relative(name):
                    raise ArchiveError(f"archive member {name[:80]!r} escapes the bundle")
                if not member.isreg() or member.issparse():
                    raise ArchiveError(f"archive member {name[:80]!r} is not a regular file (links, devices, fifos and "
                                       "sparse files are refused)")
                if name != MANIFEST_NAME and not _CHECKPOINT.fullmatch(name):
                    raise ArchiveError(f"archive member {name[:80]!r} is not a bundle file")
                if name in sizes:
                    raise ArchiveError(f"archive member {name!r} appears twice")
                if len(sizes) > MAX_RECORDS:
                    raise ArchiveError(f"archive has more than {MAX_RECORDS + 1} members")
                if member.offset_data + member.size > length:
                    raise ArchiveError(f"archive {archive.name} is truncated inside {name!r}")
                offsets[name], sizes[name] = member.offset_data, member.size
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"archive {archive.name} is truncated or malformed: {exc}") from None
    return offsets, sizes


def _read_manifest(source: _Source) -> Manifest:
    if MANIFEST_NAME not in source.sizes:
        raise BundleNotFound(f"{MANIFEST_NAME} is missing: this is not a bundle")
    if source.sizes[MANIFEST_NAME] > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest", f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        value = parse_json_strict(source.read(MANIFEST_NAME))
    except ValueError as exc:
        raise ManifestError("manifest", f"not valid JSON: {exc}") from None
    return manifest_from_dict(value)


def _listing(directory: Path) -> dict[str, int]:
    """Every regular file below the directory (relative path -> size); links and special files are refused.

    Walks top-down as `os.walk` does (a directory's subdirectories, then its files, then each subdirectory), with
    one `os.scandir` per directory: an entry's kind comes from the directory listing and its size from one stat."""
    found: dict[str, int] = {}
    pending = [(str(directory), "")]
    while pending:
        top, prefix = pending.pop(0)
        try:
            with os.scandir(top) as scan:
                entries = list(scan)
        except OSError:
            continue  # as os.walk: a directory that cannot be listed adds nothing
        dirs, files = [], []
        for entry in entries:
            try:
                (dirs if entry.is_dir() else files).append(entry)
            except OSError:
                files.append(entry)
        for entry in dirs + files:
            rel = prefix + entry.name
            if entry.is_symlink():
                raise BundleFileError(rel, "is a link; links could point outside the bundle and are refused")
            if entry.is_dir(follow_symlinks=False):
                if rel != "checkpoints":
                    raise BundleFileError(rel, "unexpected directory in the bundle")
            elif not entry.is_file(follow_symlinks=False):
                raise BundleFileError(rel, "not a regular file")
            else:
                found[rel] = entry.stat(follow_symlinks=False).st_size
            if len(found) > MAX_RECORDS + 1:
                raise BundleFileError(rel, f"the bundle holds more than {MAX_RECORDS + 1} files")
        pending[:0] = [(entry.path, prefix + entry.name + "/") for entry in dirs]
    return found


def _check_files(source: _Source, manifest: Manifest, full: bool = True) -> None:
    """Every listed file present, none extra, each of its listed size; with `full`, each file's blake3 too."""
    present = set(source.sizes) - {MANIFEST_NAME}
    for name in sorted(set(manifest.files) - present):
        raise BundleFileError(name, "missing from the bundle")
    for name in sorted(present - set(manifest.files)):
        raise BundleFileError(name, "extra file not listed in the manifest")
    listed = [entry.size for entry in manifest.files.values()]
    if list(map(source.sizes.__getitem__, manifest.files)) != listed:  # in one pass; in order to name the first
        for name, entry in sorted(manifest.files.items()):
            if source.sizes[name] != entry.size:
                raise BundleFileError(name, f"size {source.sizes[name]} differs from the manifest's {entry.size}")
    if full:
        for name, entry in sorted(manifest.files.items()):
            got = source.digest(name)
            if got != entry.blake3:
                raise DigestMismatch(name, entry.blake3, got)


_SAFETENSORS_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
Layout = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (dtype name as torch spells it, shape)


_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _parse_layout(name: str, header: bytes, data_bytes: int | None = None) -> Layout:
    """The tensors a safetensors file declares, from its header alone. With `data_bytes` (the file's size after
    its header), each tensor's data offsets must span exactly its dtype and shape's bytes, and the tensors must
    fill the data exactly: a file is then no larger than the tensors its header declares, so once those are
    checked against the spec a verifier knows how many bytes reading it costs before it reads (or fetches) it.
    Raises BundleFileError."""
    try:
        value = parse_json_strict(header)
    except ValueError as exc:
        raise BundleFileError(name, f"not a safetensors file: header is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BundleFileError(name, "not a safetensors file: header is not an object")
    layout: Layout = {}
    spans: list[tuple[int, int]] = []
    for tensor, info in value.items():
        if tensor == "__metadata__":
            continue
        ok = isinstance(info, dict) and info.get("dtype") in _SAFETENSORS_NAMES and isinstance(info.get("shape"), list)
        if not ok or not all(type(d) is int and d >= 0 for d in info["shape"]):
            raise BundleFileError(name, f"tensor {tensor[:80]!r} has a malformed header entry")
        layout[tensor] = (_SAFETENSORS_NAMES[info["dtype"]], tuple(info["shape"]))
        if data_bytes is not None:
            offsets = info.get("data_offsets")
            numel = math.prod(info["shape"])
            if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                    or not 0 <= offsets[0] <= offsets[1] <= data_bytes or offsets[1] - offsets[0] != numel * _ITEM_BYTES[info["dtype"]]):
                raise BundleFileError(name, f"tensor {tensor[:80]!r}: its data offsets do not span its dtype and shape "
                                            f"within the file's {data_bytes} data bytes")
            spans.append((offsets[0], offsets[1]))
    if data_bytes is not None:
        spans.sort()
        covered = 0
        for begin, end in spans:  # contiguous, in any order, no gaps or overlaps, exactly to the end of the file
            if begin != covered:
                raise BundleFileError(name, "its tensors' data do not tile the file (a gap, an overlap or extra bytes)")
            covered = end
        if covered != data_bytes:
            raise BundleFileError(name, f"{data_bytes - covered} bytes beyond its tensors' data")
    return layout


class Bundle:
    """An opened bundle whose manifest, records, Merkle root, commitment and file table were checked, and, when
    opened with `full=True`, every file's digest; otherwise each file's digest is checked when it is read
    (`load_state`). Use as a context manager (an archive stays open while the bundle is)."""

    def __init__(self, path: Path, manifest: Manifest, source: _Source, *, checked: bool = True) -> None:
        self.path = path
        self.manifest = manifest
        self._source = source
        self._checked: set[str] = set(manifest.files) if checked else set()  # files whose blake3 was checked
        self.files_read: set[str] = set()  # checkpoint files read in full (and so digest-checked)

    @property
    def fully_checked(self) -> bool:
        """True when every file's digest has been checked (at open with `full=True`, or by `check_files`)."""
        return self._checked >= set(self.manifest.files)

    @property
    def bytes_read(self) -> int:
        """Checkpoint bytes read from the bundle so far: full reads, headers and full-check digests alike."""
        return self._source.bytes_read

    def check_files(self) -> None:
        """Check every file's blake3 not checked yet (what `open_bundle(full=True)` does at open). Raises
        DigestMismatch naming the first file that differs."""
        for name, entry in sorted(self.manifest.files.items()):
            if name not in self._checked:
                got = self._source.digest(name)
                if got != entry.blake3:
                    raise DigestMismatch(name, entry.blake3, got)
                self._checked.add(name)

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._source.close()

    @property
    def spec(self) -> JobSpec:
        return self.manifest.spec

    @property
    def records(self) -> tuple[Record, ...]:
        return self.manifest.records

    def record_index(self, step: int) -> int:
        """The index of the record at `step`. Raises BundleError if there is none."""
        spec = self.spec
        index = -(-step // spec.every) if 0 <= step <= spec.steps else -1
        if index < 0 or spec.checkpoint_step(index) != step:
            raise BundleError(f"the bundle has no checkpoint at step {step}")
        return index

    def proof(self, index: int) -> InclusionProof:
        job = self.manifest.job_id
        return get_proof(compute_leaves(job, self.records), index)

    def read_layout(self, step: int) -> Layout:
        """Names, dtypes and shapes of the tensors in the checkpoint at `step`, from its header alone (the file is
        not read, and its digest not checked: that happens when it is read in full). Raises BundleFileError if the
        header is malformed, or if the file is not exactly its header and its tensors' bytes (`_parse_layout`)."""
        name = checkpoint_name(self.records[self.record_index(step)].step)
        size = self._source.sizes[name]
        if size < 8:
            raise BundleFileError(name, "not a safetensors file: shorter than its header length")
        header_len = int.from_bytes(self._source.read(name, 0, 8), "little")
        if header_len > min(size - 8, MAX_MANIFEST_BYTES):
            raise BundleFileError(name, f"not a safetensors file: a header of {header_len} bytes does not fit")
        return _parse_layout(name, self._source.read(name, 8, header_len), size - 8 - header_len)

    def model_state_dict(self, step: int) -> dict[str, torch.Tensor]:
        """The model's `state_dict` at `step` (parameters and persistent buffers, names as the model has them),
        read through `load_state`, so it is checked against the commitment. Raises as `load_state`."""
        state = self.load_state(step)
        return {name.split("/", 1)[1]: t for name, t in state.items() if name.startswith(("param/", "buffer/"))}

    def load_state(self, step: int) -> dict[str, torch.Tensor]:
        """Read the checkpoint at `step` and check it against its committed state digest (and, the first time it
        is read, the file's blake3 against the file table, on the same bytes: the file is read once).

        Raises BundleError if unreadable, DigestMismatch (naming the file, or the first differing tensor) if it was
        altered.
        """
        record = self.records[self.record_index(step)]
        name = checkpoint_name(step)
        data = self._source.read(name)
        self.files_read.add(name)
        if name not in self._checked:
            got = blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
            expected = self.manifest.files[name].blake3
            if got != expected:
                raise DigestMismatch(name, expected, got)
            self._checked.add(name)
        try:
            state = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise BundleFileError(name, f"not a readable safetensors file: {exc}") from None
        got = combine_digests(tensor_digests(state))
        if got != record.state:
            raise DigestMismatch(f"state at step {step} ({name})", record.state, got)
        return state


def open_bundle(path: str | Path | Any, *, full: bool = True) -> Bundle:
    """Open a bundle directory, archive or URL and validate it: manifest, records, Merkle root, commitment, the file
    table against the files present and their sizes, and (with `full`, the default) every file's blake3. With
    `full=False` no checkpoint byte is read here: each file's digest is checked when it is read (`load_state`).
    An archive is read in place: nothing is extracted or written. A URL string (`http://...`, `s3://...`) or a
    `pol.remote.Remote` is read through `pol.remote` (fetching only what is read; see there). Raises BundleNotFound
    when there is no bundle at `path`, RemoteError and its subclasses when a URL cannot be fetched within its
    bounds, else a BundleError subclass naming the problem."""
    source = _remote_source(path)
    if source is not None:
        path = source.url
    else:
        path = Path(path)
        if path.is_dir():
            if not (path / MANIFEST_NAME).is_file() and not (path / MANIFEST_NAME).is_symlink():
                raise BundleNotFound(f"{path}: no {MANIFEST_NAME} here (is this a bundle directory?)")
            source = _DirectorySource(path)
        elif path.is_file():
            if not _looks_like_tar(path):
                raise BundleNotFound(f"{path}: neither a bundle directory nor a bundle archive (.tar)")
            source = _ArchiveSource(path)
        else:
            raise BundleNotFound(f"{path}: no such bundle directory or archive")
    try:
        manifest = _read_manifest(source)
        try:
            _check_files(source, manifest, full)
        except BundleFileError as exc:
            if isinstance(source, _ArchiveSource):
                raise ArchiveError(f"archive {path.name} is truncated or incomplete: {exc}") from None
            raise
        return Bundle(path, manifest, source, checked=full)
    except BaseException:
        source.close()
        raise


def _remote_source(location: Any) -> Any:
    """The hook to pol.remote: a source for a URL string or a `pol.remote.Remote`, else None (a local path)."""
    from . import remote

    if isinstance(location, remote.Remote) or remote.is_url(location):
        return remote.open_remote_source(location)
    return None


def _looks_like_tar(path: Path) -> bool:
    """True if the file starts with a tar header (checksum valid), or is too short to tell (then it is an archive
    that is truncated, which the archive reader reports)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) < 512:
        return head[:1] not in (b"{", b"") and not head.startswith(b"PK")
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:
        return True  # an all-zero block: an empty (or emptied) archive
    except tarfile.HeaderError:
        return False
    return True


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
    tmp.write_text(canonical_json(manifest.to_dict()) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST_NAME)


def _param_copy(state: State) -> dict[str, torch.Tensor]:
    """The parameters of a state, copied (the caller may reuse its tensors): what the next update norm needs."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items() if k.startswith("param/")}


class BundleWriter:
    """Writes one bundle: checkpoints one by one, in step order, then the manifest. The one writer of bundles.

    `add` writes a checkpoint atomically and returns its record; `finish` computes the Merkle root and commitment
    and writes the manifest last, so a directory without a manifest is never mistaken for a bundle. A writer can
    start from the records and files of an interrupted run (`records`, `files`).
    """

    def __init__(self, directory: Path, spec: JobSpec, records: Sequence[Record] = (), files: Mapping[str, FileEntry] | None = None,
                 previous: State | None = None) -> None:
        """`previous`: the state of the last record given (to resume after it), for the next record's update norm."""
        self.directory = Path(directory)
        self.spec = spec
        self.records = list(records)
        self.files = dict(files or {})
        self._params = _param_copy(previous) if previous is not None else None  # the last checkpoint's parameters

    def add(self, step: int, state: State, data: Digest, loss: float | None, evaluation: Mapping[str, float] | None = None) -> Record:
        """Write the checkpoint at `step` and return its record. `state` is written as given (its `meta/step` too);
        `evaluation` is the state's metrics (pol.evaluate) when the spec names an evaluation."""
        assert step == self.spec.checkpoint_step(len(self.records)), f"checkpoint {step} out of order"
        assert self.records == [] or self._params is not None, "a resumed writer needs the last state (previous=)"
        per_tensor: dict[str, Digest] = {}
        self.files[checkpoint_name(step)] = write_checkpoint(self.directory, step, state, self.spec.job_id, per_tensor)
        update = compute_update_norm(self._params, state) if self.records else None
        record = Record(step, combine_digests(per_tensor), data, loss, None if evaluation is None else dict(evaluation), update)
        self._params = _param_copy(state)
        self.records.append(record)
        return record

    def finish(self, env: Mapping[str, str | int]) -> Manifest:
        """Write the manifest over the records added. `env` is information only, outside every digest."""
        assert len(self.records) == self.spec.n_records, "every checkpoint must be added before the manifest"
        merkle, commitment = compute_trace_commitment(self.spec.job_id, self.records)
        manifest = Manifest(self.spec, tuple(self.records), merkle, commitment, dict(self.files), dict(env))
        write_manifest(self.directory, manifest)
        return manifest


def write_bundle(
    directory: str | Path, spec: JobSpec, checkpoints: Iterable[tuple[Any, ...]], env: Mapping[str, str | int],
) -> Manifest:
    """Write a whole bundle from `(step, state, data digest, loss)` or `(step, state, data digest, loss, eval
    metrics)` per checkpoint, in step order (a generator keeps one state in memory at a time). Used by forgers and
    tools; the solver adds checkpoints as it trains."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writer = BundleWriter(directory, spec)
    for step, state, data, loss, *evaluation in checkpoints:
        writer.add(step, state, data, loss, evaluation[0] if evaluation else None)
    return writer.finish(env)


def pack_bundle(directory: str | Path, archive: str | Path) -> Path:
    """Write a validated bundle directory as one deterministic tar file (manifest first). Raises BundleError."""
    directory, archive = Path(directory), Path(archive)
    with open_bundle(directory) as bundle:
        names = [MANIFEST_NAME, *sorted(bundle.manifest.files)]
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in names:
            path = directory / name
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            with open(path, "rb") as f:
                tf.addfile(info, f)
    os.replace(tmp, archive)
    return archive
