"""`python -m pinpoint --role solver|challenger --bundle B ...`: one dispute party as a process (see pinpoint.party)."""

from __future__ import annotations

from .party import main

if __name__ == "__main__":
    raise SystemExit(main())
