"""The economic simulation: under the default parameters every dishonest strategy loses money and every honest
one earns, on a seeded run large enough for the signs to be several standard errors clear."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from games.errors import BadMove
from games.simulate import (
    SimConfig,
    compute_break_even,
    compute_detection_probability,
    compute_sim_costs,
    render_markdown,
    report_to_dict,
    save_plot,
    simulate,
)
from games.task import GameParams, compute_segments


@pytest.fixture(scope="module")
def report():  # type: ignore[no-untyped-def]
    return simulate(SimConfig(n_tasks=6_000, seed=7))


def test_headline_dishonesty_loses_and_honesty_earns(report) -> None:  # type: ignore[no-untyped-def]
    by_role = {r.strategy: r for r in report.strategies}
    assert {"solver honest", "verifier honest", "verifier lazy"} <= set(by_role)
    assert sum(1 for r in report.strategies if r.role == "solver" and not r.honest) == 4
    for r in report.strategies:
        if r.role == "submitter":
            continue
        if r.honest:
            assert r.mean_profit - 3 * r.stderr > 0, f"{r.strategy} should earn: {r}"
            assert r.loss_rate == 0, f"honest {r.strategy} lost its stake"
        else:
            assert r.mean_profit + 3 * r.stderr < 0, f"{r.strategy} should lose: {r}"
            assert r.break_even_stake is not None
    params = GameParams()
    assert report.min_unprofitable_bond < params.solver_bond
    assert report.min_unprofitable_stake < params.verifier_stake
    assert report.forced_errors > 0 and report.disputes > 0
    assert report.jackpot_end > 0


def test_honest_solver_earns_exactly_its_margin(report) -> None:  # type: ignore[no-untyped-def]
    honest = next(r for r in report.strategies if r.strategy == "solver honest")
    p, cfg = GameParams(), SimConfig()
    pay = cfg.price - cfg.price * (p.verifier_share_bps + p.jackpot_tax_bps) // 10_000
    proof = compute_sim_costs(cfg)[0]  # it writes its checkpoints: the proof's compute, net of which it earns
    assert 0 < proof < 0.2 * cfg.train_cost
    assert honest.mean_profit == pytest.approx(pay - cfg.train_cost - proof)
    assert honest.mean_compute == pytest.approx(cfg.train_cost + proof)


def test_report_renders(report, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text = render_markdown(report)
    for r in report.strategies:
        assert f"| {r.strategy} |" in text
    data = json.loads(json.dumps(report_to_dict(report)))
    assert data["n_tasks"] == 6_000 and len(data["strategies"]) == len(report.strategies)
    png = save_plot(report, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeded_runs_repeat_and_seeds_differ() -> None:
    small = SimConfig(n_tasks=150, seed=3)
    assert simulate(small) == simulate(small)
    assert simulate(small) != simulate(dataclasses.replace(small, seed=4))


def test_bond_size_decides_whether_small_cheats_pay() -> None:
    """With a tiny bond a cheater faking very few segments profits; the default bond stops it."""
    mix = ((0.0, 0.5), (0.005, 0.5))
    cheap = simulate(SimConfig(n_tasks=1_500, seed=1, solver_mix=mix,
                               params=dataclasses.replace(GameParams(), solver_bond=1)))
    cheat = next(r for r in cheap.strategies if r.strategy == "solver cheat f=0.005")
    assert cheat.mean_profit > 0
    assert cheat.break_even_stake is not None and cheat.break_even_stake > 1


def test_detection_probability_matches_replay_sampling() -> None:
    rng = random.Random(5)
    n, s, f, trials = 200, 8, 0.1, 3_000
    hits = 0
    for _ in range(trials):
        fakes = {i for i in range(n) if rng.random() < f}
        beacon = rng.randbytes(32)
        hits += bool(fakes & set(compute_segments(beacon, "v", n, s)))
    p = compute_detection_probability(f, s)
    assert abs(hits / trials - p) < 4 * (p * (1 - p) / trials) ** 0.5


def test_break_even_is_linear_in_the_stake() -> None:
    assert compute_break_even(-100.0, 0.5, 1_000) == 800.0
    assert compute_break_even(100.0, 0.5, 1_000) == 1_200.0
    assert compute_break_even(-5_000.0, 0.5, 1_000) == 0.0
    assert compute_break_even(10.0, 0.0, 1_000) is None


@pytest.mark.parametrize("change", [
    {"n_tasks": 0},
    {"solver_mix": ()},
    {"solver_mix": ((1.5, 1.0),)},
    {"price": 10**9},
    {"params": dataclasses.replace(GameParams(), sample_count=0)},
])
def test_bad_config_is_refused(change: dict) -> None:
    with pytest.raises(BadMove):
        simulate(dataclasses.replace(SimConfig(n_tasks=10), **change))
