"""A process killed with SIGKILL in the middle of a settlement on the SQLite ledger: the reopened file is
consistent (supply conserved, event chain intact), and re-running the settlement with the same op ids finishes it
exactly once (same balances and the same number of events as one clean run)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from games.ledger import Ledger, Operation, verify_ledger
from games.ledger_memory import MemoryLedger
from games.ledger_sqlite import SqliteLedger

ROOT = Path(__file__).resolve().parents[2]

PARTIES = ["submitter", "solver", "v0", "v1", "v2", "whistle", "jackpot"]


def settlement_plan() -> list[tuple[str, Operation]]:
    """A multi-operation settlement: fund, lock fee/bond/stakes for several tasks, then pay out and slash."""
    plan: list[tuple[str, Operation]] = []
    for p in PARTIES:
        plan.append((f"open/{p}", Operation("open", dst=p)))
        plan.append((f"mint/{p}", Operation("mint", dst=p, amount=100_000)))
    for t in range(6):
        esc = f"task/{t}"
        plan.append((f"{esc}/fee", Operation("lock", src="submitter", dst=f"{esc}/fee", amount=1_500)))
        plan.append((f"{esc}/bond", Operation("lock", src="solver", dst=f"{esc}/bond", amount=3_000)))
        for v in ("v0", "v1", "v2"):
            plan.append((f"{esc}/stake/{v}", Operation("lock", src=v, dst=f"{esc}/stake/{v}", amount=5_000)))
        plan.append((f"{esc}/pay/solver", Operation("release", src=f"{esc}/fee", dst="solver", amount=1_120)))
        plan.append((f"{esc}/tax", Operation("release", src=f"{esc}/fee", dst="jackpot", amount=70)))
        plan.append((f"{esc}/refund", Operation("release", src=f"{esc}/fee", dst="submitter", amount=100)))
        for i, v in enumerate(("v0", "v1", "v2")):
            plan.append((f"{esc}/reward/{v}", Operation("release", src=f"{esc}/fee", dst=v, amount=70)))
            if t % 3 == 2 and i == 1:  # a lazy verifier caught by the whistleblower
                plan.append((f"{esc}/slash/{v}",
                             Operation("slash", src=f"{esc}/stake/{v}", dst="whistle", amount=5_000)))
            else:
                plan.append((f"{esc}/unstake/{v}",
                             Operation("release", src=f"{esc}/stake/{v}", dst=v, amount=5_000)))
        plan.append((f"{esc}/unbond", Operation("release", src=f"{esc}/bond", dst="solver", amount=3_000)))
        plan.append((f"{esc}/transfer", Operation("transfer", src="jackpot", dst="whistle", amount=7)))
    return plan


CHILD = """
import sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
from test_games_ledger_crash import settlement_plan
from games.ledger_sqlite import SqliteLedger
ledger = SqliteLedger({path!r})
print("ready", flush=True)
for op_id, op in settlement_plan():
    ledger.apply(op_id, op)
    print("op", flush=True)
    time.sleep({pause})
print("done", flush=True)
"""


def run_plan(ledger: Ledger) -> None:
    for op_id, op in settlement_plan():
        ledger.apply(op_id, op)


def spawn(path: Path, pause: float) -> subprocess.Popen[str]:
    code = CHILD.format(root=str(ROOT), here=str(Path(__file__).parent), path=str(path), pause=pause)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_settlement_then_rerun_completes_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    SqliteLedger(path, b"crash-seed").close()
    clean = MemoryLedger(b"crash-seed")
    run_plan(clean)
    total = len(settlement_plan())
    rng = random.Random(1234)
    progress = []
    for attempt in range(6):
        child = spawn(path, pause=0.0 if attempt % 2 else 0.001)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for _ in range(rng.randrange(1, total // 3)):  # let it get a random way into the settlement
            if child.stdout.readline().strip() != "op":
                break
        time.sleep(rng.uniform(0.0, 0.002))  # then kill at an arbitrary instant, often inside a transaction
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        with SqliteLedger(path) as ledger:
            verify_ledger(ledger)  # consistent: supply conserved, chain intact, nothing negative
            done = len(ledger.events())
            assert done <= total
            assert ledger.events() == clean.events()[:done], "a prefix of the one true settlement"
            progress.append(done)
    assert 0 < progress[0] < total, f"the first child should have been killed mid-way: {progress}"
    assert progress == sorted(progress), "no operation was lost"
    child = spawn(path, pause=0.0)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and out.split()[-1] == "done"
    with SqliteLedger(path) as ledger:
        verify_ledger(ledger)
        assert ledger.get_accounts() == clean.get_accounts()
        assert ledger.get_escrows() == clean.get_escrows()
        assert ledger.events() == clean.events(), "every operation applied exactly once"
        run_plan(ledger)  # and once more: nothing is paid twice
        assert len(ledger.events()) == total
        assert ledger.get_accounts() == clean.get_accounts()


CONCURRENT = """
import sys
sys.path.insert(0, {root!r})
from games.ledger import Operation
from games.ledger_sqlite import SqliteLedger
ledger = SqliteLedger({path!r})
for i in range(60):
    ledger.apply(f"shared/{{i}}", Operation("transfer", src="a", dst="b", amount=1))
    ledger.apply(f"own/{me}/{{i}}", Operation("transfer", src="a", dst="c", amount=1))
print("done", flush=True)
"""


def test_two_processes_share_one_sqlite_ledger(tmp_path: Path) -> None:
    """Parties in separate processes submit overlapping op ids to one file: each operation lands exactly once."""
    path = tmp_path / "shared.db"
    with SqliteLedger(path, b"shared") as ledger:
        for p in ("a", "b", "c"):
            ledger.apply(f"open/{p}", Operation("open", dst=p))
        ledger.apply("mint/a", Operation("mint", dst="a", amount=1_000))
    children = [subprocess.Popen([sys.executable, "-c", CONCURRENT.format(root=str(ROOT), path=str(path), me=me)],
                                 stdout=subprocess.PIPE, text=True) for me in ("x", "y")]
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0 and out.strip() == "done"
    with SqliteLedger(path) as ledger:
        verify_ledger(ledger)
        assert ledger.get_accounts() == {"a": 1_000 - 60 - 120, "b": 60, "c": 120}
        assert len(ledger.events()) == 4 + 60 + 120
