"""No code from a transcript, a peer or a bundle in disputes: a spec naming code to run (os:system,
subprocess:getoutput, builtins:exec, a module in the working directory) makes `run_dispute`, `export_graph`,
`check_transcript` and the party process refuse with CodeNotAllowed ("cannot check", exit 2) before anything is
imported, and nothing it names ever runs. What the referee does build is only what the policy allows, and the data
it re-derives must be the committed data."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pinpoint.capture import Fault, capture_step
from pinpoint.graph import LEAF_OP
from pinpoint.messages import Message, NodeAnswer, Open, Timeout
from pinpoint.parties import Behaviour, Challenger, train_with_fault
from pinpoint.party import main as party_main
from pinpoint.party import party_command
from pinpoint.protocol import DisputeState, Params, apply_message, new_dispute
from pinpoint.referee import MAX_DERIVED_ELEMENTS, compute_leaf_value
from pinpoint.runner import TRANSCRIPT_FORMAT, check_transcript, export_graph, run_dispute
from pol.bundle import Bundle, open_bundle
from pol.components import CodePolicy, compute_code_digest
from pol.errors import CodeDiffers, CodeNotAllowed, ComponentError, DataDiffers
from pol.spec import Component

from .helpers import CODE, with_spec

EVIL = {  # (spec field, name, kwargs): each would create the marker file if anything called it
    "os-system": ("data", "os:system", {"command": "touch MARKER"}),
    "subprocess": ("model", "subprocess:getoutput", {"cmd": "touch MARKER"}),
    "builtins-exec": ("model", "builtins:exec", {"source": "open('MARKER', 'w').close()"}),
    "module-in-the-working-directory": ("data", "evilmod:make", {}),
}
EVILMOD = "open('MARKER', 'w').close()\n\n\ndef make():\n    open('MARKER', 'w').close()\n"


@pytest.fixture
def evil_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory: it holds a module that writes the marker the moment it is imported."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "evilmod.py").write_text(EVILMOD)
    monkeypatch.chdir(work)
    return work


def _evil_bundle(honest: Path, work: Path, case: str, code: str = CODE) -> Path:
    field, name, kwargs = EVIL[case]
    return with_spec(honest, work / f"bundle-{case}", **{field: {"name": name, "kwargs": kwargs, "code": code}})


def _transcript(bundle: Path, out: Path) -> Path:
    """A transcript whose (valid) Open names the bundle's spec, ending in a Timeout: what a third party is handed."""
    with open_bundle(bundle) as b:
        params = Params(budget_ms=1000, commitment=b.manifest.root)
        state = new_dispute(params, 0)
        opening = Open(0, state.head, spec=b.spec.to_dict(), commitment=b.manifest.root, merkle_root=b.manifest.merkle_root,
                       n_records=len(b.records), segment=0, start=b.records[0].to_dict(), end=b.records[1].to_dict(),
                       start_proof=b.proof(0).siblings, end_proof=b.proof(1).siblings)
    opened = apply_message(state, opening, 10)  # the state machine accepts it: only the code policy refuses it
    timeout = Timeout(1, opened.head, claimant="challenger")
    over = apply_message(opened, timeout, 1010)
    assert over.outcome is not None
    body = {"format": TRANSCRIPT_FORMAT, "version": 1, "params": params.to_dict(), "start": 0,
            "entries": [{"at": 10, "message": opening.to_dict()}, {"at": 1010, "message": timeout.to_dict()}],
            "outcome": over.outcome.to_dict(), "head": over.head, "rounds": over.rounds, "bytes": over.bytes}
    out.write_text(json.dumps(body))
    return out


@pytest.mark.parametrize("case", sorted(EVIL))
def test_disputes_refuse_code_before_importing(honest_bundles, evil_dir, case):
    path = _evil_bundle(honest_bundles["mlp"], evil_dir, case)
    transcript = _transcript(path, evil_dir / "t.json")
    name = EVIL[case][1]
    for call in (lambda: run_dispute(path, 0), lambda: export_graph(path, 0, evil_dir / "g.json"),
                 lambda: run_dispute(path, 0, solver_cmd=["false"], challenger_cmd=["false"])):
        with pytest.raises(CodeNotAllowed, match="code not allowed") as caught:
            call()
        assert name in str(caught.value) and caught.value.exit_code == 2
    # a third party checks what the transcript holds and builds nothing for it (here: a timeout), so naming code
    # does not stop the check, and nothing named runs; a ruling that needs the code is refused (see below)
    assert check_transcript(transcript).outcome.loser == "solver"
    assert party_main(["--role", "solver", "--bundle", str(path)]) == 2
    assert party_main(["--role", "challenger", "--bundle", str(path), "--allow-code", "somethingelse"]) == 2
    assert not (evil_dir / "MARKER").exists()
    assert not (evil_dir / "g.json").exists()


def test_the_party_process_exits_2_on_code_it_is_not_allowed(honest_bundles, evil_dir):
    path = _evil_bundle(honest_bundles["mlp"], evil_dir, "os-system")
    done = subprocess.run(party_command("solver", path), stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    assert done.returncode == 2 and b"code not allowed" in done.stderr, done.stderr[-2000:]
    assert not (evil_dir / "MARKER").exists()


def test_the_party_process_does_not_import_from_its_working_directory(honest_bundles, evil_dir):
    """Even allowed and pinned by its exact digest, a module that is only in the working directory is not found:
    the party runs as `python -P`. The control run without -P imports it (the marker appears), so the test bites."""
    sys.path.insert(0, str(evil_dir))
    try:
        digest = compute_code_digest("evilmod:make")  # reads the file, imports nothing
    finally:
        sys.path.remove(str(evil_dir))
    path = _evil_bundle(honest_bundles["mlp"], evil_dir, "module-in-the-working-directory", code=digest)
    cmd = party_command("challenger", path, Behaviour(), code=CodePolicy.allowing(["evilmod"]))
    assert cmd[1] == "-P"
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    assert done.returncode == 2 and b"not installed" in done.stderr, done.stderr[-2000:]
    assert not (evil_dir / "MARKER").exists()
    control = subprocess.run([cmd[0], *cmd[2:]], stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    assert (evil_dir / "MARKER").exists(), control.stderr[-2000:]


def test_a_transcript_nested_100000_deep_or_too_large_is_refused(tmp_path, monkeypatch):
    from pinpoint.errors import TranscriptError

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TranscriptError, match="deeper than 64"):
        check_transcript(deep)
    big = tmp_path / "big.json"
    big.write_text(" " * 2000 + "{}")
    with pytest.raises(TranscriptError, match="more than the 1000 allowed"):
        check_transcript(big, max_bytes=1000)
    with pytest.raises(TranscriptError, match="not a regular file"):
        check_transcript("/dev/zero")
    real_fstat = os.fstat
    with monkeypatch.context() as patched:  # a file that grows between its size check and its reading
        patched.setattr(os, "fstat", lambda fd: os.stat_result((stat.S_IFREG | 0o644, *real_fstat(fd)[1:6], 0, 0, 0, 0)))
        with pytest.raises(TranscriptError, match="grew beyond 1000 bytes"):
            check_transcript(big, max_bytes=1000)


@pytest.fixture(scope="module")
def faulty_mlp(honest_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Fault]:
    """The tiny MLP bundle trained with one corrupted matrix product at step 1 (segment 0)."""
    with open_bundle(honest_bundles["mlp"]) as b:
        graph = capture_step(b, 1)
        spec = b.spec
    fault = Fault(1, next(n.index for n in graph.nodes if n.op == "aten.addmm.default"), 5)
    return train_with_fault(spec, tmp_path_factory.mktemp("faulty") / "mlp", fault), fault


def _forbid_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    import pinpoint.referee as referee

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the referee built a model or data")

    for name in ("build_dataset", "build_model", "verify_code"):
        monkeypatch.setattr(referee, name, forbidden)


class _NodeTarget:
    """A challenger that disagrees down to step 4 and then narrows the node bisection onto node `node`."""

    def __init__(self, bundle: Bundle, node: int) -> None:
        self.inner = Challenger(bundle, 1, Behaviour(answers="disagree"))
        self.node = node

    def observe(self, at: int, message: Message) -> None:
        self.inner.observe(at, message)

    def refused(self, reason: str) -> None:
        raise AssertionError(reason)

    def next_message(self, state: DisputeState, timeout: float | None = None) -> Message | None:
        message = self.inner.next_message(state, timeout)
        if isinstance(message, NodeAnswer):
            return dataclasses.replace(message, agree=message.length <= self.node)
        return message


def test_checking_an_operator_or_state_ruling_builds_nothing(faulty_mlp, honest_bundles, tmp_path, monkeypatch):
    """Rulings on an operator node, a state leaf and the state node are re-checked from the transcript alone; a
    re-derived leaf (the batch) is the one that builds the data."""
    path, fault = faulty_mlp
    honest = honest_bundles["mlp"]
    with open_bundle(honest) as b:
        state_leaf = run_dispute(b, 1, challenger_party=_NodeTarget(b, 4), transcript=tmp_path / "leaf.json")
    runs = {
        "op.json": run_dispute(path, 0, solver=Behaviour(fault=fault), transcript=tmp_path / "op.json"),
        "leaf.json": state_leaf,
        "state.json": run_dispute(honest, 1, challenger=Behaviour(answers="agree"), transcript=tmp_path / "state.json"),
    }
    batch = run_dispute(honest, 1, challenger=Behaviour(answers="disagree"), transcript=tmp_path / "batch.json")
    assert runs["op.json"].op == "aten.addmm.default" and runs["op.json"].referee_executed == 1
    assert (state_leaf.op, state_leaf.node, state_leaf.outcome.loser) == (LEAF_OP, 4, "challenger")
    assert "param/" in state_leaf.outcome.reason and runs["state.json"].op == "pol.state"
    assert "batch/x" in batch.outcome.reason
    with monkeypatch.context() as patched:
        _forbid_builds(patched)
        for name, result in runs.items():
            assert check_transcript(tmp_path / name).outcome == result.outcome
        with pytest.raises(AssertionError, match="built"):  # the guard bites: re-deriving the batch builds the data
            check_transcript(tmp_path / "batch.json")
    assert check_transcript(tmp_path / "batch.json", code=CodePolicy.allowing(["unrelated"])).outcome == batch.outcome


def test_re_derived_leaves_build_only_what_the_policy_allows(honest_bundles, evil_dir):
    with open_bundle(honest_bundles["mlp"]) as b:
        spec = b.spec
    x = compute_leaf_value(spec, 3, "batch/x", (16, 16))
    assert x.shape[0] == spec.batch_size
    with open_bundle(_evil_bundle(honest_bundles["mlp"], evil_dir, "os-system")) as b:
        evil = b.spec
    for name in ("batch/x", "rng/dropout/0/0/0", "module/anything"):
        with pytest.raises(CodeNotAllowed):
            compute_leaf_value(evil, 3, name, (16, 4))
    with pytest.raises((ComponentError, CodeDiffers)):  # allowed, but not installed as pinned: nothing imported
        compute_leaf_value(evil.replace(data=Component("evilmod:make", {}, CODE)), 3, "batch/x", (16, 4),
                           code=CodePolicy.allowing(["evilmod"]))
    assert not (evil_dir / "MARKER").exists()
    with pytest.raises(DataDiffers):
        compute_leaf_value(spec.replace(data_digest="0" * 64), 3, "batch/y", (16,))
    with pytest.raises(ValueError, match="beyond"):
        compute_leaf_value(spec, 3, "rng/dropout/0/0/0", (16, MAX_DERIVED_ELEMENTS))
    assert torch.equal(x, compute_leaf_value(spec, 3, "batch/x", (16, 16), code=CodePolicy.trust_all_code()))
