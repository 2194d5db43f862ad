"""`pol serve` and verification by URL on loopback: only the manifest and the sampled checkpoints are fetched (counted
at the server), the verdict is the local one, the cache fetches each checkpoint once, the market's way of verifying
(pinned commitment, beacon-drawn segments) works on a URL, and no path outside the bundle is ever served."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("fsspec")

from typer.testing import CliRunner

from cli import app
from pol.bundle import MANIFEST_NAME, checkpoint_name, open_bundle, pack_bundle
from pol.prove import train_and_prove
from pol.remote import Remote
from pol.serve import serve_in_thread
from pol.verify import verify
from tests.conftest import tiny_spec


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small honest bundle (10 segments), as a directory and as pol pack's archive (read-only)."""
    root = tmp_path_factory.mktemp("served")
    directory = train_and_prove(tiny_spec("mlp", steps=40), root / "run").path  # 11 checkpoints
    return {"directory": directory, "archive": pack_bundle(directory, root / "run.tar")}


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POL_CACHE_DIR", str(tmp_path / "cache"))  # a URL string caches here, never in ~/.cache


def _checkpoint_bytes(requests: list, path: str) -> dict[str, int]:
    """Bytes served per checkpoint name (directory layout)."""
    out: dict[str, int] = {}
    for r in requests:
        if r.path.startswith("/checkpoints/"):
            out[r.path[1:]] = out.get(r.path[1:], 0) + r.length
    return out


@pytest.mark.parametrize("layout", ["directory", "archive"])
def test_a_served_bundle_is_verified_by_url_fetching_only_what_the_sample_reads(served, layout):
    local = verify(served[layout], seed=3, samples=2)
    with serve_in_thread(served[layout]) as server:
        remote = verify(Remote(server.url, cache_dir=None), seed=3, samples=2)
        log = list(server.requests)
    assert remote.verdict == local.verdict == "accept"
    assert [c.index for c in remote.checks] == [c.index for c in local.checks]
    assert (remote.bytes_read, remote.checkpoints_read) == (local.bytes_read, local.checkpoints_read)
    manifest = (served["directory"] / MANIFEST_NAME).stat().st_size
    sampled = {checkpoint_name(0)} | {checkpoint_name(s) for c in local.checks for s in (c.start, c.end)}  # and the seed's init
    assert all(r.status in (200, 206) for r in log)
    if layout == "directory":
        assert [r.path for r in log if not r.path.startswith("/checkpoints/")] == ["/manifest.json"]
        assert set(_checkpoint_bytes(log, "")) == sampled  # no other checkpoint was touched
        assert sum(r.length for r in log) == manifest + remote.bytes_read  # nothing fetched that was not read
    else:  # one tar header block for the manifest and each checkpoint touched, fetched with its first read
        assert sum(r.length for r in log) == 512 + manifest + 512 * len(sampled) + remote.bytes_read
    with open_bundle(served["directory"], full=False) as b:
        assert len(sampled) <= 5 < len(b.manifest.files)


@pytest.mark.parametrize("layout", ["directory", "archive"])
def test_the_cache_fetches_each_checkpoint_once(served, layout, tmp_path):
    cache = tmp_path / "blobs"
    with serve_in_thread(served[layout]) as server:
        first = verify(Remote(server.url, cache_dir=cache), seed=5)
        after_first = len(server.requests)
        second = verify(Remote(server.url, cache_dir=cache), seed=5)
        again = server.requests[after_first:]
        log = list(server.requests[:after_first])
    assert first.verdict == second.verdict == "accept"
    assert len(again) == (1 if layout == "directory" else 2)  # the manifest (an archive: its header and bytes)
    with open_bundle(served["directory"], full=False) as b:
        files = b.manifest.files
    sampled = {checkpoint_name(0)} | {checkpoint_name(s) for c in first.checks for s in (c.start, c.end)}
    assert sorted(p.name for p in cache.iterdir()) == sorted(files[n].blake3 for n in sampled)  # names are digests
    if layout == "directory":
        assert _checkpoint_bytes(log, "") == {n: files[n].size for n in sampled}  # each fetched once, whole
        assert sum(1 for r in log if r.path.startswith("/checkpoints/")) == len(sampled)


def test_a_market_verifier_verifies_a_served_bundle_by_url_against_the_posted_commitment(served):
    """games.market's verifiers call verify(path, segments=..., expected_root=..., expected_job=..., beacon=...)
    with the posted commitment: the same call with the published URL as the path."""
    with open_bundle(served["directory"], full=False) as b:
        root, job = b.manifest.root, b.manifest.job_id
    beacon = "ab" * 16
    with serve_in_thread(served["archive"]) as server:
        ok = verify(server.url, segments=[2], expected_root=root, expected_job=job, beacon=beacon)
        wrong = verify(server.url, segments=[2], expected_root="0" * 64, expected_job=job, beacon=beacon)
    assert ok.verdict == "accept", ok.reason
    assert wrong.verdict == "reject" and "commitment" in wrong.reason
    assert list((Path(os.environ["POL_CACHE_DIR"]) / "blobs").iterdir())  # the default cache: $POL_CACHE_DIR/blobs


def _get(url: str, path: str) -> tuple[int, bytes]:
    """A raw request: the path goes on the wire exactly as written (no client normalisation)."""
    netloc = urlsplit(url).netloc
    conn = http.client.HTTPConnection(netloc, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_pol_serve_never_serves_a_path_outside_the_bundle(served, tmp_path):
    import shutil

    bundle = tmp_path / "run"
    shutil.copytree(served["directory"], bundle)
    (tmp_path / "secret.txt").write_text("SECRET")
    with serve_in_thread(bundle) as server:
        ok, body = _get(server.url, "/manifest.json")
        assert ok == 200 and body == (bundle / MANIFEST_NAME).read_bytes()
        (bundle / "notes.txt").write_text("not in the manifest")  # appears after the start: still not served
        for path in ["/../secret.txt", "/%2e%2e/secret.txt", "/checkpoints/../../secret.txt", "/checkpoints/%2e%2e/%2e%2e/secret.txt",
                     "//etc/passwd", "/etc/passwd", f"/{tmp_path}/secret.txt", "/%2Fetc%2Fpasswd", "/notes.txt",
                     "/checkpoints/", "/", "/manifest.json/..", "/checkpoints/step-000000000.safetensors/.."]:
            status, body = _get(server.url, path)
            assert status in (400, 403, 404), path
            assert b"SECRET" not in body and b"root:" not in body, path
        (bundle / checkpoint_name(8)).unlink()  # a listed file removed after the start
        assert _get(server.url, "/" + checkpoint_name(8))[0] == 404
        victim = bundle / checkpoint_name(4)
        victim.unlink()
        victim.symlink_to(tmp_path / "secret.txt")  # a listed file turned into a link after the start
        status, body = _get(server.url, "/" + checkpoint_name(4))
        assert status == 403 and b"SECRET" not in body
        elsewhere = tmp_path / "elsewhere"  # the checkpoints/ directory swapped for a link to another directory
        (elsewhere / "checkpoints").mkdir(parents=True)
        (elsewhere / checkpoint_name(12)).write_text("SECRET")
        (bundle / "checkpoints").rename(tmp_path / "moved")
        (bundle / "checkpoints").symlink_to(elsewhere / "checkpoints")
        status, body = _get(server.url, "/" + checkpoint_name(12))
        assert status == 403 and b"SECRET" not in body


def test_serve_checks_the_bundle_before_serving(tmp_path):
    from pol.errors import BundleNotFound

    with pytest.raises(BundleNotFound), serve_in_thread(tmp_path):
        pass


def test_inspect_accepts_a_url(served):
    with serve_in_thread(served["directory"]) as server:
        result = CliRunner().invoke(app, ["inspect", server.url, "--json", "--quick"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["path"] == server.url and summary["integrity_check"] == "quick" and summary["bytes_read"] == 0


def test_verify_cli_accepts_a_url_with_a_cache_dir(served, tmp_path):
    with serve_in_thread(served["directory"]) as server:
        result = CliRunner().invoke(app, ["verify", server.url, "--seed", "1", "--json", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verdict"] == "accept"
    assert len(list((tmp_path / "c").iterdir())) == json.loads(result.stdout)["checkpoints_read"]


def test_pol_serve_port_0_prints_the_url_and_serves(served):
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", str(served["archive"]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, proc.stderr.read()  # type: ignore[union-attr]
        url = line.strip()
        assert url.endswith("/run.tar") and ":0/" not in url
        status, body = _get(url, "/run.tar")
        assert status == 200 and body == served["archive"].read_bytes()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
