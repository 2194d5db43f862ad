"""Data pipelines people use (issue 14 item 9): torch map-style datasets, lazily read shards and arrays above a
memory cap, augmentation drawn from pol's keyed randomness, and fetching workers that change no bit."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pol import engine
from pol.augment import Augmented, parse_pipeline
from pol.components import CodePolicy
from pol.data import Dataset, ShardedDataset, TorchDataset, build_dataset, data_digest
from pol.digest import state_digest
from pol.errors import ComponentError, DataError
from pol.prove import train_and_prove
from pol.spec import spec_from_dict
from pol.verify import verify
from tests.attacks.forge import honest_states, train_states, write_forged

REPO = Path(__file__).resolve().parent.parent
ALLOW = CodePolicy.allowing(["tests"])
TOP = "avx512" if "avx512f" in Path("/proc/cpuinfo").read_text(errors="replace") else "avx2"
CROP_FLIP = [{"name": "random_crop", "padding": 2}, {"name": "hflip"}]
JITTER = [*CROP_FLIP, {"name": "color_jitter", "brightness": 0.25, "contrast": 0.25}]


def cnn_spec(channels=3, **fields):
    """tiny_spec's cnn on 8x8 images of `channels` channels, 6 steps, checkpoints every 2."""
    return spec_from_dict({"model": {"name": "cnn", "kwargs": {"width": 4, "size": 8, "channels": channels}},
                           "steps": 6, "every": 2, "batch_size": 16, **fields})


def augmented_spec(augment=JITTER, numerics="native", **fields):
    data = {"name": "images", "kwargs": {"n": 128, "size": 8, "channels": 3, "augment": augment}}
    return cnn_spec(data=data, numerics=numerics, **fields)


def batch_digests(spec, steps=4):
    dataset = build_dataset(spec.data.name, spec.data.kwargs, code=ALLOW)
    return [engine.compute_batch_digest(s, *engine.step_batch(spec, dataset, s)).hex() for s in range(steps)]


def train_verify(spec, out, **verify_kwargs):
    path = train_and_prove(spec, out, code=ALLOW).path
    return path, verify(path, segments=[1, 2, 3], seed=0, code=ALLOW, **verify_kwargs)


def write_shards(root: Path, rows: dict[str, torch.Tensor], cuts: list[int]) -> Path:
    root.mkdir(parents=True)
    edges = [0, *cuts, len(next(iter(rows.values())))]
    for k, (a, b) in enumerate(itertools.pairwise(edges)):
        save_file({n: t[a:b].contiguous() for n, t in rows.items()}, str(root / f"part-{k:03d}.safetensors"))
    return root


# ------------------------------------------------------------------------------------------------ torch datasets, digests


def test_the_digest_is_the_same_for_the_same_bytes_however_stored(tmp_path):
    """In memory, as uneven safetensors shards, as .npy arrays and as a torch Dataset: one digest, the same batches."""
    from tests.datapkg import ImagesByIndex

    memory = build_dataset("images", {"n": 96, "size": 8, "channels": 3})
    shards = ShardedDataset(sorted(write_shards(tmp_path / "st", dict(memory.tensors), [10, 11, 60]).glob("*.safetensors")))
    (tmp_path / "npy").mkdir()
    for name, t in memory.tensors.items():
        np.save(tmp_path / "npy" / f"{name}.npy", t.numpy())
    arrays = build_dataset(f"dir:{tmp_path / 'npy'}", {}, code=CodePolicy.trust_all_code())
    by_index = TorchDataset(ImagesByIndex(96, 8, 3))
    assert not shards.in_memory and not arrays.in_memory and not by_index.in_memory
    digests = {data_digest(d) for d in (memory, shards, arrays, by_index)}
    assert digests == {data_digest(memory)}
    idx = np.array([95, 0, 10, 11, 59, 60, 3])
    for lazy in (shards, arrays, by_index):
        assert lazy.names == memory.names
        for name, t in memory.batch(idx).items():
            assert torch.equal(lazy.batch(idx)[name], t)
    one_more = dict(memory.tensors)
    one_more["x"] = one_more["x"].clone()
    one_more["x"][95, 0, 0, 0] += 1
    assert data_digest(Dataset(one_more)) != data_digest(memory)


def test_a_torch_map_style_dataset_trains_and_verifies(tmp_path):
    """A module:callable returning a torch Dataset of (x, int label) samples: batched in pol's order, its digest
    streamed, the same digest and the same training as pol's in-memory `images` holding the same bytes."""
    common = {"channels": 1}
    spec = cnn_spec(data={"name": "tests.datapkg:torch_images", "kwargs": {"n": 128, "size": 8}}, **common)
    path, report = train_verify(spec, tmp_path / "torch")
    assert report.verdict == "accept", report.to_dict()
    builtin = train_and_prove(cnn_spec(data={"name": "images", "kwargs": {"n": 128, "size": 8}}, **common), tmp_path / "builtin")
    got = train_and_prove(spec, tmp_path / "again", code=ALLOW).manifest
    assert got.spec.data_digest == builtin.manifest.spec.data_digest
    assert got.root == train_and_prove(spec, tmp_path / "third", code=ALLOW).manifest.root


def test_dict_samples_and_refusals():
    ds = build_dataset("tests.datapkg:dict_samples", {"n": 16}, code=ALLOW)
    assert ds.layout == {"x": (torch.float32, (4,)), "y": (torch.float32, (1,))}
    assert ds.batch(np.array([3, 1]))["x"][0, 1] == 4 / 64
    with pytest.raises(ComponentError, match="map-style"):
        build_dataset("tests.datapkg:stream", {}, code=ALLOW)
    for bad in ([{"name": "rotate"}], [{"name": "hflip", "q": 1}], [{"name": "random_crop", "padding": -1}], [], "hflip",
                [{"name": "mixup"}], [{"name": "color_jitter", "clamp": [1, 0]}]):
        with pytest.raises(ComponentError):
            parse_pipeline(bad)


# ------------------------------------------------------------------------------------------------- larger than memory


def test_sharded_data_above_the_memory_cap_trains_and_verifies(tmp_path, monkeypatch):
    """4 MiB of rows in 5 shards under a 1 MiB cap that pol enforces: the same rows in memory are refused, the
    shards are read lazily (no read ever holds more than the cap) and the job trains and verifies, with the digest
    the in-memory rows have."""
    from tests.datapkg import in_memory_rows

    rows = in_memory_rows(d=256)
    total = sum(t.numel() * t.element_size() for t in rows.values())
    root = write_shards(tmp_path / "shards", rows, [1000, 1500, 2900, 3000])
    in_memory_digest = data_digest(Dataset(rows))
    del rows
    monkeypatch.setenv("POL_DATA_MEMORY", "1M")
    assert total > 4 * (1 << 20)
    with pytest.raises(DataError, match="POL_DATA_MEMORY"):
        build_dataset("tests.datapkg:in_memory_rows", {"d": 256}, code=ALLOW)
    largest = [0]
    original = ShardedDataset._read

    def counting(self, shard, a, b):
        out = original(self, shard, a, b)
        largest[0] = max(largest[0], sum(t.numel() * t.element_size() for t in out.values()))
        return out

    monkeypatch.setattr(ShardedDataset, "_read", counting)
    spec = spec_from_dict({"model": {"name": "tests.datapkg:regressor", "kwargs": {"d": 256}}, "data": f"dir:{root}", "loss": "mse",
                           "steps": 6, "every": 2, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05}})
    result = train_and_prove(spec, tmp_path / "b", code=ALLOW, data_dir=str(root))
    assert result.manifest.spec.data_digest == in_memory_digest
    report = verify(result.path, segments=[1, 2, 3], seed=0, code=ALLOW, data_dir=str(root))
    assert report.verdict == "accept", report.to_dict()
    assert 0 < largest[0] <= 1 << 20 < total


# ---------------------------------------------------------------------------------------------------------- augmentation


def test_augmentation_draws_are_keyed_by_step_and_sample():
    """A sample's augmentation is a function of (seed, step, its index): not of its position in the batch, of the
    batch's other samples or of the order the workers finish in. Crop is a padded shift, flip a mirror."""
    spec = augmented_spec(CROP_FLIP)
    dataset = build_dataset(spec.data.name, spec.data.kwargs)
    assert isinstance(dataset, Augmented) and data_digest(dataset) == data_digest(dataset.inner)
    idx = np.array([5, 17, 42, 99])
    raw = dataset.batch(idx)
    out = dataset.transform(raw, seed=0, step=3, idx=idx)["x"]
    again = dataset.transform(dataset.batch(idx[::-1].copy()), seed=0, step=3, idx=idx[::-1].copy())["x"]
    assert torch.equal(out, again.flip(0))
    assert not torch.equal(out, dataset.transform(raw, seed=0, step=4, idx=idx)["x"])
    assert not torch.equal(out, dataset.transform(raw, seed=1, step=3, idx=idx)["x"])
    for j in range(len(idx)):  # each output is the raw image shifted by at most 2 pixels and maybe mirrored, zeros outside
        padded = torch.nn.functional.pad(raw["x"][j], (2, 2, 2, 2))
        candidates = [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[j], c) or torch.equal(out[j], c.flip(-1)) for c in candidates)


def test_batched_built_in_transforms_are_the_per_sample_definition():
    """A built-in transform runs on the whole batch in a few operations: the same bits as its per-sample
    definition, sample by sample with each sample's own draws."""
    from pol.augment import Draws, Mixup

    dataset = build_dataset("images", {"n": 64, "size": 8, "channels": 3})
    idx = np.array([7, 3, 60, 12, 33])
    batch = dataset.batch(idx)
    for t in parse_pipeline(JITTER + [{"name": "color_jitter", "brightness": 0.5, "clamp": [-0.5, 0.5]}]):
        batched = t.apply_batch(batch, [Draws(9, t.name, 4, int(i), {}) for i in idx])["x"]
        one_by_one = torch.stack([t({"x": batch["x"][j], "y": batch["y"][j]}, Draws(9, t.name, 4, int(i), {}))["x"]
                                  for j, i in enumerate(idx)])
        assert torch.equal(batched, one_by_one), t.name
    mixed = Mixup(classes=10, alpha=3).apply(batch, seed=0, step=2, idx=idx)
    assert mixed["y"].shape == (5, 10) and torch.equal(mixed["y"].sum(dim=1), torch.ones(5))


def test_workers_and_threads_change_no_bit(tmp_path, monkeypatch):
    """0, 1 and 2 fetching workers, 1 and 2 torch threads: the same batches and (exact numerics: native training
    may differ between thread counts, whatever the data) the same trained state."""
    spec = augmented_spec(JITTER, numerics="exact")
    user = cnn_spec(data={"name": "tests.datapkg:augmented_images", "kwargs": {"mixup": 1}}, loss="tests.datapkg:soft_cross_entropy")
    results = set()
    threads = torch.get_num_threads()
    try:
        for workers, nthreads in ((0, 1), (1, 2), (2, 1), (2, 2)):
            monkeypatch.setenv("POL_DATA_WORKERS", str(workers))
            torch.set_num_threads(nthreads)
            digests = (tuple(batch_digests(spec)), tuple(batch_digests(user)))
            rt = engine.build_runtime(spec)
            engine.initial_state(rt)
            engine.run_steps(rt, 4)
            results.add((digests, state_digest(engine.capture_state(rt))))
    finally:
        torch.set_num_threads(threads)
    assert len(results) == 1


RUN = """
import json, sys
from pol import engine
from pol.digest import state_digest
from tests.test_data_pipelines import augmented_spec, batch_digests, JITTER
spec = augmented_spec(JITTER + [{"name": "mixup", "classes": 10, "alpha": 2}])
out = {"batches": batch_digests(spec, 6)}
for numerics in ("native", "exact"):
    spec = augmented_spec(JITTER, numerics=numerics)
    rt = engine.build_runtime(spec)
    engine.initial_state(rt)
    engine.run_steps(rt, 4)
    out[numerics] = state_digest(engine.capture_state(rt))
print(json.dumps(out))
"""


def test_augmented_batches_are_the_same_on_every_instruction_set():
    """ATEN_CPU_CAPABILITY=default against the widest here: the same augmented batches (crop, flip, brightness,
    contrast, mixup) and, in exact numerics, the same trained state."""
    got = []
    for capability in ("default", TOP):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        done = subprocess.run([sys.executable, "-c", RUN], cwd=REPO, env=env, capture_output=True, text=True, check=True)
        got.append(json.loads(done.stdout))
    assert got[0]["batches"] == got[1]["batches"]
    assert got[0]["exact"] == got[1]["exact"]


@pytest.mark.parametrize("numerics", ["native", "exact"])
def test_an_honest_augmented_bundle_is_accepted(tmp_path, numerics):
    _, report = train_verify(augmented_spec(JITTER, numerics=numerics), tmp_path / "b")
    assert report.verdict == "accept", report.to_dict()


def test_training_on_other_augmentation_draws_is_rejected(tmp_path, monkeypatch):
    """A forger who augments with another seed (data order, model and everything else honest) writes a fully
    consistent bundle: replay re-derives the committed augmentation and rejects it."""
    honest = train_and_prove(augmented_spec(CROP_FLIP), tmp_path / "honest").path
    claimed = honest_states(honest)[0]
    original = Augmented.transform

    def other_draws(self, batch, *, seed, step, idx):
        return original(self, batch, seed=seed + 1, step=step, idx=idx)

    monkeypatch.setattr(Augmented, "transform", other_draws)
    states, data, losses = train_states(claimed)
    monkeypatch.setattr(Augmented, "transform", original)
    assert not torch.equal(states[2]["param/conv1.weight"], honest_states(honest)[1][2]["param/conv1.weight"])
    forged = write_forged(tmp_path / "forged", claimed, states, data=data, losses=losses)
    report = verify(forged, segments=[1, 2, 3], seed=0)
    assert report.verdict == "reject", report.to_dict()


def test_the_users_own_transform_and_mixup_train_and_verify(tmp_path):
    """A dataset factory returning pol.augment.Augmented(torch dataset, [crop, flip, the user's Transform, mixup]):
    pinned by the factory's code digest; mixup's probability targets with a user loss."""
    spec = cnn_spec(data={"name": "tests.datapkg:augmented_images", "kwargs": {"mixup": 2}}, loss="tests.datapkg:soft_cross_entropy")
    dataset = build_dataset(spec.data.name, spec.data.kwargs, code=ALLOW)
    _, batch = engine.step_batch(spec, dataset, 0)
    assert batch["y"].shape == (16, 10) and torch.allclose(batch["y"].sum(dim=1), torch.ones(16))
    _, report = train_verify(spec, tmp_path / "b")
    assert report.verdict == "accept", report.to_dict()


def test_the_referee_derives_the_augmented_batch():
    from pinpoint.referee import compute_leaf_value

    spec = augmented_spec(JITTER)
    _, batch = engine.step_batch(spec, build_dataset(spec.data.name, spec.data.kwargs), 3)
    assert torch.equal(compute_leaf_value(spec, 3, "batch/x", tuple(batch["x"].shape)), batch["x"])


def test_the_pol_reference_codes_cifar_case(tmp_path):
    """PoL's reference code trains ResNet-20 on CIFAR-10 with RandomCrop(32, padding=4) and RandomHorizontalFlip:
    here a ResNet-20-shaped network (3 stages of basic blocks with batch norm, scaled down) on pol's 3-channel
    `images`, augmented per sample by the spec's `augment`, trains and verifies."""
    augment = [{"name": "random_crop", "padding": 4}, {"name": "hflip"}]
    spec = spec_from_dict({
        "model": {"name": "tests.datapkg:resnet", "kwargs": {"width": 4, "blocks": 1}},
        "data": {"name": "images", "kwargs": {"n": 128, "size": 16, "channels": 3, "augment": augment}},
        "steps": 6, "every": 2, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    })
    _, report = train_verify(spec, tmp_path / "cifar")
    assert report.verdict == "accept", report.to_dict()
