"""A dispute party as a separate process, speaking line-delimited JSON over stdin/stdout.

    venue -> party   {"type": "init", "params": {...}, "now": 0}
    venue -> party   {"type": "entry", "at": MS, "message": {...}}     every accepted message, in order
    venue -> party   {"type": "move"}                                   the party's turn
    party -> venue   {"message": {...}} or {"message": null}            (null: stays silent)
    venue -> party   {"type": "end"}

The party shares nothing with the venue but these lines: it rebuilds the dispute state from the messages with the
same pure `apply_message`, and answers from its own bundle copy and recomputation.

    python -m pinpoint --role solver --bundle B [--fault-step S --fault-node J] [--lie-step M]
    python -m pinpoint --role challenger --bundle B --segment I [--answers disagree]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from pol.bundle import open_bundle

from .capture import Fault
from .errors import ProtocolError
from .messages import Message, message_from_dict
from .parties import Behaviour, Challenger, PartyLike, Solver
from .protocol import DisputeState, Millis, Params, apply_message, new_dispute

__all__ = ["ProcessParty", "party_command", "serve", "main"]


def party_command(role: str, bundle: str | Path, behaviour: Behaviour = Behaviour(), *, segment: int = 0) -> list[str]:
    """The command line that runs one party as a process."""
    cmd = [sys.executable, "-m", "pinpoint", "--role", role, "--bundle", str(bundle), "--segment", str(segment)]
    if behaviour.fault is not None:
        cmd += ["--fault-step", str(behaviour.fault.step), "--fault-node", str(behaviour.fault.node),
                "--fault-element", str(behaviour.fault.element)]
    if behaviour.lie_step is not None:
        cmd += ["--lie-step", str(behaviour.lie_step)]
    if behaviour.answers != "honest":
        cmd += ["--answers", behaviour.answers]
    if behaviour.silent_from is not None:
        cmd += ["--silent-from", behaviour.silent_from]
    if behaviour.seed:
        cmd += ["--seed", str(behaviour.seed)]
    return cmd


class ProcessParty:
    """The venue's handle on a party process. Raises ProtocolError if the process dies or speaks nonsense."""

    def __init__(self, cmd: Sequence[str], params: Params, *, cwd: str | None = None) -> None:
        self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd)
        self._send({"type": "init", "params": params.to_dict(), "now": 0})

    def _send(self, value: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(value, sort_keys=True) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise ProtocolError(f"party process {self.proc.pid} has exited") from None

    def observe(self, at: Millis, message: Message) -> None:
        self._send({"type": "entry", "at": at, "message": message.to_dict()})

    def next_message(self, state: DisputeState) -> Message | None:
        self._send({"type": "move"})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise ProtocolError(f"party process {self.proc.pid} closed its output")
        try:
            value = json.loads(line)["message"]
        except (ValueError, KeyError, TypeError):
            raise ProtocolError(f"party process {self.proc.pid} sent a line that is not a message") from None
        return None if value is None else message_from_dict(value)

    def close(self) -> int:
        """Tell the process to end and wait for it. Returns its exit status."""
        try:
            self._send({"type": "end"})
        except ProtocolError:
            pass
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:  # the process is gone and the pipe with it
                pass
        code = self.proc.wait(timeout=60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def serve(party: PartyLike, source: IO[str], sink: IO[str]) -> None:
    """Answer the venue's lines until it says end. Raises ProtocolError on a refused entry (venue and party disagree)."""
    state: DisputeState | None = None
    for line in source:
        request = json.loads(line)
        kind = request["type"]
        if kind == "init":
            p = request["params"]
            state = new_dispute(Params(p["budget_ms"], p["commitment"], p["max_reveal_bytes"]), request["now"])
        elif kind == "entry":
            assert state is not None, "init comes first"
            message = message_from_dict(request["message"])
            state = apply_message(state, message, request["at"])
            party.observe(request["at"], message)
        elif kind == "move":
            assert state is not None, "init comes first"
            reply = party.next_message(state)
            sink.write(json.dumps({"message": None if reply is None else reply.to_dict()}, sort_keys=True) + "\n")
            sink.flush()
        elif kind == "end":
            return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pinpoint", description="one party of a pinpoint dispute")
    parser.add_argument("--role", choices=("solver", "challenger"), required=True)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--segment", type=int, default=0)
    parser.add_argument("--fault-step", type=int)
    parser.add_argument("--fault-node", type=int)
    parser.add_argument("--fault-element", type=int, default=0)
    parser.add_argument("--lie-step", type=int)
    parser.add_argument("--answers", choices=("honest", "disagree", "agree", "random", "dispute-structure"), default="honest")
    parser.add_argument("--silent-from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    fault = Fault(args.fault_step, args.fault_node, args.fault_element) if args.fault_step is not None else None
    behaviour = Behaviour(fault=fault, lie_step=args.lie_step, answers=args.answers, silent_from=args.silent_from,
                          seed=args.seed)
    bundle = open_bundle(args.bundle)
    party: PartyLike
    if args.role == "solver":
        party = Solver(bundle, behaviour, device=args.device)
    else:
        party = Challenger(bundle, args.segment, behaviour, device=args.device)
    serve(party, sys.stdin, sys.stdout)
    return 0
