"""A dispute party as a separate process, speaking line-delimited JSON over stdin/stdout.

    venue -> party   {"type": "init", "params": {...}, "now": 0}
    venue -> party   {"type": "entry", "at": MS, "message": {...}}            every accepted message, in order
    venue -> party   {"type": "move", "seq": N, "head": H, "ms_left": MS}     the party's turn (again after a refusal)
    venue -> party   {"type": "refused", "reason": "..."}                     its last line was refused
    party -> venue   {"message": {...}} or {"message": null}                  (null: stays silent)
    venue -> party   {"type": "end"}

The party shares nothing with the venue but these lines: it rebuilds the dispute state from the messages with the
same pure `apply_message`, and answers from its own bundle copy and recomputation.

The venue never blocks on a party (`ProcessParty`): it writes without blocking (what the pipe cannot take yet waits
in memory), and reads a party's line only while that party's clock runs, with `poll` and a deadline, never a
blocking `readline`. A line longer than `compute_message_limit(params)` plus a small envelope is refused after that
many bytes: the rest of it is read and dropped, never held. A line that is not JSON, nests too deep, or is not a
message is refused (MalformedMessage); what the state machine then refuses is the venue's business
(`pinpoint.runner.run_parties`): each refusal costs the sender its clock time and counts towards `max_refused`.
A party process that closes its output is silent. The process's start-up is charged to its clock.

    python -m pinpoint --role solver --bundle B [--fault-step S --fault-node J] [--lie-step M] [--allow-code PKG]
    python -m pinpoint --role challenger --bundle B --segment I [--answers disagree] [--allow-code PKG]

The party imports only the user code it is allowed (`--allow-code PKG`, repeatable; pol's built-ins always): a
bundle naming other code ends the process with exit status 2 (CodeNotAllowed) before anything is imported. It is
started with `python -P`, so its working directory is not on sys.path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from pol.bundle import open_bundle
from pol.canonical import parse_json_strict
from pol.components import CodePolicy
from pol.engine import verify_code
from pol.errors import PolError

from .capture import Fault
from .errors import MalformedMessage, ProtocolError
from .messages import Message, message_from_dict
from .parties import ANSWERS, Behaviour, Challenger, PartyLike, Solver
from .protocol import DisputeState, Millis, Params, apply_message, compute_message_limit, new_dispute, params_from_dict

__all__ = ["ProcessParty", "party_command", "parse_party_line", "serve", "main", "ENVELOPE_BYTES", "CLOSE_GRACE_S"]

ENVELOPE_BYTES = 64 << 10  # a line's bytes besides its message: {"message": ...}, {"type": "entry", "at": ...}
CLOSE_GRACE_S = 2.0  # how long a party process may take to exit after "end" before it is killed
_CHUNK = 1 << 16
_INIT_LINE_BYTES = 1 << 20  # a venue line before the party knows the params


def party_command(role: str, bundle: str | Path, behaviour: Behaviour = Behaviour(), *, segment: int = 0,
                  code: CodePolicy = CodePolicy(), device: str = "cpu") -> list[str]:
    """The command line that runs one party as a process, importing only the user code `code` allows."""
    cmd = [sys.executable, "-P", "-m", "pinpoint", "--role", role, "--bundle", str(bundle), "--segment", str(segment)]
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
    if code.trust_all:
        cmd += ["--trust-all-code"]
    for package in sorted(code.allow):
        cmd += ["--allow-code", package]
    if device != "cpu":
        cmd += ["--device", device]
    return cmd


def parse_party_line(line: bytes) -> Message | None:
    """A party's line: `{"message": {...}}` or `{"message": null}` (silent). Raises MalformedMessage."""
    try:
        value = parse_json_strict(line)
    except ValueError as exc:
        raise MalformedMessage("line", f"not strict JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict) or set(value) != {"message"}:
        raise MalformedMessage("line", 'expected exactly {"message": ...}')
    return None if value["message"] is None else message_from_dict(value["message"])


class ProcessParty:
    """The venue's handle on a party process. Never blocks past a deadline; see the module docstring."""

    def __init__(self, cmd: Sequence[str], params: Params, *, cwd: str | None = None) -> None:
        self.limit = compute_message_limit(params) + ENVELOPE_BYTES  # the longest line read from the party
        self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=cwd)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._to = self.proc.stdin.fileno()
        self._from = self.proc.stdout.fileno()
        os.set_blocking(self._to, False)
        os.set_blocking(self._from, False)
        self._pending = bytearray()  # written to the party when its pipe takes it
        self._lines: deque[bytes | None] = deque()  # complete lines read (None: one that was too long)
        self._partial = bytearray()
        self._discarding = False  # inside a line that was too long: drop bytes up to its newline
        self._eof = False
        self._broken = False  # the party's input is closed
        self._stopped = False  # told to end
        self._send({"type": "init", "params": params.to_dict(), "now": 0})

    # --- writing, without blocking -------------------------------------------------------------------------

    def _send(self, value: dict[str, Any]) -> None:
        if self._broken:
            return
        self._pending += json.dumps(value, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n"
        self._flush()

    def _flush(self) -> None:
        while self._pending and not self._broken:
            try:
                n = os.write(self._to, bytes(self._pending[:_CHUNK]))
            except BlockingIOError:
                return
            except OSError:  # the process closed its input or exited: it hears nothing more
                self._broken = True
                self._pending.clear()
                return
            del self._pending[:n]

    # --- reading, with a deadline and a byte cap -----------------------------------------------------------

    def _feed(self, chunk: bytes) -> None:
        parts = chunk.split(b"\n")
        for k, part in enumerate(parts):
            if not self._discarding:
                if len(self._partial) + len(part) > self.limit:
                    self._partial.clear()
                    self._discarding = True
                    self._lines.append(None)
                else:
                    self._partial += part
            if k < len(parts) - 1:  # a newline ends the line
                if self._discarding:
                    self._discarding = False
                else:
                    self._lines.append(bytes(self._partial))
                    self._partial.clear()

    def _wait(self, deadline: float | None) -> bool:
        """Move bytes both ways until a line is ready, the output ends or `deadline` passes. True if a line is ready."""
        while not self._lines and not self._eof:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            poller = select.poll()
            poller.register(self._from, select.POLLIN)
            if self._pending and not self._broken:
                poller.register(self._to, select.POLLOUT)
            for fd, _ in poller.poll(None if left is None else max(1, math.ceil(left * 1000))):
                if fd == self._to:
                    self._flush()
                    continue
                try:
                    chunk = os.read(self._from, _CHUNK)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    self._feed(chunk)
                else:
                    self._eof = True
        return bool(self._lines)

    def read_line(self, timeout: float | None) -> bytes | None:
        """The party's next line (without its newline), or None if it ends its output or `timeout` seconds pass.
        Raises MalformedMessage for a line longer than `self.limit` (dropped as it is read)."""
        if not self._wait(None if timeout is None else time.monotonic() + timeout):
            return None
        line = self._lines.popleft()
        if line is None:
            raise MalformedMessage("line", f"longer than {self.limit} bytes")
        return line

    # --- the PartyLike interface ---------------------------------------------------------------------------

    def observe(self, at: Millis, message: Message) -> None:
        self._send({"type": "entry", "at": at, "message": message.to_dict()})

    def refused(self, reason: str) -> None:
        self._send({"type": "refused", "reason": reason[:1000]})

    def next_message(self, state: DisputeState, timeout: float | None = None) -> Message | None:
        """Ask the party to move and read its answer for at most `timeout` seconds (None: silent).
        Raises MalformedMessage for a line that is not a message."""
        ms_left = None if timeout is None else max(0, int(timeout * 1000))
        self._send({"type": "move", "seq": state.seq, "head": state.head, "ms_left": ms_left})
        line = self.read_line(timeout)
        return None if line is None else parse_party_line(line)

    def stop(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Tell the process to end (within `grace_s` seconds for what is still unwritten) and close the pipes."""
        if self._stopped:
            return
        self._stopped = True
        self._send({"type": "end"})
        deadline = time.monotonic() + grace_s
        while self._pending and not self._broken and time.monotonic() < deadline:
            poller = select.poll()
            poller.register(self._to, select.POLLOUT)
            poller.poll(max(1, math.ceil((deadline - time.monotonic()) * 1000)))
            self._flush()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:  # the process is gone and the pipe with it
                pass

    def close(self, grace_s: float = CLOSE_GRACE_S) -> int:
        """`stop` the process, give it `grace_s` seconds to exit, then kill it. Returns its exit status."""
        deadline = time.monotonic() + grace_s
        self.stop(grace_s)
        try:
            return self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# --- the party's side ----------------------------------------------------------------------------------------


def _read_request(source: IO[bytes], limit: int) -> dict[str, Any] | None:
    line = source.readline(limit + 1)
    if not line:
        return None
    if len(line) > limit:
        raise ProtocolError(f"the venue sent a line longer than {limit} bytes")
    try:
        request = parse_json_strict(line)
    except ValueError as exc:
        raise ProtocolError(f"the venue sent a line that is not strict JSON: {str(exc)[:200]}") from None
    if not isinstance(request, dict) or not isinstance(request.get("type"), str):
        raise ProtocolError("the venue sent a line without a type")
    return request


def serve(party: PartyLike, source: IO[bytes], sink: IO[bytes]) -> None:
    """Answer the venue's lines until it says end (or closes). Raises ProtocolError on a line it cannot read or a
    refused entry (venue and party disagree), InvalidParams on bad params."""
    state: DisputeState | None = None
    limit = _INIT_LINE_BYTES
    while (request := _read_request(source, limit)) is not None:
        kind = request["type"]
        try:
            if kind == "init":
                params = params_from_dict(request["params"])
                state = new_dispute(params, request["now"])
                limit = compute_message_limit(params) + ENVELOPE_BYTES
            elif kind == "entry" and state is not None:
                message = message_from_dict(request["message"])
                state = apply_message(state, message, request["at"])
                party.observe(request["at"], message)
            elif kind == "move" and state is not None:
                ms_left = request.get("ms_left")
                reply = party.next_message(state, ms_left / 1000 if isinstance(ms_left, int) else None)
                body = {"message": None if reply is None else reply.to_dict()}
                sink.write(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n")
                sink.flush()
            elif kind == "refused":
                party.refused(str(request.get("reason", ""))[:1000])
            elif kind == "end":
                return
            else:
                raise ProtocolError(f"the venue sent {kind[:40]!r} out of order")
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"the venue sent a malformed {kind[:40]!r} line: {exc!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pinpoint", description="one party of a pinpoint dispute")
    parser.add_argument("--role", choices=("solver", "challenger"), required=True)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--segment", type=int, default=0)
    parser.add_argument("--fault-step", type=int)
    parser.add_argument("--fault-node", type=int)
    parser.add_argument("--fault-element", type=int, default=0)
    parser.add_argument("--lie-step", type=int)
    parser.add_argument("--answers", choices=ANSWERS, default="honest")
    parser.add_argument("--silent-from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--allow-code", action="append", default=[], metavar="PKG",
                        help="a package whose code the bundle's spec may import (repeatable); built-ins always")
    parser.add_argument("--trust-all-code", action="store_true", help="import whatever code the spec names (own bundle)")
    args = parser.parse_args(argv)
    fault = Fault(args.fault_step, args.fault_node, args.fault_element) if args.fault_step is not None else None
    behaviour = Behaviour(fault=fault, lie_step=args.lie_step, answers=args.answers, silent_from=args.silent_from,
                          seed=args.seed)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # stdout carries protocol lines only: anything else printed goes to stderr
    try:
        code = CodePolicy.trust_all_code() if args.trust_all_code else CodePolicy.allowing(args.allow_code)
        with open_bundle(args.bundle, full=False) as bundle:
            verify_code(bundle.spec, code)  # before anything is imported or built
            party: PartyLike
            if args.role == "solver":
                party = Solver(bundle, behaviour, device=args.device, code=code)
            else:
                party = Challenger(bundle, args.segment, behaviour, device=args.device, code=code)
            serve(party, sys.stdin.buffer, stdout.buffer)
    except PolError as exc:
        print(f"pinpoint {args.role}: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        sys.stdout = stdout
    return 0
