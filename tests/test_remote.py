"""Bad remote input: a hostile server on loopback (wrong bytes, short reads, a bundle that changes between requests,
a slow drip, an endless body, failures and dropped connections) yields a typed error or a REJECT with evidence,
within its bounds of time and memory, and nothing is written outside the cache (nothing at all of bad bytes)."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fsspec")
web = pytest.importorskip("aiohttp.web")

from pol.bundle import MANIFEST_NAME, checkpoint_name, open_bundle, pack_bundle  # noqa: E402
from pol.errors import (  # noqa: E402
    ArchiveError,
    BundleNotFound,
    ManifestError,
    RemoteChanged,
    RemoteError,
    RemoteProtocolError,
    RemoteTimeout,
)
from pol.prove import train_and_prove  # noqa: E402
from pol.remote import Limits, Remote, is_url  # noqa: E402
from pol.serve import serve_in_thread  # noqa: E402
from pol.verify import verify  # noqa: E402
from tests.conftest import tiny_spec  # noqa: E402

FAST = Limits(request_timeout=2.0, retries=2, backoff=0.01, total_timeout=20.0)
LAST = checkpoint_name(12)  # the tiny bundle's final checkpoint: segment 3 ends there


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote")
    honest = train_and_prove(tiny_spec("mlp"), root / "honest").path
    other = train_and_prove(tiny_spec("mlp", seed=1), root / "other").path
    return {"honest": honest, "other": other, "archive": pack_bundle(honest, root / "honest.tar")}


Behaviour = Callable[[Any, str, bytes, int, int], Any]  # (request, name, file bytes, start, end) -> response or None


def hostile(files: Callable[[str], bytes | None], behave: Behaviour | None = None, log: list | None = None) -> Any:
    """A small HTTP server over `files(name)`: honest range answers, unless `behave` returns its own response."""

    async def handle(request: Any) -> Any:
        name = request.path.lstrip("/")
        data = files(name)
        if log is not None:
            log.append((name, request.headers.get("Range")))
        if data is None:
            raise web.HTTPNotFound()
        start, end = 0, len(data) - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
        if m:
            start, end = int(m[1]), min(int(m[2]), len(data) - 1)
        if behave is not None:
            response = await behave(request, name, data, start, end)
            if response is not None:
                return response
        if not m:
            return web.Response(body=data)
        return web.Response(status=206, body=data[start:end + 1],
                            headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    return app


def directory_files(bundle: Path) -> Callable[[str], bytes | None]:
    def files(name: str) -> bytes | None:
        path = bundle / name
        return path.read_bytes() if name and path.is_file() else None

    return files


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_wrong_bytes_for_a_checkpoint_are_a_reject_naming_the_file_and_nothing_is_cached(bundles, tmp_path):
    honest = directory_files(bundles["honest"])

    def files(name: str) -> bytes | None:
        data = honest(name)
        if name == LAST and data is not None:
            return data[:-1] + bytes([data[-1] ^ 1])  # same length, one bit flipped
        return data

    cache = tmp_path / "cache"
    with serve_in_thread(hostile(files)) as server:
        report = verify(Remote(server.url, cache_dir=cache, limits=FAST), segments=[3], seed=0)
    assert report.verdict == "reject"
    assert "digest mismatch" in report.reason and LAST in report.reason
    with open_bundle(bundles["honest"], full=False) as b:
        good = b.manifest.files
    assert all(len(n) == 64 and n in {e.blake3 for e in good.values()} for n in _leftovers(cache))
    assert good[LAST].blake3 not in _leftovers(cache)  # the bad bytes were not kept, no temporary file is left


def test_a_bundle_that_changes_after_its_manifest_was_read_is_a_reject(bundles):
    """The server swaps the whole bundle (manifest and checkpoints) after the first request: every checkpoint is
    checked against the manifest first read, so the swap is a DigestMismatch, not a silent switch."""
    first, then = directory_files(bundles["honest"]), directory_files(bundles["other"])
    served: list[str] = []

    def files(name: str) -> bytes | None:
        served.append(name)
        return (first if len(served) == 1 else then)(name)

    with serve_in_thread(hostile(files)) as server:
        report = verify(Remote(server.url, cache_dir=None, limits=FAST), segments=[1], seed=0)
    assert served[0] == MANIFEST_NAME and len(served) > 1
    assert report.verdict == "reject" and "digest mismatch" in report.reason and "checkpoints/step-" in report.reason


def test_an_archive_that_changes_while_read_is_remote_changed(bundles, tmp_path):
    archive = tmp_path / "run.tar"
    shutil.copy(bundles["archive"], archive)
    with serve_in_thread(archive) as server:
        with open_bundle(Remote(server.url, cache_dir=None, limits=FAST), full=False) as b:
            os.utime(archive, ns=(1, 1))  # same bytes, another version: its ETag changes
            with pytest.raises(RemoteChanged):
                b.load_state(4)
        assert any(r.status == 412 for r in server.requests)  # If-Match pinned the first version


def test_a_short_body_is_a_protocol_error(bundles):
    async def short(request: Any, name: str, data: bytes, start: int, end: int) -> Any:
        if name.startswith("checkpoints/"):
            body = data[start:end + 1]
            return web.Response(status=206, body=body[: len(body) // 2],
                                headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})
        return None

    with serve_in_thread(hostile(directory_files(bundles["honest"]), short)) as server:
        with pytest.raises(RemoteProtocolError, match="declares"):
            verify(Remote(server.url, cache_dir=None, limits=FAST), segments=[1], seed=0)


async def _cut(request: Any, data: bytes, start: int, end: int, keep: int) -> Any:
    """Announce the whole range, send `keep` bytes of it, and drop the connection."""
    response = web.StreamResponse(status=206, headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})
    response.content_length = end - start + 1
    await response.prepare(request)
    await response.write(data[start:start + keep])
    request.transport.close()
    return response


def test_a_body_that_always_breaks_off_is_resumed_then_a_typed_error(bundles):
    async def halve(request: Any, name: str, data: bytes, start: int, end: int) -> Any:
        if name.startswith("checkpoints/"):
            return await _cut(request, data, start, end, (end - start + 1) // 2)
        return None

    log: list = []
    started = time.monotonic()
    with serve_in_thread(hostile(directory_files(bundles["honest"]), halve, log)) as server:
        with pytest.raises(RemoteProtocolError, match="failed after 3 tries"):
            verify(Remote(server.url, cache_dir=None, limits=FAST), segments=[1], seed=0)
    assert time.monotonic() - started < 10
    ranges = [r for n, r in log if n.startswith("checkpoints/")]
    assert len(ranges) == 3 and len(set(ranges)) == 3  # each retry asked only for what was still missing


def test_a_dropped_connection_is_resumed_from_the_byte_reached(bundles, tmp_path):
    dropped: list[str] = []

    async def drop_once(request: Any, name: str, data: bytes, start: int, end: int) -> Any:
        if name == LAST and not dropped and end - start > 10_000:  # the whole file (its header was read alone first)
            dropped.append(name)
            return await _cut(request, data, start, end, 10_000)  # the connection dies mid-body
        return None

    log: list = []
    with serve_in_thread(hostile(directory_files(bundles["honest"]), drop_once, log)) as server:
        report = verify(Remote(server.url, cache_dir=tmp_path / "c", limits=FAST), segments=[3], seed=0)
    assert report.verdict == "accept", report.reason
    size = (bundles["honest"] / LAST).stat().st_size
    assert [r for n, r in log if n == LAST][-2:] == [f"bytes=0-{size - 1}", f"bytes=10000-{size - 1}"]


def test_a_server_error_is_retried_with_backoff(bundles):
    failures: list[str] = []

    async def fail_twice(request: Any, name: str, data: bytes, start: int, end: int) -> Any:
        if len(failures) < 2:
            failures.append(name)
            return web.Response(status=503)
        return None

    with serve_in_thread(hostile(directory_files(bundles["honest"]), fail_twice)) as server:
        report = verify(Remote(server.url, cache_dir=None, limits=FAST), segments=[1], seed=0)
    assert report.verdict == "accept" and failures == [MANIFEST_NAME, MANIFEST_NAME]


def test_a_slow_drip_is_a_timeout_within_its_bound(bundles):
    async def drip(request: Any, name: str, data: bytes, start: int, end: int) -> Any:
        if not name.startswith("checkpoints/"):
            return None
        response = web.StreamResponse(status=206, headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})
        response.content_length = end - start + 1
        await response.prepare(request)
        for i in range(start, end + 1):  # a byte every 50 ms: never a stall long enough for a socket timeout
            await response.write(data[i:i + 1])
            await __import__("asyncio").sleep(0.05)
        return response

    limits = Limits(request_timeout=0.5, min_rate=1e9, retries=1, backoff=0.01)
    started = time.monotonic()
    with serve_in_thread(hostile(directory_files(bundles["honest"]), drip)) as server:
        with pytest.raises(RemoteTimeout):
            verify(Remote(server.url, cache_dir=None, limits=limits), segments=[1], seed=0)
        elapsed = time.monotonic() - started
    assert elapsed < 3.0


@pytest.mark.parametrize("what", ["checkpoint", "manifest"])
def test_an_endless_body_is_an_error_not_a_full_memory(bundles, what):
    async def endless(request: Any, name: str, data: bytes, start: int, end: int) -> Any:
        if (what == "manifest") != (name == MANIFEST_NAME):
            return None
        headers = {"Content-Range": f"bytes {start}-{end}/{len(data)}"} if what == "checkpoint" else {}
        response = web.StreamResponse(status=206 if what == "checkpoint" else 200, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        block = data[start:end + 1] if what == "checkpoint" else b" " * 65536
        try:
            for _ in range(10_000):  # 600 MB if read to the end: the client stops long before
                await response.write(block)
        except (ConnectionError, RuntimeError):
            pass
        return response

    limits = Limits(request_timeout=2.0, retries=0, max_manifest_bytes=1 << 20)
    started = time.monotonic()
    with serve_in_thread(hostile(directory_files(bundles["honest"]), endless)) as server:
        remote = Remote(server.url, cache_dir=None, limits=limits)
        if what == "checkpoint":
            with pytest.raises(RemoteProtocolError, match="more bytes than"):
                verify(remote, segments=[1], seed=0)
        else:  # an oversized manifest is malformed, as it is on disk: a REJECT from verify
            with pytest.raises(ManifestError, match="larger than"):
                open_bundle(remote)
            report = verify(remote, segments=[1], seed=0)
            assert report.verdict == "reject" and "larger than" in report.reason
    assert time.monotonic() - started < 10


def test_more_bytes_declared_than_asked_or_another_range_are_protocol_errors(bundles):
    async def lie(request: Any, name: str, data: bytes, start: int, end: int) -> Any:
        if not name.startswith("checkpoints/"):
            return None
        if request.headers["Range"].startswith("bytes=0-7"):  # another range than asked
            return web.Response(status=206, body=data[1:9], headers={"Content-Range": f"bytes 1-8/{len(data)}"})
        return web.Response(status=200, body=data)  # a range from byte 8 answered with the whole file

    with serve_in_thread(hostile(directory_files(bundles["honest"]), lie)) as server:
        with open_bundle(Remote(server.url, cache_dir=None, limits=FAST), full=False) as b:
            with pytest.raises(RemoteProtocolError, match="another range"):
                b.read_layout(4)
            with pytest.raises(RemoteProtocolError, match="ignored the range"):
                b._source.read(checkpoint_name(4), 8, 16)


def test_missing_manifest_missing_checkpoint_and_http_errors(bundles, tmp_path):
    honest = directory_files(bundles["honest"])
    with serve_in_thread(hostile(lambda name: None)) as server:
        with pytest.raises(BundleNotFound):
            open_bundle(Remote(server.url, cache_dir=None, limits=FAST))
    with serve_in_thread(hostile(lambda name: None if name == LAST else honest(name))) as server:
        report = verify(Remote(server.url, cache_dir=None, limits=FAST), segments=[3], seed=0)
    assert report.verdict == "reject" and LAST in report.reason and "missing from the server" in report.reason

    async def gzipped(request: Any, *args: Any) -> Any:
        return web.Response(body=b"\x1f\x8b...", headers={"Content-Encoding": "gzip"})

    with serve_in_thread(hostile(honest, gzipped)) as server:
        with pytest.raises(RemoteProtocolError, match="encoded body"):
            open_bundle(Remote(server.url, cache_dir=None, limits=FAST))

    async def forbidden(request: Any, *args: Any) -> Any:
        return web.Response(status=403)

    with serve_in_thread(hostile(honest, forbidden)) as server:
        with pytest.raises(RemoteError, match="HTTP 403"):
            open_bundle(Remote(server.url, cache_dir=None, limits=FAST))


def test_byte_and_time_caps_for_the_whole_bundle(bundles):
    with serve_in_thread(bundles["honest"]) as server:
        with open_bundle(Remote(server.url, cache_dir=None, limits=Limits(max_bytes=5000)), full=False) as b:
            with pytest.raises(RemoteProtocolError, match="more than 5000 bytes"):
                b.load_state(4)
        with open_bundle(Remote(server.url, cache_dir=None, limits=Limits(total_timeout=0.3)), full=False) as b:
            time.sleep(0.4)
            with pytest.raises(RemoteTimeout, match="longer than"):
                b.load_state(4)


def test_a_corrupt_cache_entry_is_dropped_and_fetched_again(bundles, tmp_path):
    cache = tmp_path / "cache"
    with serve_in_thread(bundles["honest"]) as server:
        with open_bundle(Remote(server.url, cache_dir=cache), full=False) as b:
            b.load_state(4)
            digest = b.manifest.files[checkpoint_name(4)].blake3
        (cache / digest).write_bytes(b"not the checkpoint")
        before = len(server.requests)
        with open_bundle(Remote(server.url, cache_dir=cache), full=False) as b:
            b.load_state(4)
        assert len(server.requests) == before + 2  # the manifest, and the checkpoint again
    assert (cache / digest).read_bytes() == (bundles["honest"] / checkpoint_name(4)).read_bytes()


def test_an_archive_not_in_pack_layout_is_refused(bundles, tmp_path):
    odd = tmp_path / "odd.tar"
    with tarfile.open(odd, "w", format=tarfile.GNU_FORMAT) as tf:  # checkpoints first, manifest last
        for name in [checkpoint_name(s) for s in (0, 4, 8, 12)] + [MANIFEST_NAME]:
            tf.add(bundles["honest"] / name, arcname=name)
    with serve_in_thread(odd) as server:
        with pytest.raises(ArchiveError, match="first member"):
            open_bundle(Remote(server.url, cache_dir=None, limits=FAST))


def test_fsspec_protocols_file_and_memory_and_a_missing_one(bundles, tmp_path):
    import fsspec

    report = verify(Remote(bundles["honest"].as_uri(), cache_dir=None), segments=[2], seed=0)
    assert report.verdict == "accept"
    assert verify(Remote(bundles["archive"].as_uri(), cache_dir=None), segments=[2], seed=0).verdict == "accept"
    memory = fsspec.filesystem("memory")
    for path in sorted(bundles["honest"].rglob("*")):
        if path.is_file():
            memory.pipe(f"/pol-test/{path.relative_to(bundles['honest']).as_posix()}", path.read_bytes())
    assert verify(Remote("memory://pol-test", cache_dir=None), segments=[2], seed=0).verdict == "accept"
    with pytest.raises(RemoteError, match="nosuchproto"):
        open_bundle("nosuchproto://bucket/run")
    assert is_url("s3://bucket/run") and not is_url(str(tmp_path)) and not is_url("C:/run")


def test_a_url_string_uses_the_default_cache_dir(bundles, tmp_path, monkeypatch):
    monkeypatch.setenv("POL_CACHE_DIR", str(tmp_path / "default"))
    with serve_in_thread(bundles["honest"]) as server:
        with open_bundle(server.url, full=False) as b:
            b.load_state(4)
    assert [p.name for p in (tmp_path / "default" / "blobs").iterdir()] == [b.manifest.files[checkpoint_name(4)].blake3]


def test_an_archive_whose_headers_lie_or_that_vanishes_or_shrinks(bundles, tmp_path):
    swapped = tmp_path / "swapped.tar"  # pack's layout, but the member at step 4's place is named step 8
    with tarfile.open(swapped, "w", format=tarfile.GNU_FORMAT) as tf:
        for name in [MANIFEST_NAME, *[checkpoint_name(s) for s in (0, 4, 8, 12)]]:
            arcname = {checkpoint_name(4): checkpoint_name(8), checkpoint_name(8): checkpoint_name(4)}.get(name, name)
            info = tarfile.TarInfo(arcname)
            info.size, info.mtime, info.mode = (bundles["honest"] / name).stat().st_size, 0, 0o644
            with open(bundles["honest"] / name, "rb") as f:
                tf.addfile(info, f)
    with serve_in_thread(swapped) as server:
        with open_bundle(Remote(server.url, cache_dir=None, limits=FAST), full=False) as b:
            with pytest.raises(ArchiveError, match="not pol pack's layout"):
                b.read_layout(4)
    short = bundles["archive"].read_bytes()[:-20000]
    with serve_in_thread(hostile(lambda name: short if name == "short.tar" else None)) as server:
        with pytest.raises(ArchiveError, match="bytes long"):
            open_bundle(Remote(server.url + "short.tar", cache_dir=None, limits=FAST))
    gone = tmp_path / "gone.tar"
    shutil.copy(bundles["archive"], gone)
    with serve_in_thread(gone) as server:
        with open_bundle(Remote(server.url, cache_dir=None, limits=FAST), full=False) as b:
            gone.unlink()
            with pytest.raises(RemoteChanged, match="gone"):
                b.load_state(4)
        with pytest.raises(BundleNotFound):
            open_bundle(Remote(server.url.replace("gone.tar", "other.tar"), cache_dir=None, limits=FAST))
    data, answers = bundles["archive"].read_bytes(), []

    def vanishing(name: str) -> bytes | None:  # gone right after the first request (the manifest's header)
        answers.append(name)
        return data if name == "v.tar" and len(answers) == 1 else None

    with serve_in_thread(hostile(vanishing)) as server:
        with pytest.raises(RemoteChanged, match="gone"):
            open_bundle(Remote(server.url + "v.tar", cache_dir=None, limits=FAST))
    notar = tmp_path / "notar.tar"
    notar.write_bytes(b"x" * 2048)
    with serve_in_thread(hostile(lambda name: notar.read_bytes() if name == "notar.tar" else None)) as server:
        with pytest.raises(ArchiveError, match="not a tar header"):
            open_bundle(Remote(server.url + "notar.tar", cache_dir=None, limits=FAST))


def test_an_archive_whose_etag_or_length_changes_without_if_match_support(bundles):
    data = bundles["archive"].read_bytes()
    answers: list[int] = []

    async def versions(request: Any, name: str, body: bytes, start: int, end: int) -> Any:
        answers.append(start)
        total = "*" if request.headers.get("X-Star") else len(body)
        return web.Response(status=206, body=body[start:end + 1], headers={  # ignores If-Match, changes its ETag
            "Content-Range": f"bytes {start}-{end}/{total}", "ETag": '"v1"' if len(answers) < 3 else '"v2"'})

    with serve_in_thread(hostile(lambda name: data if name == "a.tar" else None, versions)) as server:
        with open_bundle(Remote(server.url + "a.tar", cache_dir=None, limits=FAST), full=False) as b:
            with pytest.raises(RemoteChanged, match="ETag or length"):
                b.load_state(4)

    async def no_length(request: Any, name: str, body: bytes, start: int, end: int) -> Any:
        return web.Response(status=206, body=body[start:end + 1], headers={"Content-Range": f"bytes {start}-{end}/*"})

    with serve_in_thread(hostile(lambda name: data if name == "a.tar" else None, no_length)) as server:
        with pytest.raises(RemoteProtocolError, match="how long"):
            open_bundle(Remote(server.url + "a.tar", cache_dir=None, limits=FAST))


def test_manifest_bounds_and_malformed_manifests(bundles):
    honest = directory_files(bundles["honest"])
    with serve_in_thread(bundles["honest"]) as server:
        with pytest.raises(ManifestError, match="larger than 100 bytes"):  # refused from its Content-Length alone
            open_bundle(Remote(server.url, cache_dir=None, limits=Limits(max_manifest_bytes=100)))
    with serve_in_thread(bundles["archive"]) as server:
        with pytest.raises(ManifestError, match="larger than 100 bytes"):
            open_bundle(Remote(server.url, cache_dir=None, limits=Limits(max_manifest_bytes=100)))
    with serve_in_thread(hostile(lambda name: b"[1, 2" if name == MANIFEST_NAME else honest(name))) as server:
        with pytest.raises(ManifestError, match="not valid JSON"):
            open_bundle(Remote(server.url, cache_dir=None, limits=FAST))


def test_retries_stop_at_the_total_deadline(bundles):
    async def always_503(request: Any, *args: Any) -> Any:
        return web.Response(status=503)

    started = time.monotonic()
    with serve_in_thread(hostile(directory_files(bundles["honest"]), always_503)) as server:
        with pytest.raises(RemoteTimeout, match="no time left to retry"):
            open_bundle(Remote(server.url, cache_dir=None, limits=Limits(total_timeout=0.5, backoff=0.4, retries=5)))
    assert time.monotonic() - started < 2


def test_fsspec_short_reads_missing_files_and_deadlines(bundles, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(bundles["honest"], copy)
    victim = copy / checkpoint_name(4)
    with open_bundle(Remote(copy.as_uri(), cache_dir=None), full=False) as b:
        victim.write_bytes(victim.read_bytes()[:100])  # shrinks after the manifest was read
        with pytest.raises(RemoteProtocolError, match="short read"):
            b.load_state(4)
    with pytest.raises(BundleNotFound):
        open_bundle(Remote("memory://no-such-bundle", cache_dir=None))
    with pytest.raises(ManifestError, match="larger than 100 bytes"):
        open_bundle(Remote(copy.as_uri(), cache_dir=None, limits=Limits(max_manifest_bytes=100)))
    import itertools
    import types

    import pol.remote

    with open_bundle(Remote(copy.as_uri(), cache_dir=None, limits=Limits(request_timeout=1.0)), full=False) as b:
        clock = itertools.count(time.monotonic(), 100.0)  # a storage that takes 100 s between reads
        monkeypatch.setattr(pol.remote, "time", types.SimpleNamespace(monotonic=lambda: next(clock), sleep=time.sleep))
        with pytest.raises(RemoteTimeout, match="took too long"):
            b.load_state(0)


def test_missing_packages_are_named(bundles, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "aiohttp", None)
    with pytest.raises(RemoteError, match=r"pol\[remote\]"):
        open_bundle("http://127.0.0.1:9/run/")
    with pytest.raises(RemoteError, match=r"pol\[remote\]"):
        with serve_in_thread(bundles["honest"]):
            pass
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(RemoteError, match=r"pol\[remote\]"):
        open_bundle("memory://run")


def test_an_unreachable_server_is_remote_error_after_the_retries(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RemoteError, match="failed after 3 tries") as info:
        open_bundle(Remote(f"http://127.0.0.1:{port}/", cache_dir=None, limits=FAST))
    assert type(info.value) is RemoteError and info.value.exit_code == 2


def test_pol_verify_of_an_unreachable_url_cannot_verify_and_says_why(tmp_path):
    import socket

    from typer.testing import CliRunner

    from cli import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = CliRunner().invoke(app, ["verify", f"http://127.0.0.1:{port}/", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2 and "cannot verify" in result.stderr and "not evidence of fraud" in result.stderr


@pytest.mark.parametrize("where", ["local", "http"])
def test_a_checkpoint_padded_past_its_tensors_is_rejected_before_it_is_read_whole(bundles, tmp_path, where):
    """The file table (sizes, blake3) is outside the commitment: a solver or server can declare a checkpoint of any
    size. Its header must tile the file exactly with the tensors the spec says, checked before the whole file is
    read or fetched, so 4 MiB of padding costs the verifier a header read, not 4 MiB (or a terabyte)."""
    import json

    import blake3

    path = tmp_path / "padded"
    shutil.copytree(bundles["honest"], path)
    padded = path / checkpoint_name(0)  # step 0: read by every verification
    with open(padded, "ab") as f:
        f.write(b"\0" * (4 << 20))
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    data = padded.read_bytes()
    manifest["files"][checkpoint_name(0)] = {"size": len(data), "blake3": blake3.blake3(data).hexdigest()}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    if where == "local":
        report = verify(path, segments=[2], seed=0)
        assert report.bytes_read < 64 << 10
    else:
        with serve_in_thread(path) as server:
            report = verify(Remote(server.url, cache_dir=tmp_path / "c", limits=FAST), segments=[2], seed=0)
            fetched = sum(r.length for r in server.requests if r.path.endswith(checkpoint_name(0)))
        assert fetched < 64 << 10
    assert report.verdict == "reject" and "beyond its tensors' data" in report.reason, report.reason


def test_a_redirect_is_not_followed(bundles):
    async def redirect(request: Any, name: str, data: bytes, start: int, end: int) -> Any:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")  # e.g. a cloud metadata service

    with serve_in_thread(hostile(directory_files(bundles["honest"]), redirect)) as server:
        with pytest.raises(RemoteError, match="redirect: not followed"):
            open_bundle(Remote(server.url, cache_dir=None, limits=FAST))
