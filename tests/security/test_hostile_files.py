"""Bounded work on hostile input: huge claimed counts, archives with sparse, linked or special members, deep nesting
and checkpoints that do not fit the spec are each a typed error or a REJECT, with memory and disk bounded."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pol.bundle import MANIFEST_NAME, checkpoint_name, open_bundle, pack_bundle
from pol.canonical import parse_json_strict
from pol.errors import ArchiveError, BundleError, ManifestError, SpecError
from pol.spec import load_spec_file
from pol.verify import verify

from ..attacks.forge import honest_states, write_forged

runner = CliRunner()


def _temp_entries() -> set[str]:
    return set(os.listdir(tempfile.gettempdir()))


def test_a_huge_claimed_step_count_is_refused_without_building_it(bundle_copy):
    from pol.spec import spec_from_dict

    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    for steps, every in ((10**9, 1), (10**9, 10**3)):  # 1e9 and 1e6 + 1 records claimed, a handful present
        manifest["spec"].update(steps=steps, every=every)
        if every > 1:  # a valid spec and job id: the records must then be refused for their count alone
            manifest["job_id"] = spec_from_dict(manifest["spec"], require_resolved=True).job_id
        (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
        tracemalloc.start()
        with pytest.raises(ManifestError) as caught:
            open_bundle(bundle_copy)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 20 << 20, peak  # no list as long as the claim
        assert "checkpoints" in str(caught.value) or "records" in str(caught.value)


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


@pytest.mark.parametrize("kind", ["hardlink", "symlink", "fifo", "chardev", "blockdev", "directory"])
def test_archive_members_other_than_regular_files_are_refused(bundle_copy, tmp_path, kind):
    manifest = (bundle_copy / MANIFEST_NAME).read_bytes()
    target = checkpoint_name(0)
    special = {"hardlink": _info(target, tarfile.LNKTYPE, link=MANIFEST_NAME), "symlink": _info(target, tarfile.SYMTYPE, link="/etc/passwd"),
               "fifo": _info(target, tarfile.FIFOTYPE), "chardev": _info(target, tarfile.CHRTYPE),
               "blockdev": _info(target, tarfile.BLKTYPE), "directory": _info("checkpoints/evil", tarfile.DIRTYPE)}[kind]
    path = _tar(tmp_path / "evil.tar", [(_info(MANIFEST_NAME, size=len(manifest)), manifest), (special, None)])
    before = _temp_entries()
    with pytest.raises(ArchiveError, match="not a regular file|not a bundle file"):
        open_bundle(path)
    assert _temp_entries() == before


def test_a_sparse_archive_member_is_refused_without_writing_anything(bundle_copy, tmp_path):
    """10 KB of archive claiming a 2 GiB checkpoint: refused, and nothing is written (archives are read in place)."""
    work = tmp_path / "sparse"
    shutil.copytree(bundle_copy, work)
    big = work / checkpoint_name(0)
    big.unlink()
    with open(big, "wb") as f:
        f.truncate(2 << 30)
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(archive), "-C", str(work), MANIFEST_NAME, "checkpoints"], check=True)
    big.unlink()
    assert archive.stat().st_size < 1 << 20
    before, usage = _temp_entries(), shutil.disk_usage(tmp_path).used
    with pytest.raises(ArchiveError, match="sparse"):
        open_bundle(archive)
    assert _temp_entries() == before and shutil.disk_usage(tmp_path).used - usage < 1 << 20
    result = runner.invoke(app, ["inspect", str(archive)])
    assert result.exit_code == 1 and "sparse" in result.stderr


def test_an_archive_claiming_more_than_it_holds_is_truncated(bundle_copy, tmp_path):
    archive = pack_bundle(bundle_copy, tmp_path / "b.tar")
    with open_bundle(archive) as b:  # read in place: the archive is the only copy
        assert b.load_state(4)["meta/step"].item() == 4
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tf:
        member = tf.getmember(checkpoint_name(12))
    header = member.offset_data - 512  # claim a far larger member than the archive holds
    info = tarfile.TarInfo(member.name)
    info.size, info.mtime, info.mode = 1 << 40, 0, 0o644
    data[header : header + 512] = info.tobuf(tarfile.GNU_FORMAT)[-512:]
    (tmp_path / "liar.tar").write_bytes(bytes(data))
    with pytest.raises(ArchiveError):
        open_bundle(tmp_path / "liar.tar")


def test_deep_nesting_is_a_typed_error(bundle_copy, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="nested"):
        parse_json_strict(deep)
    with pytest.raises(ValueError, match="nested"):
        parse_json_strict("[" * 65 + "]" * 65)
    (bundle_copy / MANIFEST_NAME).write_text(deep)
    with pytest.raises(ManifestError, match="nested"):
        open_bundle(bundle_copy)
    spec = tmp_path / "deep.json"
    spec.write_text('{"model": ' + deep + "}")
    with pytest.raises(SpecError, match="nested"):
        load_spec_file(spec)
    result = runner.invoke(app, ["train", "--spec", str(spec), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "nested" in result.stderr and "Traceback" not in result.output


def test_a_spec_file_that_is_not_text_is_one_line(tmp_path):
    spec = tmp_path / "job.toml"
    spec.write_bytes(b'model = "mlp"\n\xff\xfe')
    result = runner.invoke(app, ["train", "--spec", str(spec), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not UTF-8" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def _reshaped(src: Path, dst: Path, change) -> Path:
    spec, states, records = honest_states(src)
    change(states[8])
    return write_forged(dst, spec, states, data={r.step: r.data for r in records}, losses={r.step: r.loss for r in records})


@pytest.mark.parametrize("case", ["missing", "extra", "shape", "dtype"])
def test_a_checkpoint_that_does_not_fit_the_spec_is_rejected_before_any_replay(honest_bundles, tmp_path, case):
    name = "param/head.weight"

    def change(state):
        if case == "missing":
            del state[name]
        elif case == "extra":
            state["param/backdoor"] = torch.zeros(3)
        elif case == "shape":
            state[name] = state[name][:, :-1].contiguous()
        else:
            state[name] = state[name].double()

    path = _reshaped(honest_bundles["mlp"], tmp_path / "f", change)
    with open_bundle(path):  # digests are consistent: integrity alone passes
        pass
    report = verify(path, segments=[1, 2, 3], seed=0)
    assert report.verdict == "reject" and report.steps_replayed == 0, report.reason
    assert ("param/backdoor" if case == "extra" else name) in report.reason and "step 8" in report.reason
    result = runner.invoke(app, ["verify", str(path), "--segments", "2", "--seed", "0", "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_a_checkpoint_claiming_another_step_is_rejected(honest_bundles, tmp_path):
    spec, states, records = honest_states(honest_bundles["mlp"])
    path = tmp_path / "f"
    from pol.bundle import write_bundle

    write_bundle(path, spec, ((r.step, {**states[r.step], "meta/step": torch.tensor(3 if r.step == 4 else r.step)}, r.data, r.loss)
                              for r in records), {})
    report = verify(path, segments=[1, 2], seed=0)
    assert report.verdict == "reject" and "meta/step" in report.reason


def test_a_malformed_checkpoint_header_is_rejected(bundle_copy):
    from pol.bundle import file_digest

    ckpt = bundle_copy / checkpoint_name(4)
    data = bytearray(ckpt.read_bytes())
    data[0:8] = (1 << 40).to_bytes(8, "little")  # a header "longer" than the file
    ckpt.write_bytes(bytes(data))
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())  # the file table is outside the commitment
    manifest["files"][checkpoint_name(4)] = {"size": len(data), "blake3": file_digest(ckpt)}
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    report = verify(bundle_copy, segments=[1], seed=0)
    assert report.verdict == "reject" and "header" in report.reason and report.steps_replayed == 0


def test_bundle_errors_never_escape_as_other_exceptions(bundle_copy):
    (bundle_copy / MANIFEST_NAME).write_bytes(b"\xff\xfe not json")
    with pytest.raises(BundleError):
        open_bundle(bundle_copy)
