"""The game commands: `pol game simulate --sampling` and `pol game run --publish`."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def test_simulate_plays_the_sampling_it_is_given() -> None:
    played = {}
    for sampling in ("independent", "shared"):
        result = runner.invoke(app, ["game", "simulate", "--tasks", "60", "--sampling", sampling, "--json"])
        assert result.exit_code == 0, result.output
        played[sampling] = json.loads(result.stdout)
        assert played[sampling]["config"]["params"]["sampling"] == sampling
    assert played["shared"]["protocol_tax"] < played["independent"]["protocol_tax"]  # one sample split, not three
    default = json.loads(runner.invoke(app, ["game", "simulate", "--tasks", "60", "--json"]).stdout)
    assert default == played["independent"]  # the default is unchanged
    refused = runner.invoke(app, ["game", "simulate", "--tasks", "10", "--sampling", "pooled"])
    assert refused.exit_code == 2 and "params.sampling" in refused.output


def test_game_run_refuses_an_unknown_publish_mode(tmp_path: Path) -> None:
    refused = runner.invoke(app, ["game", "run", "--workdir", str(tmp_path / "m"), "--publish", "ftp"])
    assert refused.exit_code == 2 and "market.publish" in refused.output
    assert not (tmp_path / "m").exists()
