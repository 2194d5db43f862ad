"""The market over served bundles: solvers publish over loopback HTTP, verifiers and the referee fetch by URL."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest

from games.errors import MarketError
from games.market import (
    JOURNAL_NAME,
    HttpPublisher,
    MarketEvent,
    MarketReport,
    get_market_params,
    replay_dispute,
    run_market,
)
from pol.bundle import open_bundle
from pol.remote import Limits
from pol.spec import spec_from_dict

SPEC = spec_from_dict({"model": {"name": "mlp", "kwargs": {"hidden": 16}},
                       "data": {"name": "synthetic", "kwargs": {"n": 256}},
                       "steps": 16, "every": 2, "batch_size": 8})
PARAMS = dataclasses.replace(get_market_params(SPEC), forced_error_bps=0, sample_count=2)
BUNDLE = "tasks/job-0/honest"  # the honest solver's bundle of the first task, as its publisher names it
FAST = Limits(request_timeout=5.0, retries=0, backoff=0.01)  # a server that is gone fails at once


def _market(workdir: Path, **kwargs) -> MarketReport:  # type: ignore[no-untyped-def]
    options = {"spec": SPEC, "params": PARAMS, "n_tasks": 1, "n_solvers": 1, "n_verifiers": 2, "cheaters": (),
               "sampling": "independent", **kwargs}
    return run_market(workdir, **options)


def _outcome(report: MarketReport) -> list[tuple[str, str, tuple[tuple[str, int], ...]]]:
    return [(t.winner, t.outcome, t.changes) for t in report.tasks]


def test_served_market_pays_and_catches_as_the_local_one(tmp_path: Path) -> None:
    both = {"n_tasks": 2, "n_solvers": 2, "cheaters": ("solver-2",)}
    local = _market(tmp_path / "local", **both)
    served = _market(tmp_path / "served", publish="http", **both)
    assert [t.outcome for t in local.tasks] == ["solver_wrong", "accepted"]  # the cheater caught, the honest one paid
    assert _outcome(served) == _outcome(local) and served.balances == local.balances
    assert [t.location for t in local.tasks] == ["", ""]
    journal = json.loads((tmp_path / "served" / JOURNAL_NAME).read_text())["work"]
    for task in served.tasks:
        assert task.location.startswith("http://127.0.0.1:")  # the URL posted with the commitment, journaled too
        assert journal[f"published/{task.task_id}/r0"] == task.location
    assert sorted(p.name for p in (tmp_path / "served" / "cache").iterdir()) == ["referee", "verifier-1", "verifier-2"]


def test_verifiers_fetch_only_the_manifest_and_their_checkpoints(tmp_path: Path) -> None:
    with HttpPublisher() as publisher:
        report = _market(tmp_path, publish=publisher)
    (task,) = report.tasks
    assert task.outcome == "accepted"
    with open_bundle(tmp_path / BUNDLE) as b:
        steps, n_files = [r.step for r in b.records], len(b.manifest.files)

    def needed(segments: tuple[int, ...]) -> set[str]:  # the step-0 state (checked against the seed) and the ends
        ends = {steps[0]} | {steps[s] for s in segments} | {steps[s + 1] for s in segments}
        return {f"/checkpoints/step-{step:09d}.safetensors" for step in ends}

    gets = [r.path for r in publisher.servers[BUNDLE].requests if r.method == "GET"]
    wanted = [needed(v.segments) for v in task.verifications]
    assert gets.count("/manifest.json") == len(task.verifications)
    checkpoints = [g for g in gets if g != "/manifest.json"]
    assert set(checkpoints) == set().union(*wanted)  # nothing else: the other checkpoints were never fetched
    assert len(checkpoints) == sum(len(w) for w in wanted)  # each verifier fetched each of its checkpoints once
    assert len(set(checkpoints)) < n_files


def _swap_checkpoints(bundle: Path) -> None:
    """What a lying server does after the commitment: serve other bytes (of the same size) for every checkpoint
    but the first."""
    for path in sorted((bundle / "checkpoints").iterdir())[1:]:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("referee", ["default", "replay"])
def test_a_checkpoint_swapped_after_the_commitment_slashes_the_solver(tmp_path: Path, referee: str) -> None:
    def on_event(event: MarketEvent) -> None:
        if event.kind == "commit":
            _swap_checkpoints(tmp_path / BUNDLE)

    dispute = {} if referee == "default" else {"dispute": functools.partial(replay_dispute, cache_dir=tmp_path / "ref")}
    report = _market(tmp_path, publish="http", on_event=on_event, **dispute)
    (task,) = report.tasks
    assert all(v.verdict == "reject" and "bundle integrity" in v.reason for v in task.verifications)
    assert task.outcome == "solver_wrong" and {d.ruling for d in task.disputes} == {"solver_wrong"}
    changes = dict(task.changes)
    assert changes["solver-1"] == -PARAMS.solver_bond  # not paid, its bond slashed
    assert changes["verifier-1"] > 0 and changes["verifier-2"] > 0  # the verifiers keep their stakes and share it


def test_a_server_that_stops_answering_is_a_cannot_verify_vote_and_no_payment(tmp_path: Path) -> None:
    with HttpPublisher(limits=FAST) as publisher:
        def on_event(event: MarketEvent) -> None:
            if event.kind == "commit":
                publisher.stop(BUNDLE)

        report = _market(tmp_path, publish=publisher, on_event=on_event)
    (task,) = report.tasks
    assert [v.verdict for v in task.verifications] == ["unavailable", "unavailable"]  # never an approval
    for v in task.verifications:
        assert v.reason.startswith("cannot verify: the bundle is unavailable (Remote")
        assert v.failed == v.segments
    assert task.outcome == "solver_wrong"
    assert all("referee" in d.description and "unavailable" in d.description for d in task.disputes)
    changes = dict(task.changes)
    assert changes["solver-1"] == -PARAMS.solver_bond and "submitter" not in changes  # not paid; the fee refunded
    assert changes["verifier-1"] >= 0 and changes["verifier-2"] >= 0


def test_an_unknown_publish_mode_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(MarketError) as caught:
        _market(tmp_path / "m", publish="ftp")
    assert caught.value.rule == "market.publish"
    assert not (tmp_path / "m").exists()


def test_pinpoint_party_processes_open_a_served_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pinpoint.party import party_command
    from pinpoint.runner import run_dispute
    from pol.serve import serve_in_thread

    _market(tmp_path / "m", cheaters=("solver-1",))
    monkeypatch.setenv("POL_CACHE_DIR", str(tmp_path / "cache"))  # the party processes' pol.remote cache
    with serve_in_thread(tmp_path / "m" / "tasks" / "job-0" / "forged") as server:
        segment = PARAMS.n_segments - 1  # forged: the second half
        result = run_dispute(server.url, segment, solver_cmd=party_command("solver", server.url),
                             challenger_cmd=party_command("challenger", server.url, segment=segment))
    assert result.outcome.loser == "solver"


class _Flaky:
    """A publisher whose server is down while the verifiers fetch and back (same URL) when the referee does."""

    limits = FAST

    def __init__(self) -> None:
        from contextlib import ExitStack

        self.stack, self.servers = ExitStack(), {}  # type: ignore[var-annotated]

    def publish(self, name: str, bundle: Path) -> str:
        from pol.serve import serve_in_thread

        self.bundle, self.server = bundle, self.stack.enter_context(serve_in_thread(bundle))
        return self.server.url

    def restart(self) -> None:
        from pol.serve import serve_in_thread

        port = int(self.server.url.rsplit(":", 1)[1].strip("/"))
        self.stack.enter_context(serve_in_thread(self.bundle, port=port))


def test_crying_unavailable_over_a_bundle_the_referee_fetches_costs_the_stake(tmp_path: Path) -> None:
    publisher = _Flaky()

    def on_event(event: MarketEvent) -> None:
        if event.kind == "commit":
            publisher.server.stop()
        if event.kind == "reveal":  # before the dispute: the bundle is served again
            publisher.restart()

    with publisher.stack:
        report = _market(tmp_path, publish=publisher, on_event=on_event)
    (task,) = report.tasks
    assert [v.verdict for v in task.verifications] == ["unavailable", "unavailable"]
    assert task.outcome == "challenger_wrong"  # the referee fetched and replayed: the solver was right
    changes = dict(task.changes)
    assert changes["verifier-1"] == changes["verifier-2"] == -PARAMS.verifier_stake and changes["solver-1"] > 0


class _TwoFaced:
    """A publisher whose server, once the dispute is near, shows the committed manifest to the first request for it
    and another (honest) bundle of the same spec to every later request, checkpoints included."""

    limits = FAST

    def __init__(self, other: Path) -> None:
        from contextlib import ExitStack

        self.stack, self.servers, self.other, self.armed, self.manifests = ExitStack(), {}, other, False, 0  # type: ignore[var-annotated]

    def publish(self, name: str, bundle: Path) -> str:
        from pol.serve import serve_in_thread
        from tests.test_remote import directory_files, hostile

        committed, other = directory_files(bundle), directory_files(self.other)

        def files(path: str) -> bytes | None:
            if not self.armed:
                return committed(path)
            if path == "manifest.json":
                self.manifests += 1
                return committed(path) if self.manifests == 1 else other(path)
            return other(path) if self.manifests > 1 else committed(path)

        server = self.servers[name] = self.stack.enter_context(serve_in_thread(hostile(files)))
        return server.url


@pytest.mark.parametrize("referee", ["default", "replay"])
def test_a_server_that_shows_the_referee_two_manifests_cannot_win_the_dispute(tmp_path: Path, referee: str) -> None:
    """The cheater's server answers the referee's first look with the committed manifest, then with an honest
    bundle's: the referee opens the bundle once and the dispute runs on what it checked, so the cheater loses."""
    from pol.prove import train_and_prove

    other = train_and_prove(SPEC, tmp_path / "other").path
    publisher = _TwoFaced(other)

    def on_event(event: MarketEvent) -> None:
        if event.kind == "dispute":  # the referee has checked the job; the ruling is next
            publisher.armed = True

    dispute = {} if referee == "default" else {"dispute": functools.partial(replay_dispute, cache_dir=tmp_path / "ref")}
    with publisher.stack:
        report = _market(tmp_path, publish=publisher, on_event=on_event, cheaters=("solver-1",), **dispute)
    (task,) = report.tasks
    assert publisher.manifests >= 1  # the referee looked while the server was two-faced
    assert task.outcome == "solver_wrong" and {d.ruling for d in task.disputes} == {"solver_wrong"}, task.disputes
    assert dict(task.changes)["solver-1"] == -PARAMS.solver_bond
