"""Read-only views of a ledger for people and tools (what `pol ledger show [--json]` prints)."""

from __future__ import annotations

from typing import Any

from games.ledger import Ledger, event_to_dict, verify_ledger

__all__ = ["ledger_to_dict", "render_ledger"]


def ledger_to_dict(ledger: Ledger, *, last_events: int | None = None, check: bool = True) -> dict[str, Any]:
    """Balances, non-zero escrows, supply, head and events (all, or the last `last_events`) as JSON-ready data.
    With `check`, verifies the ledger first and raises LedgerCorrupt if an invariant is broken; an SQLite ledger
    raises LedgerCorrupt for a stored value of the wrong type even without `check`. Every amount in the result is an
    int of at most MAX_AMOUNT (2**63 - 1): exact in JSON for Python, but above 2**53 a JavaScript reader loses
    precision."""
    if check:
        verify_ledger(ledger)
    events = ledger.events()
    shown = events if last_events is None else events[max(0, len(events) - last_events):]
    return {
        "accounts": dict(sorted(ledger.get_accounts().items())),
        "escrows": {k: v for k, v in sorted(ledger.get_escrows().items()) if v},
        "total_supply": ledger.total_supply(),
        "event_count": len(events),
        "head": ledger.head().hex(),
        "events": [event_to_dict(ev) for ev in shown],
    }


def render_ledger(ledger: Ledger, *, last_events: int = 20) -> str:
    """A plain-text summary: balances, open escrows, supply and the last events. Raises LedgerCorrupt like
    `ledger_to_dict`."""
    data = ledger_to_dict(ledger, last_events=last_events)
    width = max([len(k) for k in (*data["accounts"], *data["escrows"])] + [8])
    lines = [f"supply {data['total_supply']:,}  events {data['event_count']}  head {data['head'][:16]}", "",
             "accounts:"]
    lines += [f"  {k:<{width}} {v:>16,}" for k, v in data["accounts"].items()]
    lines += ["escrows (non-zero):"] + [f"  {k:<{width}} {v:>16,}" for k, v in data["escrows"].items()]
    lines += ["", f"last {len(data['events'])} events:"]
    for ev in data["events"]:
        what = f"{ev['src']} -> {ev['dst']}" if ev["src"] else ev["dst"]
        amount = f"{ev['amount']:,}" if ev["amount"] else ""
        memo = f"  ({ev['memo'][:24]})" if ev["memo"] else ""
        lines.append(f"  #{ev['seq']:<6} {ev['kind']:<8} {amount:>12}  {what}  [{ev['op_id']}]{memo}")
    return "\n".join(lines) + "\n"
