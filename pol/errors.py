"""Every error `pol` raises on bad input. One hierarchy, so callers can catch as broadly or narrowly as they need.

    PolError
    ├── SpecError                 the job spec is invalid (unknown model, bad field, wrong type)
    │   └── ComponentError        a `module:callable` model or dataset could not be imported or built
    ├── DataError                 the data is unusable
    │   └── DataDiffers           the verifier's data is not the data the spec committed to (not fraud!)
    ├── NumericsError             a numerics mode cannot do what was asked
    │   ├── NumericsUnavailable   the mode is not available here
    │   └── UnsupportedOperator   exact mode met an operator it cannot make exact (names the operator)
    ├── CommitmentError           a Merkle proof or commitment does not check out
    ├── BundleError               a bundle is malformed; always names the file or field
    │   ├── BundleVersionError    unknown format or version
    │   ├── BundleFileError       missing, extra, oversized or badly named file, or a path escaping the bundle
    │   ├── DigestMismatch        bytes or tensors whose digest differs from the committed one
    │   ├── ManifestError         a manifest field is missing, mistyped, oversized or non-finite
    │   ├── ArchiveError          the single-file archive is truncated, malformed or unsafe
    │   └── StateMismatch         a checkpoint's tensors do not fit the spec's model and optimizer
    ├── ResumeError               `--resume` found nothing consistent to resume from
    ├── DeviceUnavailable         the requested device is not on this machine
    └── TrainingError             training cannot go on (non-finite loss)

Every raise is reached by a test. `assert` is kept for our own bugs only.
"""

from __future__ import annotations

__all__ = [
    "PolError",
    "SpecError",
    "ComponentError",
    "DataError",
    "DataDiffers",
    "NumericsError",
    "NumericsUnavailable",
    "UnsupportedOperator",
    "CommitmentError",
    "BundleError",
    "BundleVersionError",
    "BundleFileError",
    "DigestMismatch",
    "ManifestError",
    "ArchiveError",
    "ResumeError",
    "DeviceUnavailable",
    "TrainingError",
    "StateMismatch",
]


class PolError(Exception):
    """Base class of every error raised by `pol` on bad input."""


class SpecError(PolError):
    """The job spec is invalid."""


class ComponentError(SpecError):
    """A user model or dataset given as `module:callable` could not be imported or built."""


class DataError(PolError):
    """The training data is unusable."""


class DataDiffers(DataError):
    """The data available here is not the data the spec committed to.

    This says nothing about the solver's honesty: the verifier simply cannot check with this data.
    """

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"data differs: the spec commits to data digest {expected}, the data here hashes to {got}")
        self.expected = expected
        self.got = got


class NumericsError(PolError):
    """A numerics mode cannot do what was asked."""


class NumericsUnavailable(NumericsError):
    """The requested numerics mode is not available in this build or on this device."""


class UnsupportedOperator(NumericsError):
    """Exact numerics met an operator it cannot compute exactly."""

    def __init__(self, op: str, why: str = "no exact implementation") -> None:
        super().__init__(f"exact numerics cannot run operator {op}: {why}")
        self.op = op


class VersionMismatch(PolError):
    """The bundle was made by a pol (or, in exact numerics, a torch) whose step arithmetic differs from this one's.

    Like DataDiffers, this says nothing about the solver's honesty: replaying here could only raise false alarms.
    """


class CommitmentError(PolError):
    """A Merkle inclusion proof or a commitment does not check out."""


class BundleError(PolError):
    """A proof bundle is malformed."""


class BundleVersionError(BundleError):
    """The bundle's format or version is not one this reader knows."""


class BundleFileError(BundleError):
    """A file of the bundle is missing, extra, oversized, badly named or escapes the bundle."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


class DigestMismatch(BundleError):
    """Bytes or tensors hash to something other than the committed digest."""

    def __init__(self, what: str, expected: str, got: str) -> None:
        super().__init__(f"digest mismatch in {what}: expected {expected}, got {got}")
        self.what = what
        self.expected = expected
        self.got = got


class ManifestError(BundleError):
    """A manifest field is missing, mistyped, oversized or non-finite."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"manifest field {field!r}: {problem}")
        self.field = field


class ArchiveError(BundleError):
    """The single-file archive form of a bundle is truncated, malformed or unsafe."""


class ResumeError(PolError):
    """`--resume` found no consistent partial run to continue."""


class DeviceUnavailable(PolError):
    """The requested device (e.g. `cuda`) is not available on this machine."""


class TrainingError(PolError):
    """Training cannot go on (for example the loss became non-finite)."""


class StateMismatch(BundleError):
    """A checkpoint's tensors do not fit the model and optimizer that the spec describes."""
