"""pol: verifiable machine-learning training (the solver's and verifier's side)."""

__version__ = "0.5.0"
