"""Bundles read from a URL: fetch the manifest, then only the checkpoints a verifier reads, each checked against the
commitment by the bundle reader (`pol.bundle.Bundle.load_state`), within bounds of time and bytes.

    open_bundle("http://host:8000/")             a served bundle directory: URL/manifest.json, URL/checkpoints/...
    open_bundle("http://host:8000/run1.tar")     a served archive (the path ends in .tar), read by range requests
    open_bundle(Remote(url, cache_dir=..., limits=Limits(...), on_progress=...))   the same, with options

Any fsspec protocol works (http, https, file, memory; s3, gs and others once their fsspec package is installed).
HTTP(S) is fetched on fsspec's aiohttp session and event loop, but streamed here rather than through fsspec's file
objects, which read a range response's body whole: an endless body would fill memory. Every checkpoint request asks
for an exact byte range and the manifest's reads at most `max_manifest_bytes`; each reads at most that many bytes and
fails with a typed error if the server sends more, fewer (after resuming), or too slowly (`Limits`). No redirect is
followed. Connection errors and 5xx answers are retried with exponential backoff, resuming
from the byte reached. An archive is never downloaded whole: it must be in `pol pack`'s layout (the manifest first,
then the checkpoints in name order), so every member's offset follows from the manifest's file table, and each
member's tar header is fetched with its data and checked (name, size, type) before a byte of it is used.

The server is never trusted: the manifest is checked against its Merkle root and commitment when the bundle opens,
and each checkpoint against the manifest's blake3 when read, so a checkpoint that changed or was swapped after the
manifest was read is a DigestMismatch (a REJECT with evidence). An archive's ETag and length are pinned at the first
request; a later request that finds another is RemoteChanged.

Fetched checkpoints are cached by their committed blake3 (`cache_dir`; default `$POL_CACHE_DIR/blobs` or
`~/.cache/pol/blobs`): written to a temporary file in the cache directory and renamed to the digest only when the
bytes hash to it, so a verifier that reads a checkpoint twice (or verifies a bundle again) fetches it once; with a
cache, the first read of a checkpoint (its header too: `Bundle.read_layout`) fetches the whole file, in one request.
Bytes that fail their digest are not kept. Names in the cache come from digests, never from the server, and nothing
is written anywhere else. Without a cache (`cache_dir=None`) nothing is written at all and each read is a request.

Errors (pol.errors): RemoteError (unreachable, kept failing, protocol not installed), RemoteTimeout, RemoteProtocolError,
RemoteChanged, all "cannot verify" (exit 2); BundleNotFound (no manifest at the URL); BundleFileError (a checkpoint
the manifest lists is missing from the server: HTTP 404); ArchiveError (an archive not in pack's layout).
"""

from __future__ import annotations

import asyncio
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from .bundle import MANIFEST_NAME, MAX_MANIFEST_BYTES, _Source
from .canonical import Digest, is_digest, parse_json_strict
from .errors import (
    ArchiveError,
    BundleFileError,
    BundleNotFound,
    ManifestError,
    RemoteChanged,
    RemoteError,
    RemoteProtocolError,
    RemoteTimeout,
)

__all__ = ["Limits", "Remote", "RemoteSource", "default_cache_dir", "is_url", "open_remote_source"]

Progress = Callable[[str, int, int], None]  # (file name, bytes done, bytes total)
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_CHUNK = 1 << 20
WHOLE_ON_PART_READ = 1 << 20  # with a cache, a part read of a file this small fetches (and caches) it whole
_BLOCK = 512  # a tar block
_RECORD = 20 * _BLOCK  # tarfile pads an archive to a multiple of this
_EXTRAS = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on fetching one bundle. A request for n bytes must finish within `request_timeout + n / min_rate`
    seconds (a slow drip fails even if each byte comes in time), all requests together within `total_timeout`
    and `max_bytes`."""

    request_timeout: float = 30.0  # seconds: connecting, a stall between bytes, and the base of each request's deadline
    min_rate: float = 1 << 20  # bytes per second a request must keep up on average (1 MiB/s)
    total_timeout: float = 3600.0  # seconds for every request of one bundle together
    max_bytes: int = 1 << 42  # bytes fetched for one bundle, all requests together
    max_manifest_bytes: int = MAX_MANIFEST_BYTES
    retries: int = 4  # tries after the first, on connection errors, short bodies and 5xx answers
    backoff: float = 0.5  # seconds before the first retry, doubling each time


@dataclass(frozen=True, slots=True)
class Remote:
    """Where a bundle is published and how to fetch it: what `open_bundle` accepts besides a path or a URL string.
    `cache_dir=None` caches nothing (nothing is written to disk)."""

    url: str
    cache_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    on_progress: Progress | None = None


def is_url(value: object) -> bool:
    """True for a string that starts with a scheme (`http://`, `s3://`, `file://`, ...)."""
    return isinstance(value, str) and _URL.match(value) is not None


def default_cache_dir() -> Path:
    """`$POL_CACHE_DIR/blobs`, else `~/.cache/pol/blobs` (beside the exact kernels' libraries, pol.exact.build):
    read here, where a URL string is turned into a `Remote`."""
    env = os.environ.get("POL_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "pol") / "blobs"


def _join(base: str, name: str) -> str:
    return base if not name else base.rstrip("/") + "/" + name


class _Budget:
    """Time and bytes left for one bundle's requests."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.total_timeout
        self.fetched = 0  # bytes received, every request together
        self.requests = 0

    def request_deadline(self, length: int) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RemoteTimeout(f"fetching the bundle took longer than {self.limits.total_timeout:g} s in all")
        return min(left, self.limits.request_timeout + length / self.limits.min_rate)

    def add(self, n: int) -> None:
        self.fetched += n
        if self.fetched > self.limits.max_bytes:
            raise RemoteProtocolError(f"fetched more than {self.limits.max_bytes} bytes for one bundle")


class _Transient(Exception):
    """A failure worth retrying (connection lost, 5xx, a body that ended early), and the error it becomes when the
    retries run out: RemoteError (unreachable, kept failing) or RemoteProtocolError (the body kept ending early)."""

    def __init__(self, message: str, error: type[RemoteError] = RemoteError) -> None:
        super().__init__(message)
        self.error = error


class _NotFound(Exception):
    pass


class _HttpTransport:
    """HTTP(S) through fsspec's aiohttp session and loop, streamed with exact ranges and bounds."""

    def __init__(self, budget: _Budget) -> None:
        try:
            import aiohttp
            import fsspec
            from fsspec.asyn import sync
        except ImportError as exc:
            raise RemoteError(f"reading bundles over HTTP needs fsspec and aiohttp ({exc.name} is missing): "
                              "pip install 'pol[remote]'") from None
        self.aiohttp, self.sync, self.budget = aiohttp, sync, budget
        timeout = aiohttp.ClientTimeout(total=None, connect=budget.limits.request_timeout, sock_read=budget.limits.request_timeout)
        self.fs = fsspec.filesystem("http", skip_instance_cache=True,
                                    client_kwargs={"auto_decompress": False, "timeout": timeout})
        self.session = sync(self.fs.loop, self.fs.set_session)
        self.pinned: dict[str, tuple[str | None, int]] = {}  # url -> (ETag, total length), for pinned resources
        self.totals: dict[str, int] = {}  # url -> total length, from the first answer
        self.etags: dict[str, str | None] = {}  # url -> ETag, from the first answer

    def close(self) -> None:
        self.sync(self.fs.loop, self.session.close)

    def fetch(self, url: str, start: int, length: int, sink: Callable[[bytes], None], *, upto: bool = False) -> None:
        self.sync(self.fs.loop, self._fetch, url, start, length, sink, upto)

    async def _fetch(self, url: str, start: int, length: int, sink: Callable[[bytes], None], upto: bool) -> None:
        try:
            async with asyncio.timeout(self.budget.request_deadline(length)):
                await self._get(url, start, length, sink, upto)
        except TimeoutError:
            raise RemoteTimeout(f"{url}: the server did not send {length} bytes in time "
                                f"(at least {self.budget.limits.min_rate:g} bytes/s after {self.budget.limits.request_timeout:g} s)") from None
        except self.aiohttp.ClientPayloadError as exc:  # the body broke off
            raise _Transient(f"{type(exc).__name__}: {exc}", RemoteProtocolError) from None
        except self.aiohttp.ClientConnectionError as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None

    async def _get(self, url: str, start: int, length: int, sink: Callable[[bytes], None], upto: bool) -> None:
        headers = {"Accept-Encoding": "identity"}
        if not upto:
            headers["Range"] = f"bytes={start}-{start + length - 1}"
        pinned = self.pinned.get(url)
        if pinned and pinned[0]:
            headers["If-Match"] = pinned[0]
        self.budget.requests += 1
        async with self.session.get(url, headers=headers, allow_redirects=False) as r:
            self._check_status(url, r.status)
            total = self._check_headers(url, r, start, length, upto)
            if upto and int(r.headers.get("Content-Length", 0)) > length:
                raise _TooLong()
            self.totals.setdefault(url, total)
            self.etags.setdefault(url, r.headers.get("ETag") or None)
            got = 0
            while got < length:
                chunk = await r.content.read(min(_CHUNK, length - got))
                if not chunk:
                    break
                self.budget.add(len(chunk))
                got += len(chunk)
                sink(chunk)
            if upto:
                if got == length and await r.content.read(1):
                    raise _TooLong()
                return
            if got < length:
                raise _Transient(f"the body ended after {got} of {length} bytes", RemoteProtocolError)
            if r.status == 206 and await r.content.read(1):
                raise RemoteProtocolError(f"{url}: the server sent more bytes than the {length} asked for")

    def _check_status(self, url: str, status: int) -> None:
        if status in (404, 410):
            raise _NotFound(url)
        if status == 412:
            raise RemoteChanged(f"{url} changed while the bundle was being read (its ETag is not the one first read)")
        if status >= 500 or status == 429:
            raise _Transient(f"HTTP {status}")
        if 300 <= status < 400:  # a stranger's URL must not steer the verifier to other hosts (internal ones included)
            raise RemoteError(f"{url}: HTTP {status}, a redirect: not followed (verify the URL the bundle is published at)")
        if status not in (200, 206):
            raise RemoteError(f"{url}: HTTP {status}")

    def _check_headers(self, url: str, r: Any, start: int, length: int, upto: bool) -> int:
        """The resource's total length, after checking the answer is the range asked for. Raises RemoteProtocolError
        or RemoteChanged."""
        declared = r.headers.get("Content-Length")
        if r.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise RemoteProtocolError(f"{url}: the server sent an encoded body ({r.headers['Content-Encoding'][:40]}) "
                                      "where the bytes themselves were asked for")
        if r.status == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", r.headers.get("Content-Range", ""))
            if m is None or int(m[1]) != start or int(m[2]) != start + length - 1:
                raise RemoteProtocolError(f"{url}: the server answered another range than bytes {start}-{start + length - 1}")
            if declared is not None and int(declared) != length:
                raise RemoteProtocolError(f"{url}: the server declares {declared} bytes for a range of {length}")
            total = -1 if m[3] == "*" else int(m[3])
        elif start != 0:
            raise RemoteProtocolError(f"{url}: the server ignored the range request (HTTP 200 for bytes from {start})")
        else:
            total = -1 if declared is None else int(declared)
        pinned = self.pinned.get(url)
        if pinned is not None and ((r.headers.get("ETag") or None) != pinned[0] or total != pinned[1]):
            raise RemoteChanged(f"{url} changed while the bundle was being read (ETag or length differs from the first answer)")
        return total

    def pin(self, url: str, etag: str | None, total: int) -> None:
        self.pinned[url] = (etag, total)


class _TooLong(Exception):
    pass


class _FsspecTransport:
    """Any other fsspec protocol (file, memory, s3, gs, ...): seek and read in bounded chunks."""

    def __init__(self, url: str, budget: _Budget) -> None:
        try:
            import fsspec
        except ImportError:
            raise RemoteError("reading bundles from URLs needs fsspec: pip install 'pol[remote]'") from None
        protocol = url.split("://", 1)[0]
        try:
            self.fs = fsspec.filesystem(protocol)
        except (ImportError, ValueError) as exc:
            extra = _EXTRAS.get(protocol)
            hint = f"pip install {extra}" if extra else "install the fsspec implementation for it"
            raise RemoteError(f"cannot read {protocol}:// URLs here ({exc}): {hint}") from None
        self.budget = budget
        self.totals: dict[str, int] = {}

    def close(self) -> None:
        return None

    def fetch(self, url: str, start: int, length: int, sink: Callable[[bytes], None], *, upto: bool = False) -> None:
        self.budget.requests += 1
        deadline = time.monotonic() + self.budget.request_deadline(length)
        try:
            if url not in self.totals:
                self.totals[url] = self.fs.size(url)
            with self.fs.open(url, "rb") as f:
                f.seek(start)
                got = 0
                while got < length:
                    chunk = f.read(min(_CHUNK, length - got))
                    if not chunk:
                        break
                    self.budget.add(len(chunk))
                    got, _ = got + len(chunk), sink(chunk)
                    if time.monotonic() > deadline:
                        raise RemoteTimeout(f"{url}: reading {length} bytes took too long")
                if upto and got == length and f.read(1):
                    raise _TooLong()
        except FileNotFoundError:
            raise _NotFound(url) from None
        if not upto and got < length:
            raise RemoteProtocolError(f"{url}: short read, {got} of {length} bytes")

    def pin(self, url: str, etag: str | None, total: int) -> None:
        return None


Transport = _HttpTransport | _FsspecTransport


def _retrying(budget: _Budget, what: str, attempt: Callable[[], None]) -> None:
    """Run `attempt()` until it succeeds, retrying transient failures with exponential backoff (an attempt resumes
    from where the last one stopped)."""
    limits = budget.limits
    for n in range(limits.retries + 1):
        try:
            attempt()
            return
        except _Transient as exc:
            if n == limits.retries:
                raise exc.error(f"{what}: failed after {n + 1} tries (last: {exc})") from None
            pause = limits.backoff * 2**n
            if time.monotonic() + pause > budget.deadline:
                raise RemoteTimeout(f"{what}: no time left to retry (last: {exc})") from None
            time.sleep(pause)


class RemoteSource(_Source):
    """A bundle at a URL, as `pol.bundle` reads it. Sizes come from the manifest's file table (a remote directory
    has no listing); each read is a bounded, resumable fetch of exactly the bytes asked for, or a cache hit.
    `fetched` counts the bytes received over the network, `requests` the requests made."""

    def __init__(self, remote: Remote) -> None:
        self.remote, self.url = remote, remote.url
        self.budget = _Budget(remote.limits)
        self.archive = remote.url.split("?", 1)[0].rstrip("/").endswith(".tar")
        self.transport: Transport = (_HttpTransport(self.budget) if remote.url.startswith(("http://", "https://"))
                                     else _FsspecTransport(remote.url, self.budget))
        self.offsets: dict[str, int] = {}  # archive: name -> offset of the member's data
        self._headers_checked: set[str] = set()
        self._cache_checked: set[str] = set()  # cache entries hashed once by this source: later reads seek into them
        try:
            self._manifest = self._open_archive() if self.archive else self._fetch_upto(MANIFEST_NAME)
            self.sizes, self.digests = _file_table(self._manifest)
            if self.archive:
                self._index(len(self._manifest))
        except BaseException:
            self.transport.close()
            raise

    @property
    def fetched(self) -> int:
        return self.budget.fetched

    @property
    def requests(self) -> int:
        return self.budget.requests

    def close(self) -> None:
        self.transport.close()

    # -- reading -----------------------------------------------------------------------------------------------

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        if name == MANIFEST_NAME:
            return self._manifest[start:None if length is None else start + length]
        size = self.sizes[name]  # the reader asks only for files the checked manifest lists, within their sizes
        length = size - start if length is None else length
        assert 0 <= start and 0 <= length and start + length <= size, f"{name}: bytes {start}+{length} outside {size}"
        cached = self._cached(name, start, length)
        if cached is not None:
            data = cached
        elif (start == 0 and length == size) or (self.remote.cache_dir is not None and size <= WHOLE_ON_PART_READ):
            data = self._download(name)[start:start + length]  # caching a small file: its header read fetches it whole
        else:  # a part (a header) of a large file is fetched alone: the verifier checks a checkpoint's header against
            # the spec (and so its size, `Bundle.read_layout`) before it fetches the whole file
            buf = bytearray()
            self._fetch_range(name, start, length, buf.extend)
            data = bytes(buf)
        self._count(name, len(data))
        return data

    def digest(self, name: str) -> Digest:
        """blake3 of a whole checkpoint, fetched (and cached) as `read` does."""
        return blake3.blake3(self.read(name), max_threads=blake3.blake3.AUTO).hexdigest()

    def _fetch_upto(self, name: str) -> bytes:
        """A whole small file of unknown size (the manifest), at most `max_manifest_bytes`."""
        cap = self.remote.limits.max_manifest_bytes
        buf = bytearray()

        def attempt() -> None:
            buf.clear()
            try:
                self.transport.fetch(_join(self.url, name), 0, cap, buf.extend, upto=True)
            except _NotFound:
                raise BundleNotFound(f"{self.url}: no {MANIFEST_NAME} there (is this a served bundle directory?)") from None
            except _TooLong:
                raise ManifestError("manifest", f"larger than {cap} bytes") from None

        _retrying(self.budget, _join(self.url, name), attempt)
        return bytes(buf)

    def _fetch_range(self, name: str, start: int, length: int, sink: Callable[[bytes], None]) -> None:
        """Exactly bytes [start, start + length) of a bundle file, resuming after a dropped connection from the byte
        reached. An archive member read for the first time comes with its header block (and the member's bytes
        before `start`) in the same request, and the header is checked before the read returns."""
        if self.archive:
            url = self.url
            prefix = 0 if name in self._headers_checked else _BLOCK + start
            offset = self.offsets[name] + start - prefix
        else:
            url, prefix, offset = _join(self.url, name), 0, start
        head = bytearray()
        done = 0

        def take(chunk: bytes) -> None:
            nonlocal done
            done += len(chunk)
            need = prefix - len(head)
            if need > 0:
                head.extend(chunk[:need])
                chunk = chunk[need:]
            if chunk:
                sink(chunk)

        def attempt() -> None:
            try:
                self.transport.fetch(url, offset + done, prefix + length - done, take)
            except _NotFound:
                if self.archive:
                    raise RemoteChanged(f"{url} is gone (not found) while the bundle was being read") from None
                raise BundleFileError(name, "missing from the server (not found)") from None

        _retrying(self.budget, f"{url} ({name})" if self.archive else url, attempt)
        if prefix:
            self._check_member(name, bytes(head[:_BLOCK]))

    def _download(self, name: str) -> bytes:
        """A whole checkpoint, into memory and (when caching) into the cache under its digest once it checks."""
        size, expected = self.sizes[name], self.digests[name]
        buf, hasher = bytearray(), blake3.blake3()
        on_progress = self.remote.on_progress
        tmp = None
        cache = self.remote.cache_dir
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.NamedTemporaryFile(dir=cache, prefix=".part-", delete=False)

        def sink(chunk: bytes) -> None:
            buf.extend(chunk)
            hasher.update(chunk)
            if tmp is not None:
                tmp.write(chunk)
            if on_progress is not None:
                on_progress(name, len(buf), size)

        try:
            self._fetch_range(name, 0, size, sink)
            if tmp is not None:
                tmp.close()
                if hasher.hexdigest() == expected:  # else: the reader raises DigestMismatch on these bytes
                    os.replace(tmp.name, cache / expected)  # type: ignore[operator]
        finally:
            if tmp is not None:
                tmp.close()
                if os.path.exists(tmp.name):
                    os.unlink(tmp.name)
        return bytes(buf)

    def _cached(self, name: str, start: int, length: int) -> bytes | None:
        """Bytes of a checkpoint from the cache, if there and hashing to its digest (checked at the first read by
        this source; an entry that does not is dropped)."""
        cache = self.remote.cache_dir
        if cache is None:
            return None
        path = cache / self.digests[name]
        try:
            if name in self._cache_checked:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(length)
                return data if len(data) == length else None
            data = path.read_bytes()
        except OSError:
            return None
        if len(data) == self.sizes[name] and blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest() == self.digests[name]:
            self._cache_checked.add(name)
            return data[start:start + length]
        path.unlink(missing_ok=True)
        return None

    # -- archives ----------------------------------------------------------------------------------------------

    def _open_archive(self) -> bytes:
        """The manifest of an archive in `pol pack`'s layout: the first member. Pins the archive's ETag and length."""
        head = bytearray()

        def attempt() -> None:
            head.clear()
            try:
                self.transport.fetch(self.url, 0, _BLOCK, head.extend)
            except _NotFound:
                raise BundleNotFound(f"{self.url}: no such archive on the server") from None

        _retrying(self.budget, self.url, attempt)
        self.total = self.transport.totals.get(self.url, -1)
        if self.total < 0:
            raise RemoteProtocolError(f"{self.url}: the server does not say how long the archive is")
        self.transport.pin(self.url, getattr(self.transport, "etags", {}).get(self.url), self.total)
        info = _member(bytes(head), self.url)
        if info.name != MANIFEST_NAME:
            raise ArchiveError(f"{self.url}: the first member is {info.name[:80]!r}, not {MANIFEST_NAME} "
                               "(serve an archive written by pol pack, or the bundle directory)")
        if info.size > self.remote.limits.max_manifest_bytes:
            raise ManifestError("manifest", f"larger than {self.remote.limits.max_manifest_bytes} bytes")
        self.offsets[MANIFEST_NAME] = _BLOCK
        buf = bytearray()

        def attempt2() -> None:
            buf.clear()
            try:
                self.transport.fetch(self.url, _BLOCK, info.size, buf.extend)
            except _NotFound:
                raise RemoteChanged(f"{self.url} is gone while the bundle was being read") from None

        if info.size:
            _retrying(self.budget, self.url, attempt2)
        return bytes(buf)

    def _index(self, manifest_size: int) -> None:
        """Each checkpoint's data offset in pack's layout, and a check that the archive's length agrees."""
        offset = _BLOCK + _padded(manifest_size)
        for name in sorted(self.sizes):
            if name == MANIFEST_NAME:
                continue
            self.offsets[name] = offset + _BLOCK
            offset += _BLOCK + _padded(self.sizes[name])
        end = offset + 2 * _BLOCK
        if not end <= self.total <= max(end, _padded(end, _RECORD)):
            raise ArchiveError(f"{self.url}: {self.total} bytes long, not the {end} (padded to {_RECORD}) that pack's "
                               "layout of this manifest's files would take")
        self.sizes[MANIFEST_NAME] = manifest_size

    def _check_member(self, name: str, block: bytes) -> None:
        info = _member(block, self.url)
        if info.name != name or info.size != self.sizes[name]:
            raise ArchiveError(f"{self.url}: the member at {name}'s place is {info.name[:80]!r} of {info.size} bytes, "
                               f"not {name} of {self.sizes[name]} (not pol pack's layout)")
        self._headers_checked.add(name)


def _padded(n: int, block: int = _BLOCK) -> int:
    return -(-n // block) * block


def _member(block: bytes, url: str) -> tarfile.TarInfo:
    """One tar header block of a regular file. Raises ArchiveError."""
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise ArchiveError(f"{url}: not a tar header where one should be ({exc})") from None
    if not info.isreg() or info.issparse():
        raise ArchiveError(f"{url}: member {info.name[:80]!r} is not a regular file (pol pack's layout has no "
                           "extended headers, links or sparse files)")
    return info


def _file_table(manifest: bytes) -> tuple[dict[str, int], dict[str, Digest]]:
    """Sizes and digests of the checkpoints the manifest lists, read before the manifest is checked in full (which
    `open_bundle` does next): entries that are not well formed are left out here and refused there."""
    sizes: dict[str, int] = {MANIFEST_NAME: len(manifest)}
    digests: dict[str, Digest] = {}
    try:
        files = parse_json_strict(manifest).get("files")
    except (ValueError, AttributeError):
        return sizes, digests  # refused by the manifest check with its own message
    if isinstance(files, dict):
        for name, entry in files.items():
            ok = isinstance(entry, dict) and type(entry.get("size")) is int and is_digest(entry.get("blake3"))
            if ok and re.fullmatch(r"checkpoints/step-\d{9}\.safetensors", name) and entry["size"] >= 0:
                sizes[name], digests[name] = entry["size"], entry["blake3"]
    return sizes, digests


def open_remote_source(location: str | Remote) -> RemoteSource:
    """The source of a bundle at a URL (a string gets the default cache and limits). Raises RemoteError and its
    subclasses, BundleNotFound, ManifestError, ArchiveError."""
    remote = location if isinstance(location, Remote) else Remote(location, cache_dir=default_cache_dir())
    return RemoteSource(remote)
