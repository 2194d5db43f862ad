"""No code from a bundle: a forged, internally consistent bundle naming code to run makes every command answer
"cannot verify: code not allowed" (exit 2) before anything is imported, and nothing it names ever runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from pol.bundle import open_bundle
from pol.components import CodePolicy, compute_code_digest
from pol.errors import CodeDiffers, CodeNotAllowed, ComponentError
from pol.verify import verify

from .helpers import CODE, with_spec

runner = CliRunner()

EVIL = {  # (spec field, name, kwargs): each would create the marker file if pol ever called it
    "os-system": ("data", "os:system", {"command": "touch MARKER"}),
    "subprocess": ("data", "subprocess:getoutput", {"cmd": "touch MARKER"}),
    "builtins-exec": ("model", "builtins:exec", {"source": "open('MARKER', 'w').close()"}),
    "module-beside-the-bundle": ("model", "evilmod:make", {}),
}


@pytest.fixture
def evil_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding a module that writes the marker the moment it is imported."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "evilmod.py").write_text("open('MARKER', 'w').close()\n\ndef make():\n    open('MARKER', 'w').close()\n")
    monkeypatch.chdir(work)
    return work


def _evil_bundle(honest: Path, work: Path, case: str) -> Path:
    field, name, kwargs = EVIL[case]
    return with_spec(honest, work / f"bundle-{case}", **{field: {"name": name, "kwargs": kwargs, "code": CODE}})


@pytest.mark.parametrize("case", sorted(EVIL))
def test_verify_api_refuses_before_importing(honest_bundles, evil_dir, case):
    path = _evil_bundle(honest_bundles["mlp"], evil_dir, case)
    with open_bundle(path) as b:  # integrity is perfect: only the trust rule refuses it
        assert b.spec.user_code
    with pytest.raises(CodeNotAllowed, match="code not allowed") as caught:
        verify(path, samples=1)
    assert EVIL[case][1] in str(caught.value)
    assert not (evil_dir / "MARKER").exists()


@pytest.mark.parametrize("case", sorted(EVIL))
def test_every_command_answers_cannot_verify(honest_bundles, evil_dir, case):
    path = _evil_bundle(honest_bundles["mlp"], evil_dir, case)
    name = EVIL[case][1]
    result = runner.invoke(app, ["verify", str(path), "--quiet"])
    assert result.exit_code == 2 and "cannot verify: code not allowed" in result.stderr and name in result.stderr
    graph = runner.invoke(app, ["graph", str(path), "--step", "0", "--out", str(evil_dir / "g.json")])
    assert graph.exit_code == 2 and "code not allowed" in graph.stderr, graph.output
    dispute = runner.invoke(app, ["dispute", str(path), "--segment", "1"])
    assert dispute.exit_code == 2 and "code not allowed" in dispute.stderr, dispute.output
    inspect = runner.invoke(app, ["inspect", str(path)])  # reading a bundle imports nothing: it just shows the claim
    assert inspect.exit_code == 0 and name in inspect.stdout
    assert "Traceback" not in result.output + graph.output + dispute.output
    assert not (evil_dir / "MARKER").exists()


def test_allowing_a_package_still_checks_its_code_digest(honest_bundles, evil_dir):
    path = _evil_bundle(honest_bundles["mlp"], evil_dir, "os-system")
    with pytest.raises(CodeDiffers, match="code differs"):
        verify(path, samples=1, code=CodePolicy.allowing(["os"]))
    result = runner.invoke(app, ["verify", str(path), "--quiet", "--allow-code", "os"])
    assert result.exit_code == 2 and "code differs" in result.stderr and "not evidence of fraud" in result.stderr
    assert not (evil_dir / "MARKER").exists()


def test_the_working_directory_is_never_on_the_import_path(honest_bundles, evil_dir):
    path = _evil_bundle(honest_bundles["mlp"], evil_dir, "module-beside-the-bundle")
    with pytest.raises(ComponentError, match="not installed"):
        verify(path, samples=1, code=CodePolicy.allowing(["evilmod"]))
    result = runner.invoke(app, ["verify", str(path), "--quiet", "--allow-code", "evilmod"])
    assert result.exit_code == 2 and "evilmod" in result.stderr
    assert not (evil_dir / "MARKER").exists()


def test_code_digest_reads_files_and_imports_nothing(tmp_path, monkeypatch):
    pkg = tmp_path / "pinned_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("open('MARKER', 'w').close()\n")
    (pkg / "models.py").write_text("def make():\n    return 1\n")
    (pkg / "data.bin").write_bytes(b"\x00" * 10)  # not code: outside the digest
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    first = compute_code_digest("pinned_pkg.models:make")
    assert not (tmp_path / "MARKER").exists()
    (pkg / "data.bin").write_bytes(b"\x01" * 10)
    assert compute_code_digest("pinned_pkg.models:make") == first
    (pkg / "models.py").write_text("def make():\n    return 2\n")
    assert compute_code_digest("pinned_pkg.models:make") != first
    with pytest.raises(ComponentError, match="not installed"):
        compute_code_digest("no_such_pkg_here:make")


def test_code_digest_cache_never_hides_a_change(tmp_path, monkeypatch):
    """The per-process digest cache is keyed by each file's size, inode and mtime, and only files older than the
    clock's granularity are cached: a same-size edit made at once (same mtime tick), or later with any mtime,
    still changes the digest."""
    import os

    from pol import components

    pkg = tmp_path / "cached_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("A = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh = compute_code_digest("cached_pkg:A")
    (pkg / "__init__.py").write_text("A = 2\n")  # same size, within the same mtime tick: never cached
    assert compute_code_digest("cached_pkg:A") != fresh
    old = 1_600_000_000
    os.utime(pkg / "__init__.py", (old, old))
    before = compute_code_digest("cached_pkg:A")
    hashed = []
    real = components.Path.read_bytes
    monkeypatch.setattr(components.Path, "read_bytes", lambda self: hashed.append(self) or real(self))
    assert compute_code_digest("cached_pkg:A") == before and hashed == []  # cached: no file read again
    (pkg / "__init__.py").write_text("A = 3\n")
    os.utime(pkg / "__init__.py", (old + 1, old + 1))
    assert compute_code_digest("cached_pkg:A") not in (before, fresh) and len(hashed) == 1


def test_third_party_code_a_user_package_imports_is_pinned_by_version(tmp_path, monkeypatch):
    """The distributions a user package imports run as part of its model: their versions are bound into the spec
    (read from the source, nothing imported), and a verifier with another version cannot verify."""
    import importlib.metadata

    from pol.components import compute_imported_versions
    from pol.errors import SpecError, VersionMismatch
    from pol.spec import spec_from_dict
    from pol.verify import check_versions

    pkg = tmp_path / "importing_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("open('MARKER', 'w').close()\nimport os, json\nfrom . import sub\n")
    (pkg / "sub.py").write_text("import numpy as np\nimport torch.nn\nfrom importing_pkg import sub\nimport no_such_dist_xyz\n"
                                "def f():\n    from safetensors.torch import save_file\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    got = compute_imported_versions("importing_pkg.sub:f")
    assert got == {"numpy": importlib.metadata.version("numpy"), "safetensors": importlib.metadata.version("safetensors")}
    assert not (tmp_path / "MARKER").exists()
    spec = spec_from_dict({"model": "mlp", "versions": {"pol": __import__("pol").__version__, **got}})
    check_versions(spec)
    with pytest.raises(VersionMismatch, match="numpy 0.0.1"):
        check_versions(spec.replace(versions={**spec.versions, "numpy": "0.0.1"}))
    with pytest.raises(VersionMismatch, match="not installed"):
        check_versions(spec.replace(versions={**spec.versions, "no-such-dist-xyz": "1.0"}))
    for hostile in ("../../etc", "Numpy", "a/b", "", "x" * 65):  # a version key is a distribution name, never a path
        with pytest.raises(SpecError, match="versions"):
            spec_from_dict({"model": "mlp", "versions": {hostile: "1"}})


def test_allow_list_names_packages(tmp_path):
    policy = CodePolicy.allowing(["mypkg.models"])
    assert policy.permits("mypkg.models") and policy.permits("mypkg.models.deep")
    assert not policy.permits("mypkg") and not policy.permits("mypkg.modelsx") and not policy.permits("os")
    assert CodePolicy().permits("os") is False and CodePolicy.trust_all_code().permits("anything")
    with pytest.raises(ComponentError, match="package name"):
        CodePolicy.allowing(["../evil"])
    result = runner.invoke(app, ["verify", str(tmp_path), "--allow-code", "bad name"])
    assert result.exit_code == 2 and "package name" in result.stderr
