"""Every error `pol` raises on bad input. One hierarchy, so callers can catch as broadly or narrowly as they need.

Each class carries the exit code the `pol` command gives for it (`exit_code`): 1 for "rejected or failed", 2 for
"usage error or cannot verify" (this machine cannot judge: other data, other code, another version). The CLI maps
errors to codes in one place, by this attribute. `pinpoint.errors` and `games.errors` hang their trees below
PolError too.

    PolError                          exit
    ├── UsageError                      2   the call's own arguments are wrong (a segment that does not exist, ...)
    ├── SpecError                       2   the job spec is invalid (unknown model, bad field, wrong type)
    │   ├── ComponentError              2   a `module:callable` model or dataset could not be imported or built
    │   │   └── UserCodeError           2   user code (a model's forward, a loss) raised while pol ran it
    │   ├── CodeNotAllowed              2   the spec names code the verifier did not allow (nothing was imported)
    │   └── CodeDiffers                 2   the code here is not the code the spec pins (not fraud!)
    ├── DataError                       2   the data is unusable
    │   ├── DataDiffers                 2   the verifier's data is not the data the spec committed to (not fraud!)
    │   └── DataNotProvided             2   a dir: dataset and no --data-dir: a verifier reads no path a bundle names
    ├── NumericsError                   1   a numerics mode cannot do what was asked
    │   ├── NumericsUnavailable         2   the mode is not available here
    │   ├── CannotVerifySoundly         2   native thresholds would need to exceed their caps: use exact numerics
    │   └── UnsupportedOperator         2   an operator pol cannot run reproducibly (names it: not exact, or random)
    ├── VersionMismatch                 2   made by another pol (or, exact, another torch): cannot verify here
    ├── CommitmentError                 1   a Merkle proof or commitment does not check out
    ├── BundleError                     1   a bundle is malformed; always names the file or field
    │   ├── BundleNotFound              2   no bundle at that path (not a directory with a manifest, nor an archive)
    │   ├── BundleVersionError          2   unknown format or version
    │   ├── BundleFileError             1   missing, extra, oversized or badly named file, or a path escaping it
    │   ├── DigestMismatch              1   bytes or tensors whose digest differs from the committed one
    │   ├── ManifestError               1   a manifest field is missing, mistyped, oversized or non-finite
    │   ├── ArchiveError                1   the single-file archive is truncated, malformed or unsafe
    │   └── StateMismatch               1   a checkpoint's tensors do not fit the spec's model and optimizer
    ├── RemoteError                     2   a remote bundle could not be fetched within its bounds (not fraud!)
    │   ├── RemoteTimeout               2   a request or the whole fetch ran past its deadline (a slow drip)
    │   ├── RemoteProtocolError         2   the server broke HTTP's contract: more or fewer bytes than asked, no range
    │   └── RemoteChanged               2   the served bundle changed while it was being read
    ├── OutputExists                    2   `--out` exists and neither --resume nor --force was given
    ├── ResumeError                     1   `--resume` found nothing consistent to resume from
    ├── DeviceUnavailable               2   the requested device is not on this machine
    └── TrainingError                   1   training cannot go on (non-finite loss)

Every raise is reached by a test. `assert` is kept for our own bugs only.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "PolError",
    "UsageError",
    "SpecError",
    "ComponentError",
    "UserCodeError",
    "CodeNotAllowed",
    "CodeDiffers",
    "VersionMismatch",
    "BundleNotFound",
    "CannotVerifySoundly",
    "OutputExists",
    "DataError",
    "DataDiffers",
    "DataNotProvided",
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
    "RemoteError",
    "RemoteTimeout",
    "RemoteProtocolError",
    "RemoteChanged",
]


EXIT_FAILED = 1  # rejected, or failed
EXIT_USAGE = 2  # bad usage, or this machine cannot judge


class PolError(Exception):
    """Base class of every error raised by `pol` on bad input."""

    exit_code: ClassVar[int] = EXIT_FAILED


class UsageError(PolError):
    """A call's own arguments are wrong (not the input it reads): an unknown segment, a malformed beacon."""

    exit_code = EXIT_USAGE


class SpecError(PolError):
    """The job spec is invalid."""

    exit_code = EXIT_USAGE


class ComponentError(SpecError):
    """A user model or dataset given as `module:callable` could not be imported or built."""


class UserCodeError(ComponentError):
    """User code (a model's forward, its loss) raised an exception while pol ran it. Names the callable, the
    batch's shapes and what went wrong, in one line."""


class CodeNotAllowed(SpecError):
    """The spec names code outside the verifier's allow-list. Raised before anything is imported."""

    def __init__(self, role: str, ref: str, package: str) -> None:
        super().__init__(
            f"code not allowed: the spec's {role} is {ref[:200]!r}, from package {package[:100]!r}, which is not on "
            f"this verifier's allow-list (built-ins are always allowed; allow it with --allow-code {package[:100]})"
        )
        self.role = role
        self.ref = ref
        self.package = package


class CodeDiffers(SpecError):
    """The code installed here is not the code the spec pins by digest.

    Like DataDiffers, this says nothing about the solver's honesty: the verifier cannot judge with other code.
    """

    def __init__(self, role: str, package: str, expected: str, got: str) -> None:
        super().__init__(
            f"code differs: the spec's {role} pins package {package!r} at code digest {expected}, the package "
            f"installed here hashes to {got}"
        )
        self.role = role
        self.package = package
        self.expected = expected
        self.got = got


class DataError(PolError):
    """The training data is unusable."""

    exit_code = EXIT_USAGE


class DataDiffers(DataError):
    """The data available here is not the data the spec committed to.

    This says nothing about the solver's honesty: the verifier simply cannot check with this data.
    """

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"data differs: the spec commits to data digest {expected}, the data here hashes to {got}")
        self.expected = expected
        self.got = got


class DataNotProvided(DataError):
    """The spec's data is a directory on the solver's machine (`dir:PATH`) and the caller did not say where it holds
    that data. A verifier reads no path a bundle names (the path is the solver's, the bytes must be the verifier's
    own choice): it passes `--data-dir`. Not evidence of fraud."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the job's data is {name!r}, a directory on the solver's machine; a verifier reads no path a "
                         "bundle names: pass --data-dir DIR (data_dir=) where you hold that data")
        self.name = name


class NumericsError(PolError):
    """A numerics mode cannot do what was asked."""


class NumericsUnavailable(NumericsError):
    """The requested numerics mode is not available in this build or on this device."""

    exit_code = EXIT_USAGE


class CannotVerifySoundly(NumericsError):
    """Native numerics cannot tell an honest replay of this job from a shaped one: the honest spread needs
    thresholds beyond their caps. Not an accusation; exact numerics can verify such a job."""

    exit_code = EXIT_USAGE


class UnsupportedOperator(NumericsError):
    """An operator pol cannot run reproducibly: one exact numerics cannot compute exactly, or a random operator
    pol cannot serve from its own generator (in either numerics). The reason says which."""

    exit_code = EXIT_USAGE

    def __init__(self, op: str, why: str = "no exact implementation") -> None:
        super().__init__(f"cannot run operator {op}: {why}")
        self.op = op


class VersionMismatch(PolError):
    """The bundle was made by a pol (or, in exact numerics, a torch) whose step arithmetic differs from this one's.

    Like DataDiffers, this says nothing about the solver's honesty: replaying here could only raise false alarms.
    """

    exit_code = EXIT_USAGE


class CommitmentError(PolError):
    """A Merkle inclusion proof or a commitment does not check out."""


class BundleError(PolError):
    """A proof bundle is malformed."""


class BundleNotFound(BundleError):
    """There is no bundle at the path: not a directory holding a manifest, nor a readable archive."""

    exit_code = EXIT_USAGE


class BundleVersionError(BundleError):
    """The bundle's format or version is not one this reader knows."""

    exit_code = EXIT_USAGE


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


class OutputExists(PolError):
    """The output path exists and the run was given neither --resume nor --force."""

    exit_code = EXIT_USAGE


class ResumeError(PolError):
    """`--resume` found no consistent partial run to continue."""


class DeviceUnavailable(PolError):
    """The requested device (e.g. `cuda`) is not available on this machine."""

    exit_code = EXIT_USAGE


class TrainingError(PolError):
    """Training cannot go on (for example the loss became non-finite)."""


class StateMismatch(BundleError):
    """A checkpoint's tensors do not fit the model and optimizer that the spec describes."""


class RemoteError(PolError):
    """A bundle at a URL could not be fetched within its bounds: the server is unreachable, kept failing, or the
    fsspec protocol is not installed. Like DataDiffers, this says nothing about the solver's honesty (the verifier
    could not read the bundle); bytes that arrive and differ from the commitment are a DigestMismatch instead."""

    exit_code = EXIT_USAGE


class RemoteTimeout(RemoteError):
    """A request (or the whole fetch) ran past its deadline: a server too slow, or one dripping bytes."""


class RemoteProtocolError(RemoteError):
    """The server broke HTTP's contract: a body longer or shorter than the range asked for, an ignored range
    request, an endless body, a missing length."""


class RemoteChanged(RemoteError):
    """The served bundle changed while it was being read (another ETag or length than at the first request)."""
