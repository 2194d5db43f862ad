"""Every corruption of a bundle gives its own typed error, and nothing else ever escapes the reader."""

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pol.bundle import MANIFEST_NAME, checkpoint_name, file_digest, open_bundle, pack_bundle
from pol.errors import (
    ArchiveError,
    BundleError,
    BundleFileError,
    BundleNotFound,
    BundleVersionError,
    CommitmentError,
    DigestMismatch,
    ManifestError,
)
from pol.merkle import verify_proof


def edit_manifest(bundle: Path, edit) -> None:
    path = bundle / MANIFEST_NAME
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def test_honest_bundle_opens_and_proves_every_record(bundle_copy):
    with open_bundle(bundle_copy) as b:
        for i, record in enumerate(b.records):
            verify_proof(bytes.fromhex(b.manifest.merkle_root), record.leaf(b.manifest.job_id), b.proof(i), len(b.records))
            assert b.load_state(record.step)["meta/step"].item() == record.step


def test_a_proof_for_an_edited_record_fails(bundle_copy):
    import dataclasses

    with open_bundle(bundle_copy) as b:
        forged = dataclasses.replace(b.records[2], loss=0.0)
        with pytest.raises(CommitmentError):
            verify_proof(bytes.fromhex(b.manifest.merkle_root), forged.leaf(b.manifest.job_id), b.proof(2), len(b.records))


@pytest.mark.parametrize("field, value", [("version", 2), ("version", "1"), ("format", "other")])
def test_wrong_version_or_format(bundle_copy, field, value):
    edit_manifest(bundle_copy, lambda m: m.update({field: value}))
    with pytest.raises(BundleVersionError):
        open_bundle(bundle_copy)


def test_missing_checkpoint(bundle_copy):
    os.remove(bundle_copy / checkpoint_name(4))
    with pytest.raises(BundleFileError, match="missing"):
        open_bundle(bundle_copy)


def test_missing_manifest(bundle_copy):
    os.remove(bundle_copy / MANIFEST_NAME)
    with pytest.raises(BundleNotFound, match="no manifest"):
        open_bundle(bundle_copy)


def test_extra_file(bundle_copy):
    (bundle_copy / "checkpoints" / "notes.txt").write_text("hi")
    with pytest.raises(BundleFileError, match="extra"):
        open_bundle(bundle_copy)


def test_renamed_checkpoint(bundle_copy):
    os.rename(bundle_copy / checkpoint_name(4), bundle_copy / "checkpoints" / "step-4.safetensors")
    with pytest.raises(BundleFileError):
        open_bundle(bundle_copy)


def test_swapped_checkpoints(bundle_copy):
    a, b = bundle_copy / checkpoint_name(4), bundle_copy / checkpoint_name(8)
    tmp = bundle_copy / "x"
    os.rename(a, tmp), os.rename(b, a), os.rename(tmp, b)
    with pytest.raises(BundleError):
        open_bundle(bundle_copy)


@pytest.mark.parametrize("step", [0, 4, 12])
def test_flipped_bit_in_a_checkpoint(bundle_copy, step):
    path = bundle_copy / checkpoint_name(step)
    data = bytearray(path.read_bytes())
    data[len(data) - 7] ^= 0x01  # inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match=checkpoint_name(step)):
        open_bundle(bundle_copy)


def test_forged_checkpoint_with_a_consistent_file_table(bundle_copy):
    """A forger who also rewrites the file table is still caught: the tensors don't match the committed record."""
    from safetensors.torch import load_file, save_file

    path = bundle_copy / checkpoint_name(8)
    state = load_file(str(path))
    name = next(n for n in sorted(state) if n.startswith("param/"))
    state[name] = state[name] + 1e-3
    save_file(state, str(path))
    edit_manifest(bundle_copy, lambda m: m["files"][checkpoint_name(8)].update(size=path.stat().st_size, blake3=file_digest(path)))
    with open_bundle(bundle_copy) as b:
        with pytest.raises(DigestMismatch, match="state at step 8"):
            b.load_state(8)


@pytest.mark.parametrize(
    "edit, error",
    [
        (lambda m: m["records"][1].update(loss=0.5), DigestMismatch),
        (lambda m: m["records"][2].update(state="0" * 64), DigestMismatch),
        (lambda m: m.update(root="0" * 64), DigestMismatch),
        (lambda m: m.update(merkle_root="1" * 64), DigestMismatch),
        (lambda m: m.update(job_id="2" * 64), DigestMismatch),
        (lambda m: m["spec"].update(seed=99), DigestMismatch),
        (lambda m: m["records"].pop(), ManifestError),
        (lambda m: m["records"][1].update(step=5), ManifestError),
        (lambda m: m["records"][1].update(extra=1), ManifestError),
        (lambda m: m["records"][1].update(state="XYZ"), ManifestError),
        (lambda m: m.pop("env"), ManifestError),
        (lambda m: m.update(colour="red"), ManifestError),
        (lambda m: m["spec"].pop("seed"), ManifestError),
        (lambda m: m["spec"].update(steps=-1), ManifestError),
        (lambda m: m["env"].update(note="x" * 100_000), ManifestError),
        (lambda m: m["env"].update({f"k{i}": i for i in range(100)}), ManifestError),
        (lambda m: m["spec"]["model"].update(kwargs={"pad": "x" * 100_000}), ManifestError),
        (lambda m: m["files"][checkpoint_name(4)].update(size=-1), ManifestError),
        (lambda m: m["files"][checkpoint_name(4)].update(size=10), BundleFileError),
        (lambda m: m["files"].update({"../../etc/passwd": m["files"].pop(checkpoint_name(4))}), BundleFileError),
        (lambda m: m["files"].update({"/abs/path": m["files"].pop(checkpoint_name(4))}), BundleFileError),
    ],
)
def test_edited_manifest_fields(bundle_copy, edit, error):
    edit_manifest(bundle_copy, edit)
    with pytest.raises(error):
        open_bundle(bundle_copy)


@pytest.mark.parametrize("text", ['{"records": NaN}', '{"loss": Infinity}', "[1e999]", '{"a": 1, "a": 2}', "not json", ""])
def test_non_finite_or_malformed_manifest_text(bundle_copy, text):
    (bundle_copy / MANIFEST_NAME).write_text(text)
    with pytest.raises(ManifestError):
        open_bundle(bundle_copy)


def test_non_finite_loss_written_as_a_huge_literal(bundle_copy):
    path = bundle_copy / MANIFEST_NAME
    value = json.loads(path.read_text())
    text = json.dumps(value).replace(json.dumps(value["records"][1]["loss"]), "1e999", 1)
    path.write_text(text)
    with pytest.raises(ManifestError, match="loss"):
        open_bundle(bundle_copy)


def test_oversized_manifest(bundle_copy):
    with open(bundle_copy / MANIFEST_NAME, "ab") as f:
        f.truncate(40 << 20)
    with pytest.raises(ManifestError, match="larger"):
        open_bundle(bundle_copy)


def test_symlink_escaping_the_bundle(bundle_copy, tmp_path):
    target = bundle_copy / checkpoint_name(4)
    outside = tmp_path / "outside.safetensors"
    shutil.move(target, outside)
    os.symlink(outside, target)
    with pytest.raises(BundleFileError, match="link"):
        open_bundle(bundle_copy)


def test_archive_round_trip_and_truncation(bundle_copy, tmp_path):
    archive = pack_bundle(bundle_copy, tmp_path / "b.tar")
    with open_bundle(archive) as b:
        root = b.manifest.root
        assert b.load_state(12)["meta/step"].item() == 12
    with open_bundle(bundle_copy) as b:
        assert b.manifest.root == root
    data = archive.read_bytes()
    with tarfile.open(archive) as tf:
        last = tf.getmembers()[-1]
        data_end = last.offset_data + last.size  # past this lies only tar padding, which carries no content
    for cut in (len(data) // 3, data_end - 1, 700, 10):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        with pytest.raises(ArchiveError):
            open_bundle(tmp_path / "cut.tar")


def _tar_with(tmp_path: Path, name: str, *, symlink: bool = False) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo(name)
        if symlink:
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            info.size = 2
        import io

        tf.addfile(info, None if symlink else io.BytesIO(b"{}"))
    return path


@pytest.mark.parametrize("name, symlink", [("../escape.json", False), ("/abs/manifest.json", False), ("manifest.json", True), ("other.bin", False)])
def test_unsafe_archive_members(tmp_path, name, symlink):
    with pytest.raises(ArchiveError):
        open_bundle(_tar_with(tmp_path, name, symlink=symlink))
    assert not (tmp_path.parent / "escape.json").exists()


def test_no_such_bundle(tmp_path):
    with pytest.raises(BundleNotFound, match="no such"):
        open_bundle(tmp_path / "nothing")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_manifest_damage_only_raises_bundle_errors(bundle_copy, data):
    """Fuzz: whatever bytes the manifest holds, the reader answers with a BundleError or accepts an intact one."""
    path = bundle_copy / MANIFEST_NAME
    original = path.read_bytes()
    try:
        damaged = bytearray(original)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(damaged) - 1))
            damaged[i] = data.draw(st.integers(0, 255))
        path.write_bytes(bytes(damaged))
        try:
            open_bundle(bundle_copy)
        except BundleError:
            pass
    finally:
        path.write_bytes(original)


def test_streamed_checkpoints_read_back_with_the_safetensors_library(tmp_path):
    import torch
    from safetensors.torch import load_file

    from pol.bundle import write_checkpoint
    from pol.digest import state_digest, tensor_digests

    state = {"param/w": torch.randn(3, 5), "optim/beta1_power": torch.tensor(0.9, dtype=torch.float64),
             "meta/step": torch.tensor(7), "param/e": torch.zeros(0, 4), "buffer/m": torch.tensor([True, False]),
             "param/t": torch.randn(4, 6).t(),  # non-contiguous
             "param/big": torch.randn(300_000), "param/mid": torch.randn(200_000)}  # written alone / gathered
    per_tensor: dict[str, str] = {}
    entry = write_checkpoint(tmp_path, 7, state, "ab" * 32, per_tensor)
    path = tmp_path / checkpoint_name(7)
    assert entry.size == path.stat().st_size and entry.blake3 == file_digest(path)
    loaded = load_file(str(path))
    assert state_digest(loaded) == state_digest(state)
    assert all(torch.equal(loaded[n], state[n]) for n in state)
    assert per_tensor == tensor_digests(state)  # the digests computed in the write pass are the canonical ones
