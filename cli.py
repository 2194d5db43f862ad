"""The `pol` command: thin commands over the pol, pinpoint and games packages.

Data goes to stdout (`--json` for scripts), progress and hints to stderr. Exit codes: 0 ok/accepted,
1 rejected or failed, 2 usage error or cannot verify. A traceback only with `--debug`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pol.errors import (
    EXIT_FAILED,
    EXIT_USAGE,
    CodeDiffers,
    CodeNotAllowed,
    DataDiffers,
    DataNotProvided,
    PolError,
    RemoteChanged,
    RemoteError,
    VersionMismatch,
)

app = typer.Typer(
    name="pol",
    help="Verifiable ML training: train and prove, verify a proof bundle, settle disputes, play the incentive game.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs are re-wrapped to the terminal's width
)
err = Console(stderr=True, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

EXIT_OK = 0
F = TypeVar("F", bound=Callable[..., Any])
_DEBUG = {"on": False}  # set once per process by the --debug flag of the app callback

_HINTS: tuple[tuple[type[PolError], str], ...] = (
    (DataDiffers, "this is not evidence of fraud: obtain the committed data, or pass --data-dir (--eval-data-dir for evaluation data)"),
    (DataNotProvided, "this is not evidence of fraud: pass --data-dir (--eval-data-dir for evaluation data) where you hold the committed data"),
    (CodeDiffers, "this is not evidence of fraud: install the version of that package the spec pins"),
    (CodeNotAllowed, "pol imports no code a bundle names unless you allow its package beforehand"),
    (VersionMismatch, "this is not evidence of fraud: verify with the versions the spec names"),
    (RemoteChanged, "the server changed the bundle while it was read: ask the solver to publish it unchanged (its "
                    "commitment is on the ledger) and verify again"),
    (RemoteError, "this is not evidence of fraud: the bundle could not be fetched within the limits; try again, or "
                  "fetch it yourself and verify the local copy"),
)


def fail(message: str, code: int = EXIT_FAILED, hint: str | None = None) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    if hint:
        err.print(f"[dim]hint: {hint}[/]", highlight=False)
    raise typer.Exit(code)


def handle_errors(usage_prefix: str | None = None) -> Callable[[F], F]:
    """The one place that maps errors to messages and exit codes: each error class carries its exit code
    (`PolError.exit_code`: 1 rejected or failed, 2 usage or cannot verify). `usage_prefix` starts the message of
    an exit-2 error (e.g. "cannot verify"). A traceback only with --debug."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except typer.Exit:
                raise
            except PolError as exc:
                if _DEBUG["on"]:
                    raise
                code = exc.exit_code
                message = " ".join(str(exc).split()) or type(exc).__name__
                if usage_prefix and code == EXIT_USAGE:
                    message = f"{usage_prefix}: {message}"
                fail(escape(message), code, next((h for cls, h in _HINTS if isinstance(exc, cls)), None))
            except KeyboardInterrupt:
                fail("interrupted", 130, "a training run can be continued with --resume")
            except OSError as exc:  # the disk, not the input: a full disk, a read-only or vanished directory
                if _DEBUG["on"]:
                    raise
                where = f" ({exc.filename})" if exc.filename else ""
                fail(escape(f"{exc.strerror or exc}{where}"), EXIT_FAILED, "fix the disk or directory; a training run continues with --resume")

        return inner  # type: ignore[return-value]

    return wrap


def _print_version(value: bool) -> None:
    if value:
        from pol import __version__

        out.print(f"pol {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print pol's version and exit.")] = False,
) -> None:
    _DEBUG["on"] = debug


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where to compute: cpu, cuda, cuda:N.")]


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def step_progress(total: int, label: str, quiet: bool) -> tuple[Progress | None, Callable[[int, int, float], None] | None]:
    """A rich progress bar on stderr showing loss, steps per second and time left."""
    if quiet:
        return None, None
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} steps/s"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    task = progress.add_task(label, total=total, loss="-", rate="-")
    started = time.perf_counter()
    first: list[int] = []

    def update(step: int, total_steps: int, loss: float) -> None:
        if not first:
            first.append(step - 1)
        rate = (step - first[0]) / max(time.perf_counter() - started, 1e-9)
        progress.update(task, completed=step, total=total_steps, loss=f"{loss:.4f}", rate=f"{rate:.1f}")

    return progress, update


def parse_kwargs(text: str | None, flag: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=flag) from None
    if not isinstance(value, dict):
        raise typer.BadParameter("expected a JSON object such as '{\"hidden\": 512}'", param_hint=flag)
    return value


AllowCodeOpt = Annotated[
    list[str] | None,
    typer.Option("--allow-code", metavar="PACKAGE",
                 help="Allow the spec's user code from this package (repeatable). Built-ins are always allowed; "
                      "nothing else a bundle names is ever imported."),
]


def _code_policy(allow: list[str] | None) -> Any:
    from pol.components import CodePolicy

    return CodePolicy.allowing(allow or ())


SpecOpt = Annotated[Path | None, typer.Option("--spec", help="A TOML or JSON spec file; flags override its fields.")]
ModelOpt = Annotated[str | None, typer.Option(help="Built-in model (mlp, cnn, transformer; with pol[zoo]: gpt2, llama, bert, vit, resnet) or module:callable.")]
ModelKwOpt = Annotated[str | None, typer.Option("--model-kwargs", help="JSON keyword arguments for the model.")]
DataOpt = Annotated[str | None, typer.Option(help="Built-in data (synthetic, images, chars, tokens, pixels), module:callable (dict of tensors or a torch map-style Dataset) or dir:PATH (safetensors shards or .npy arrays).")]
DataKwOpt = Annotated[str | None, typer.Option("--data-kwargs", help="JSON keyword arguments for the data.")]
StepsOpt = Annotated[int | None, typer.Option(min=1, help="Training steps.")]
EveryOpt = Annotated[str | None, typer.Option(metavar="K|auto", help="Checkpoint interval k (default: 10, more for big models); "
                                              "'auto': the k of least protocol tax, measured on this machine (the job id then depends on it).")]
SeedOpt = Annotated[int | None, typer.Option(min=0, help="Seed of every random draw (init, data order, dropout).")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=1, help="Samples per step.")]
MicroOpt = Annotated[int | None, typer.Option(min=0, help="Run each batch in micro-batches of this size.")]
LrOpt = Annotated[float | None, typer.Option(help="Peak learning rate (must be above 0).")]
OptimOpt = Annotated[str | None, typer.Option(help="sgd or adamw.")]
NumericsOpt = Annotated[str | None, typer.Option(help="native (deterministic torch kernels) or exact (bitwise on any hardware).")]
DataDirOpt = Annotated[str | None, typer.Option("--data-dir", help="Where you hold a dir: dataset's files (a verifier reads no path a bundle names).")]
EvalDataDirOpt = Annotated[str | None, typer.Option("--eval-data-dir", help="Where you hold a dir: evaluation dataset's files (the spec's evaluation.data).")]


def _parse_every(every: str | None) -> int | str | None:
    """--every: a positive integer, or 'auto'."""
    if every is None or every == "auto":
        return every
    try:
        k = int(every)
    except ValueError:
        k = 0
    if k < 1:
        raise typer.BadParameter(f"expected a positive integer or 'auto', got {every!r}", param_hint="--every")
    return k


def _every_auto(spec: Any, code: Any, data_dir: str | None, device: str, quiet: bool) -> Any:
    """The spec with the k of least protocol tax measured here (`pol.every.measured_every`), said on stderr."""
    from pol.every import DEFAULT_CHEAT_FRACTION, DEFAULT_CONFIDENCE, measured_every

    if not quiet:
        err.print("measuring a few steps and one checkpoint for --every auto ...", highlight=False)
    m = measured_every(spec, device=device, data_dir=data_dir, code=code)
    if not quiet:
        err.print(f"every auto  k = {m.every}: a step {m.step_seconds * 1e3:.3g} ms, a checkpoint {m.checkpoint_seconds * 1e3:.3g} ms "
                  f"({m.checkpoint_steps:.3g} steps); modelled protocol tax {m.tax:.1%} at {DEFAULT_CONFIDENCE:.1%} detection of "
                  f"a {DEFAULT_CHEAT_FRACTION:.0%} cheat ({m.tax_at_default:.1%} at the default k = {m.default_every})", highlight=False)
    return spec.replace(every=m.every)


def _spec_fields(spec_file: Path | None, model: str | None, model_kwargs: str | None, data: str | None,
                 data_kwargs: str | None, **flags: Any) -> dict[str, Any]:
    """The spec fields a command line gives: a spec file's, overridden by flags (`pol.spec.apply_flags`).
    `every="auto"` is left for the caller (`_every_auto`)."""
    from pol.spec import Flags, apply_flags, load_spec_file

    if flags.get("every") == "auto":
        flags["every"] = None
    fields = load_spec_file(spec_file) if spec_file else {}
    return apply_flags(fields, Flags(model=model, model_kwargs=parse_kwargs(model_kwargs, "--model-kwargs"), data=data,
                                     data_kwargs=parse_kwargs(data_kwargs, "--data-kwargs"), **flags))


@app.command()
@handle_errors()
def train(
    spec_file: SpecOpt = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwOpt = None,
    data: DataOpt = None,
    data_kwargs: DataKwOpt = None,
    steps: StepsOpt = None,
    every: EveryOpt = None,
    seed: SeedOpt = None,
    batch_size: BatchOpt = None,
    microbatch: MicroOpt = None,
    lr: LrOpt = None,
    optimizer: OptimOpt = None,
    numerics: NumericsOpt = None,
    device: DeviceOpt = "cpu",
    out_path: Annotated[Path, typer.Option("--out", help="Bundle directory, or an archive if it ends in .tar.")] = Path("bundle"),
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out from its last checkpoint.")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    data_dir: DataDirOpt = None,
    eval_data_dir: EvalDataDirOpt = None,
    fault: Annotated[str | None, typer.Option(help="Testing disputes: corrupt one operator, STEP:NODE[:ELEMENT] (see pol graph).")] = None,
    nproc: Annotated[int, typer.Option(help="Train data-parallel on this many processes (torch.distributed.run; or launch with torchrun -m pol).")] = 1,
    max_restarts: Annotated[int, typer.Option("--max-restarts", min=0, help="With --nproc: restart the processes up to this many "
                                              "times after a failure; each restart continues from the last checkpoint.")] = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model and write a proof bundle (checkpoints, trace records, Merkle commitment).

    User code (module:callable) must be importable the ordinary way: installed, or on PYTHONPATH
    (e.g. PYTHONPATH=. pol train ...); pol never adds the working directory to the import path.

    Examples:

      pol train --model transformer --out run1

      pol train --spec job.toml --steps 1000 --every 50 --out run2.tar

      PYTHONPATH=. pol train --model mypkg.models:make_net --data mypkg.data:load --out run3

      pol train --model transformer --numerics exact --microbatch 4 --nproc 2 --out run4

      torchrun --nproc-per-node 4 --max-restarts 2 -m pol train --spec job.toml --out run5   (a restart resumes)
    """
    from pol import distributed
    from pol.components import CodePolicy
    from pol.engine import build_spec
    from pol.prove import check_output, train_and_prove

    every_k = _parse_every(every)
    if every_k == "auto" and resume:
        raise typer.BadParameter("a new measurement could choose another k, so another job: resume with the k the run "
                                 "started with (pol job --every auto printed it; --every K)", param_hint="--every")
    if every_k == "auto" and (nproc > 1 or distributed.launched_by_torchrun()):
        raise typer.BadParameter("every process would measure its own k: measure once with `pol job --every auto`, "
                                 "then train with that --every", param_hint="--every")
    fields = _spec_fields(spec_file, model, model_kwargs, data, data_kwargs, steps=steps, every=every_k, seed=seed,
                          batch_size=batch_size, microbatch=microbatch, lr=lr, optimizer=optimizer, numerics=numerics)
    if nproc > 1 and not distributed.launched_by_torchrun():
        raise typer.Exit(distributed.relaunch(nproc, sys.argv[1:], max_restarts))
    dp, finished = None, False
    if distributed.launched_by_torchrun():
        dp, device = distributed.init_from_env(device)
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:  # torchrun --max-restarts restarted us
            resume, force, finished = _resume_after_restart(dp, out_path, resume, force)
    lead = dp is None or dp.rank == 0
    if finished and _finished_same_job(dp, out_path, fields):  # the failed attempt had finished it: nothing to do
        return
    if lead:
        check_output(out_path, resume=resume, force=force)  # before anything is built
    spec = build_spec(fields, CodePolicy.trust_all_code())
    if every_k == "auto":
        spec = _every_auto(spec, CodePolicy.trust_all_code(), data_dir, device, quiet or as_json)
    if fault is not None:
        _train_faulty(spec, out_path, fault, device, force, as_json)
        return
    progress, update = step_progress(spec.steps, "training", quiet or as_json or not lead)
    started = time.perf_counter()
    with progress or contextlib.nullcontext():
        result = train_and_prove(spec, out_path, device=device, resume=resume, force=force, on_progress=update, data_dir=data_dir,
                                 eval_data_dir=eval_data_dir, data_parallel=dp)
    if not lead:
        return
    elapsed = time.perf_counter() - started
    m = result.manifest
    summary = {
        "bundle": str(result.path),
        "job_id": m.job_id,
        "root": m.root,
        "steps": m.spec.steps,
        "every": m.spec.every,
        "checkpoints": len(m.records),
        "final_loss": m.records[-1].loss,
        "final_eval": m.records[-1].eval,  # the solver's claim until pol verify recomputes it
        "resumed_from": result.resumed_from,
        "seconds": round(elapsed, 3),
    }
    if m.spec.numerics == "exact":  # the same bits either way; without the compiled kernels it is several times slower
        from pol.exact import native

        summary["exact_kernels"] = native.status()
    if as_json:
        print_json(summary)
        return
    out.print(f"bundle      {summary['bundle']}")
    out.print(f"job id      {m.job_id}")
    out.print(f"commitment  {m.root}")
    out.print(f"trained     {m.spec.model.name} on {m.spec.data.name}, {m.spec.steps} steps, checkpoint every {m.spec.every} ({len(m.records)} checkpoints), {m.spec.numerics} numerics")
    out.print(f"final loss  {m.records[-1].loss:.4f}   ({elapsed:.1f} s{f', resumed at step {result.resumed_from}' if result.resumed_from is not None else ''})")
    if m.records[-1].eval is not None and m.spec.evaluation is not None:
        final_eval = m.records[-1].eval
        values = ", ".join(f"{metric.name} {final_eval[metric.name]:.4g}" for metric in m.spec.evaluation.metrics)
        out.print(f"final eval  {values}   (evaluation data {(m.spec.evaluation.data_digest or '')[:12]}, committed at every checkpoint; "
                  "certified once pol verify recomputes it)", markup=False)
    if "exact_kernels" in summary:
        out.print(f"exact math  {summary['exact_kernels']}")


@app.command()
@handle_errors()
def job(
    spec_file: SpecOpt = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwOpt = None,
    data: DataOpt = None,
    data_kwargs: DataKwOpt = None,
    steps: StepsOpt = None,
    every: EveryOpt = None,
    seed: SeedOpt = None,
    batch_size: BatchOpt = None,
    microbatch: MicroOpt = None,
    lr: LrOpt = None,
    optimizer: OptimOpt = None,
    numerics: NumericsOpt = None,
    data_dir: DataDirOpt = None,
    id_only: Annotated[bool, typer.Option("--id", help="Print the job id alone (for scripts: --job-id $(pol job ... --id)).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print a job's id and its canonical spec without training: what a client posts, and what
    `pol verify --job-id` checks a bundle against.

    Takes the same spec file and flags as pol train and resolves them the same way (the data digest, the
    digests of any user code, the pol and torch versions), so `pol train` with the same flags proves this job id.
    The canonical spec is RFC 8785 (JCS) JSON; the job id is blake3 over it under the domain tag "pol/job/v1".

    Examples:

      pol job --model transformer --steps 200

      pol verify run1 --job-id $(pol job --model transformer --id)

      pol job --spec job.toml --json > job.json && pol verify run1 --spec job.json

      pol job --model transformer --steps 20000 --every auto   (the k of least protocol tax, measured here)
    """
    from pol.components import CodePolicy
    from pol.engine import build_spec, resolve_job

    every_k = _parse_every(every)
    fields = _spec_fields(spec_file, model, model_kwargs, data, data_kwargs, steps=steps, every=every_k, seed=seed,
                          batch_size=batch_size, microbatch=microbatch, lr=lr, optimizer=optimizer, numerics=numerics)
    code = CodePolicy.trust_all_code()
    spec = build_spec(fields, code)
    if every_k == "auto":
        spec = _every_auto(spec, code, data_dir, "cpu", id_only or as_json)
    spec = resolve_job(spec, code=code, data_dir=data_dir)
    if id_only:
        sys.stdout.write(spec.job_id + "\n")
        return
    if as_json:
        print_json({"job_id": spec.job_id, "spec": spec.to_dict(), "canonical": spec.canonical().decode("utf-8")})
        return
    out.print(f"job id      {spec.job_id}")
    out.print(f"job         {spec.model.name} on {spec.data.name}, {spec.steps} steps, checkpoint every {spec.every}, "
              f"{spec.numerics} numerics, pol {spec.versions.get('pol')}, torch {spec.versions.get('torch')}")
    out.print(spec.canonical().decode("utf-8"), markup=False)


def _resume_after_restart(dp: Any, out_path: Path, resume: bool, force: bool) -> tuple[bool, bool, bool]:
    """(resume, force, finished) for a run torchrun restarted (--max-restarts): it continues from the last
    checkpoint the failed attempt wrote, if it wrote one, and never re-applies --force to that attempt's output; if
    that attempt finished the bundle (and failed only on its way out), there is nothing to do. Rank 0 looks; every
    process follows it."""
    from pol.prove import PROGRESS_NAME

    directory = out_path.with_name(out_path.name + ".partial") if out_path.suffix == ".tar" else out_path
    state = None
    if dp.rank == 0:
        if (directory / PROGRESS_NAME).is_file():
            state = "resume"
        elif (out_path / "manifest.json").is_file() if out_path.suffix != ".tar" else out_path.is_file():
            state = "finished"
    state = dp.share_object(state)
    return (True, False, False) if state == "resume" else (resume, force, state == "finished")


def _finished_same_job(dp: Any, out_path: Path, fields: dict[str, Any]) -> bool:
    """True (on every process) when the bundle at `out_path` is a finished bundle of this very job (rank 0 checks)."""
    from pol.bundle import open_bundle
    from pol.components import CodePolicy
    from pol.engine import build_spec, resolve_job

    same = None
    if dp.rank == 0:
        try:
            with open_bundle(out_path, full=False) as b:
                code = CodePolicy.trust_all_code()
                same = b.manifest.job_id == resolve_job(build_spec(fields, code), code=code).job_id
        except PolError:
            same = False
        if same:
            err.print(f"{out_path}: the previous attempt finished this job's bundle; nothing to do", highlight=False)
    return bool(dp.share_object(same))


def _train_faulty(spec: Any, out_path: Path, fault: str, device: str, force: bool, as_json: bool) -> None:
    """A deliberately faulty solver: one operator's output at one step gets one element changed."""
    from pinpoint import Fault, train_with_fault
    from pol.bundle import open_bundle

    try:
        parts = [int(x) for x in fault.split(":")]
        if len(parts) not in (2, 3) or min(parts) < 0:
            raise ValueError
    except ValueError:
        raise typer.BadParameter("expected STEP:NODE or STEP:NODE:ELEMENT, e.g. 12:40", param_hint="--fault") from None
    path = train_with_fault(spec, out_path, Fault(*parts), device=device, force=force)
    with open_bundle(path, full=False) as b:
        root = b.manifest.root
    if as_json:
        print_json({"bundle": str(path), "root": root, "fault": parts})
    else:
        out.print(f"bundle      {path}  (FAULTY: step {parts[0]}, node {parts[1]} corrupted)")
        out.print(f"commitment  {root}")


def _bundle_summary(bundle: Any) -> dict[str, Any]:
    """What `pol inspect` prints. `integrity` says what was checked: "full" (every file's digest too) or "quick"
    (manifest, records, Merkle root, commitment and the file table with sizes; no checkpoint byte read)."""
    m = bundle.manifest
    sizes = {name: e.size for name, e in m.files.items()}
    return {
        "path": str(bundle.path),
        "root": m.root,
        "merkle_root": m.merkle_root,
        "job_id": m.job_id,
        "spec": m.spec.to_dict(),
        "steps": m.spec.steps,
        "records": [r.to_dict() for r in m.records],
        "files": len(sizes),
        "bytes_total": sum(sizes.values()),
        "bytes_per_checkpoint": max(sizes.values()),
        "env": dict(m.env),
        "integrity": "ok",
        "integrity_check": "full" if bundle.fully_checked else "quick",
        "bytes_read": bundle.bytes_read,
    }


BundleArg = Annotated[str, typer.Argument(metavar="BUNDLE", help="Bundle directory, .tar archive or URL (http(s)://, s3://, ... as published by pol serve).")]
CacheDirOpt = Annotated[Path | None, typer.Option("--cache-dir", help="Where checkpoints fetched from a URL are cached by digest (default: $POL_CACHE_DIR or ~/.cache/pol/blobs).")]


def _bundle_location(bundle: str, cache_dir: Path | None, progress: Progress | None) -> Any:
    """A local path as given, or a URL as a pol.remote.Remote with the cache and a download bar (on `progress`)."""
    from pol.remote import Remote, default_cache_dir, is_url

    if not is_url(bundle):
        return bundle
    fetch = progress.add_task("fetching", total=None, unit="bytes", visible=False) if progress else None

    def fetched(name: str, done: int, total: int) -> None:
        if progress is not None and fetch is not None:
            progress.update(fetch, completed=done, total=total, visible=done < total)

    return Remote(bundle, cache_dir=cache_dir or default_cache_dir(), on_progress=fetched if progress else None)


@app.command()
@handle_errors()
def inspect(
    bundle_path: BundleArg,
    full: Annotated[bool, typer.Option("--full/--quick", " /--no-full",
                                       help="Check every checkpoint file's digest (the default), or only the manifest, "
                                            "records, Merkle root, commitment and file sizes (--quick: reads no checkpoint).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Check a bundle's integrity and summarise it (spec, steps, commitment, records, sizes).

    Exit code 0 when every file, digest and the commitment check out, 1 on any problem. `pol verify` checks a
    checkpoint's digest only when it reads it (a corrupt checkpoint it never samples is not its concern); this
    command reads them all unless told `--quick`, and says which check it did.
    """
    from pol.bundle import open_bundle

    with open_bundle(bundle_path, full=full) as bundle:
        summary = _bundle_summary(bundle)
    if as_json:
        print_json(summary)
        return
    spec = summary["spec"]
    say = functools.partial(out.print, markup=False, highlight=False)  # every field below comes from the bundle
    if summary["integrity_check"] == "full":
        say(f"bundle      {summary['path']}  (integrity ok, full check: every file, digest, record and the commitment checked)")
    else:
        say(f"bundle      {summary['path']}  (integrity ok, quick check: manifest, records, the commitment and file sizes; "
            "checkpoint digests NOT checked, use --full)")
    say(f"job id      {summary['job_id']}")
    say(f"commitment  {summary['root']}")
    say(f"model       {spec['model']['name']} {spec['model']['kwargs'] or ''}{_code_note(spec['model'])}")
    say(f"data        {spec['data']['name']} {spec['data']['kwargs'] or ''} (digest {spec['data_digest'][:16]}...){_code_note(spec['data'])}")
    say(f"optimizer   {spec['optimizer']['name']} lr={spec['optimizer']['lr']} schedule={spec['optimizer']['schedule']}")
    say(f"training    {spec['steps']} steps, batch {spec['batch_size']}, k={spec['every']}, seed {spec['seed']}, {spec['numerics']} numerics")
    say(f"size        {summary['files']} checkpoints, {summary['bytes_per_checkpoint'] / 1e6:.2f} MB each, {summary['bytes_total'] / 1e6:.2f} MB total")
    env = summary["env"]
    say(f"trained on  torch {env.get('torch')}, {env.get('threads')} threads, {env.get('cpu_capability')}, {env.get('device')} (as the solver says)")
    evaluated = any("eval" in r for r in summary["records"])
    table = Table("step", "state digest", "data digest", "claimed loss", *(["claimed eval"] if evaluated else []), box=None, pad_edge=False)
    for r in summary["records"]:
        row = [str(r["step"]), r["state"][:16], r["data"][:16], "-" if r["loss"] is None else f"{r['loss']:.4f}"]
        if evaluated:
            row.append(escape(", ".join(f"{k} {v:.4g}" for k, v in (r.get("eval") or {}).items())))
        table.add_row(*row)
    out.print(table)
    err.print("[dim]losses are the solver's claims until pol verify replays their segments"
              f"{' (evaluation metrics: until it recomputes them)' if evaluated else ''}[/]")


def _code_note(component: dict[str, Any]) -> str:
    return f" (user code, pinned at {component['code'][:16]}...)" if component.get("code") else ""


def _print_report(report: Any) -> None:
    colour = "green" if report.accepted else "red"
    out.print(f"[bold {colour}]{report.verdict.upper()}[/]  {escape(report.reason)}")
    if report.job_id:
        pinned = "  (the job you asked for)" if report.expected_job == report.job_id else "  (not pinned: pass --job-id or --spec)" if report.expected_job is None else ""
        out.print(f"job id      {report.job_id}{pinned}")
        out.print(f"commitment  {report.root}")
    if report.checks:
        table = Table("segment", "steps", "sampled", "result", "loss", "max rel L2", "update cos", "problem", box=None, pad_edge=False)
        for c in report.checks:
            rel = "-" if c.max_rel_l2 is None else f"{c.max_rel_l2:.2e}"
            cos = "-" if c.update_cosine is None else f"{c.update_cosine:.6f}"
            loss = "-" if c.replayed_loss is None else f"{c.replayed_loss:.4f}"
            why = {"largest-update": "largest"}.get(c.why, c.why)
            table.add_row(str(c.index), f"{c.start}->{c.end}", why, "ok" if c.ok else "[red]FAIL[/]", loss, rel, cos, escape(c.problem or ""))
        out.print(table)
    ev = report.evaluation
    if ev is not None:
        if report.certified_metrics is not None:
            out.print(f"certified   {escape(ev.describe())}", markup=True)
        else:
            out.print(f"evaluation  [red]not certified[/]: {escape(ev.describe())}")
        out.print(f"eval check  {escape(ev.tolerance)}; {ev.seconds:.2f} s evaluating")
    if report.thresholds:
        t = report.thresholds
        out.print(f"thresholds  rel L2 <= {t.rel_l2:.2e}, update cos >= {t.min_cosine:.6f}, |log norm ratio| <= {t.max_log_ratio:.1e}, "
                  f"loss within {t.loss_rel:.1e}  (calibrated on segment {t.calibrated_on}: honest spread {t.observed.get('rel_l2', 0):.1e})")
    if report.steps_total:
        out.print(f"compute     {report.steps_replayed} of {report.steps_total} training steps replayed ({report.compute_fraction:.1%} of training)")
    if report.escape_probability:
        parts = ", ".join(f"f={f}: {p:.3g}" for f, p in report.escape_probability.items())
        picks = "pick follows" if report.largest_samples == 1 else "picks follow"
        note = (f" (counting the {report.uniform_samples} uniform samples only; the {report.largest_samples} "
                f"largest-update {picks} the solver's committed norms)") if report.largest_samples else ""
        out.print(f"escape      probability that a cheater faking a fraction f of segments passed this sample: {parts}{note}")
    out.print(f"randomness  {report.randomness_source}; repeat this exact sample with --beacon {report.randomness}")
    if report.sample_predictable:
        err.print("[yellow]warning:[/] the sample came from --seed, so it is predictable: a solver who knew the seed could "
                  "have faked only unsampled segments. The escape probabilities assume it did not. Use fresh randomness "
                  "(the default) or a --beacon drawn after the commitment.", highlight=False)


@app.command()
@handle_errors(usage_prefix="cannot verify")
def verify(
    bundle_path: BundleArg,
    job_id: Annotated[str | None, typer.Option("--job-id", help="The job you asked for (pol job prints it); reject a bundle of any other job.")] = None,
    spec_file: Annotated[Path | None, typer.Option("--spec", help="The spec you posted (file); reject a bundle of any other job.")] = None,
    root: Annotated[str | None, typer.Option(help="The commitment you expect (e.g. from the ledger); reject any other.")] = None,
    allow_code: AllowCodeOpt = None,
    samples: Annotated[int | None, typer.Option(min=1, help="Segments to replay (default 4).")] = None,
    confidence: Annotated[float | None, typer.Option(help="Detection probability wanted, e.g. 0.999 (with --cheat-fraction).")] = None,
    cheat_fraction: Annotated[float | None, typer.Option("--cheat-fraction", help="Fraction of faked segments to catch, e.g. 0.1.")] = None,
    beacon: Annotated[str | None, typer.Option(help="Public randomness (hex, at least 128 bits) drawn after the commitment was posted.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Reproducible sample for tests: PREDICTABLE, so a solver who knows it could dodge it.")] = None,
    segments: Annotated[str | None, typer.Option(help="Replay exactly these segments, e.g. '3,7' (1-based).")] = None,
    device: DeviceOpt = "cpu",
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads for the replay (per process with --nproc).")] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Replay the sampled segments on N worker processes at once "
                                       "(CUDA devices in turn with --device cuda): the same report as one process.")] = 1,
    data_dir: DataDirOpt = None,
    eval_data_dir: EvalDataDirOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Verify a proof bundle by replaying randomly sampled segments.

    Pin the job you pay for: --job-id (or --spec) rejects a bundle that proves any other job, even honestly
    (fewer steps, another seed), and --root rejects any other commitment. The sample is drawn from fresh
    randomness by default, or from --beacon, public randomness drawn AFTER the solver committed; both are
    unknown to the solver when it commits. --seed makes the sample reproducible for tests, but then it is
    predictable: the report says so, and its escape probabilities assume the solver did not know the seed.

    The bundle's user code (module:callable) is imported only from packages you allow with --allow-code, after
    checking it is the code the spec pins; otherwise: cannot verify, before anything is imported.

    A job with an evaluation has its committed metrics recomputed at every checkpoint the verifier touches and
    always at the final one: an accepted report certifies the final metrics (--eval-data-dir for dir: data).

    Exit code 0: accepted. 1: rejected (with evidence). 2: cannot verify (bad usage, data or code you do not have,
    another pol version, not a readable bundle).

    Examples:

      pol verify run1 --job-id 3f2a...

      pol verify run1 --confidence 0.999 --cheat-fraction 0.1 --json

      pol verify run2 --nproc 4 --threads 1

      pol verify run3 --spec job.toml --allow-code mypkg

      pol verify http://127.0.0.1:8000/ --root 9c1e...   (a bundle published with pol serve)
    """
    from pol.verify import verify as run_verify

    forced = None
    if segments is not None:
        try:
            forced = [int(x) for x in segments.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter("expected comma-separated segment numbers such as 3,7", param_hint="--segments") from None
    if samples is not None and confidence is not None:
        raise typer.BadParameter("give --samples or --confidence/--cheat-fraction, not both", param_hint="--samples")
    if job_id is not None and spec_file is not None:
        raise typer.BadParameter("give --job-id or --spec, not both", param_hint="--job-id")
    code = _code_policy(allow_code)
    if spec_file is not None:
        job_id, data_dir, eval_data_dir = _posted_job_id(spec_file, code, data_dir, eval_data_dir)
    progress = None if quiet or as_json else Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=err)
    task = progress.add_task("replaying", total=None, unit="steps") if progress else None

    def update(done: int, total: int) -> None:
        if progress is not None and task is not None:
            progress.update(task, completed=done, total=total)

    with progress or contextlib.nullcontext():
        report = run_verify(_bundle_location(bundle_path, cache_dir, progress), samples=samples, confidence=confidence, cheat_fraction=cheat_fraction, seed=seed,
                            beacon=beacon, segments=forced, expected_root=root, expected_job=job_id, code=code,
                            device=device, threads=threads, data_dir=data_dir, on_progress=update, eval_data_dir=eval_data_dir,
                            nproc=nproc)
    if as_json:
        print_json(report.to_dict())
    else:
        _print_report(report)
    raise typer.Exit(EXIT_OK if report.accepted else EXIT_FAILED)


def _posted_job_id(spec_file: Path, code: Any, data_dir: str | None, eval_data_dir: str | None = None) -> tuple[str, str | None, str | None]:
    """The job id of a spec file: as written when resolved (pol job --json's output or its "spec"), else resolved
    here against the data and code (on the verifier's allow-list). Also the data directories to verify with: the
    spec file is the verifier's own, so its `dir:` paths are where the verifier's data lives (unless --data-dir /
    --eval-data-dir)."""
    from pol.engine import build_spec, resolve_job
    from pol.spec import load_spec_file

    fields = load_spec_file(spec_file)
    if set(fields) >= {"job_id", "spec"}:  # the output of pol job --json
        fields = fields["spec"] if isinstance(fields["spec"], dict) else {}
    spec = build_spec(fields, code)
    if data_dir is None and spec.data.name.startswith("dir:"):
        data_dir = spec.data.name[4:]
    ev = spec.evaluation
    if ev is not None and eval_data_dir is None and ev.data.name.startswith("dir:"):
        eval_data_dir = ev.data.name[4:]
    return resolve_job(spec, code=code, data_dir=data_dir, eval_data_dir=eval_data_dir).job_id, data_dir, eval_data_dir


@app.command()
@handle_errors()
def export(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Bundle directory or .tar archive.")],
    out_path: Annotated[Path, typer.Option("--out", help="The .safetensors file to write.")],
    step: Annotated[int | None, typer.Option(min=0, help="The checkpoint to export (default: the last).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a checkpoint's model weights as a plain state_dict (safetensors).

    Loadable with `model.load_state_dict(safetensors.torch.load_file(PATH))`. The checkpoint is checked against the
    bundle's commitment first; the file's metadata names the job, the commitment and the step. Verify the bundle to
    know the weights were really trained.

    Example: pol export run1 --out model.safetensors
    """
    from safetensors.torch import save_file

    from pol.bundle import open_bundle
    from pol.errors import OutputExists, UsageError

    if out_path.exists() and not force:
        raise OutputExists(f"output {out_path} exists: pass --force to replace it")
    with open_bundle(bundle_path, full=False) as b:
        chosen = b.spec.steps if step is None else step
        if not (chosen <= b.spec.steps and (chosen % b.spec.every == 0 or chosen == b.spec.steps)):
            raise UsageError(f"step {chosen} is not a checkpoint of this bundle (0, {b.spec.every}, ..., {b.spec.steps})")
        weights = {n: t.contiguous() for n, t in b.model_state_dict(chosen).items()}
        meta = {"pol_job_id": b.manifest.job_id, "pol_commitment": b.manifest.root, "pol_step": str(chosen)}
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(weights, str(tmp), metadata=meta)
    tmp.replace(out_path)
    summary = {"out": str(out_path), "step": chosen, "tensors": len(weights), "job_id": meta["pol_job_id"],
               "parameters": sum(t.numel() for t in weights.values())}
    if as_json:
        print_json(summary)
    else:
        out.print(f"wrote {out_path}: {len(weights)} tensors, {summary['parameters']:,} numbers, step {chosen} of job "
                  f"{meta['pol_job_id'][:16]}...", markup=False, highlight=False)


@app.command()
@handle_errors()
def pack(
    directory: Annotated[Path, typer.Argument(help="A bundle directory.")],
    archive: Annotated[Path, typer.Argument(help="The single-file archive to write (.tar).")],
) -> None:
    """Pack a bundle directory into one deterministic archive file (validated first)."""
    from pol.bundle import pack_bundle

    path = pack_bundle(directory, archive)
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


@app.command()
@handle_errors()
def serve(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="The bundle directory or .tar archive to publish.")],
    host: Annotated[str, typer.Option(help="Address to listen on: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on; 0 picks a free one (the URL printed says which).")] = 8000,
    as_json: JsonOpt = False,
) -> None:
    """Publish a proof bundle over HTTP, so verifiers fetch only the checkpoints they sample.

    Serves the bundle's own files and nothing else: manifest.json and checkpoints/*.safetensors of a directory, or
    the archive at its own name; any other path is a 404. Range requests, HEAD and ETags are answered, so a verifier
    reads a served archive in place. The bundle is checked (quick check) before anything is served. Prints the URL
    to verify (stdout; --json for {"url": ...}) and serves until Ctrl-C. Needs pol[remote].

    The server trusts nothing it serves and the verifier trusts nothing it fetches: every byte a verifier uses is
    checked against the commitment (pin it with --root). Use a TLS-terminating proxy in front for https.

    Examples:

      pol serve run1 --port 8000

      pol verify http://HOST:8000/ --root COMMITMENT   (on the verifier's machine)

      pol serve run1.tar --host 0.0.0.0 --port 0
    """
    from pol.serve import serve_forever

    def started(url: str) -> None:
        if as_json:
            print_json({"url": url, "bundle": str(bundle_path)})
        else:
            out.print(url, markup=False, highlight=False)
            err.print(f"[dim]serving {escape(str(bundle_path))}; verify with: pol verify {escape(url)} --root COMMITMENT; "
                      "Ctrl-C stops[/]", highlight=False)
        sys.stdout.flush()

    try:
        serve_forever(bundle_path, host, port, on_start=started)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK) from None


@app.command()
@handle_errors()
def graph(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Bundle directory or .tar archive.")],
    step: Annotated[int, typer.Option(min=0, help="Capture the step from state STEP to STEP+1.")],
    out_path: Annotated[Path, typer.Option("--out", help="Output path; .json, .graphml and .dot are written beside it.")],
    allow_code: AllowCodeOpt = None,
    device: DeviceOpt = "cpu",
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Capture one training step's operator graph (every aten operator in execution order, with digests, shapes
    and FLOPs) and write it for viewers, with a summary. Runs the bundle's model: user code only from packages
    allowed with --allow-code."""
    from pinpoint import export_graph

    summary = export_graph(bundle_path, step, out_path, device=device, data_dir=data_dir, code=_code_policy(allow_code))
    if as_json:
        print_json(summary)
        return
    out.print(f"step {step}: {summary['nodes']} nodes, {summary['edges']} edges, {summary['flops']:,} FLOPs; "
              f"largest operator {summary['largest_op']}")
    table = Table("operator", "count", "FLOPs", box=None, pad_edge=False)
    for op, flops in sorted(summary["flops_by_op"].items(), key=lambda kv: -kv[1])[:15]:
        table.add_row(op, str(summary["count_by_op"].get(op, "")), f"{flops:,}")
    out.print(table)
    out.print("wrote " + ", ".join(summary["files"].values()))


@app.command()
@handle_errors()
def dispute(
    bundle_path: Annotated[Path | None, typer.Argument(metavar="BUNDLE", help="The disputed bundle.")] = None,
    segment: Annotated[int, typer.Option(min=1, help="The disputed segment (1-based, as pol verify numbers them).")] = 1,
    check: Annotated[Path | None, typer.Option(help="Re-check a transcript as a third party instead.")] = None,
    fault_step: Annotated[int | None, typer.Option(help="Solver: its computation corrupts an operator at this step.")] = None,
    fault_node: Annotated[int, typer.Option(help="Solver: ... the operator at this graph position.")] = 0,
    fault_element: Annotated[int, typer.Option(help="Solver: ... this element of its output.")] = 0,
    lie_step: Annotated[int | None, typer.Option(help="Solver: claims a wrong state digest for this step.")] = None,
    challenger: Annotated[str, typer.Option(help="Challenger: honest, disagree, agree, random or dispute-structure.")] = "honest",
    allow_code: AllowCodeOpt = None,
    silent_solver: Annotated[str | None, typer.Option(help="Solver stops answering in this phase (e.g. steps, nodes).")] = None,
    silent_challenger: Annotated[str | None, typer.Option(help="Challenger stops answering in this phase.")] = None,
    budget_ms: Annotated[int, typer.Option(min=1, help="Each party's chess clock, in milliseconds.")] = 600_000,
    processes: Annotated[bool, typer.Option(help="Run solver and challenger as separate processes (JSON lines).")] = False,
    transcript: Annotated[Path | None, typer.Option(help="Write the transcript here (JSON).")] = None,
    device: DeviceOpt = "cpu",
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="Where a dir: dataset lives on this machine.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Settle a disagreement over one segment: bisection over its steps, then over one step's operator graph,
    then a referee executes the single disputed operator. Exit code 1 when the solver loses, 0 when its
    commitment stands (a challenger out of time is a 0). Each party has a chess clock (--budget-ms); a party
    that stops answering, or whose messages are refused too often, loses on time.

    With --check TRANSCRIPT, a third party re-checks a dispute from what the transcript holds: exit 0 when it
    checks out, 1 otherwise, 2 when checking its ruling would need code or data this machine does not have. The
    job's code runs only for rulings that re-derive a batch, a dropout mask or a model buffer, and only from
    packages allowed with --allow-code.

    Examples:

      pol dispute run1 --segment 3 --transcript t.json

      pol dispute run1 --segment 3 --challenger disagree --processes

      pol dispute --check t.json
    """
    import pinpoint
    from pinpoint import Behaviour, Fault, Params

    code = _code_policy(allow_code)
    if check is not None:
        result = pinpoint.check_transcript(check, data_dir=data_dir, code=code)
        if as_json:
            print_json(result.to_dict())
        else:
            o = result.outcome
            out.print(f"transcript ok: {result.messages} messages, {result.rounds} rounds; {o.loser} loses by {o.by}: {o.reason}",
                      markup=False, highlight=False)
        return
    if bundle_path is None:
        raise typer.BadParameter("give a BUNDLE to dispute, or --check TRANSCRIPT", param_hint="BUNDLE")
    if challenger not in pinpoint.ANSWERS:
        raise typer.BadParameter(f"unknown challenger behaviour {challenger!r}: one of {', '.join(pinpoint.ANSWERS)}", param_hint="--challenger")
    from pol.bundle import open_bundle

    with open_bundle(bundle_path, full=False) as b:
        root = b.manifest.root
    solver_b = Behaviour(fault=Fault(fault_step, fault_node, fault_element) if fault_step is not None else None,
                         lie_step=lie_step, silent_from=silent_solver)
    challenger_b = Behaviour(answers=challenger, silent_from=silent_challenger)
    kwargs: dict[str, Any] = {}
    if processes:
        kwargs["solver_cmd"] = pinpoint.party_command("solver", bundle_path, solver_b, code=code, device=device)
        kwargs["challenger_cmd"] = pinpoint.party_command("challenger", bundle_path, challenger_b, segment=segment - 1,
                                                          code=code, device=device)

    def show(event: Any) -> None:
        if not as_json:
            err.print(event.describe(), highlight=False, markup=False)

    result = pinpoint.run_dispute(bundle_path, segment - 1, solver=solver_b, challenger=challenger_b,
                                  params=Params(budget_ms=budget_ms, commitment=root), on_event=show,
                                  transcript=transcript, device=device, data_dir=data_dir, code=code, **kwargs)
    if as_json:
        print_json(result.to_dict())
    else:
        o = result.outcome
        where = f" at step {result.step}, node {result.node} ({result.op})" if result.node is not None else ""
        out.print(f"ruling: {o.loser} loses by {o.by}{where}: {o.reason}", markup=False, highlight=False)
        out.print(f"{result.rounds} rounds, {result.messages} messages, {result.bytes:,} bytes; referee ran "
                  f"{result.referee_executed} operator(s), {result.referee_flops:,} FLOPs")
        if result.transcript:
            out.print(f"transcript {result.transcript}  (re-check: pol dispute --check {result.transcript})")
    raise typer.Exit(EXIT_FAILED if result.outcome.loser == "solver" else EXIT_OK)


game_app = typer.Typer(help="The incentive game: run a market with real work, or simulate strategies.", no_args_is_help=True)
ledger_app = typer.Typer(help="Inspect a ledger.", no_args_is_help=True)
app.add_typer(game_app, name="game")
app.add_typer(ledger_app, name="ledger")
@game_app.command("run")
@handle_errors()
def game_run(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where bundles, the journal and the ledger go.")] = Path("pol-market"),
    ledger_path: Annotated[Path | None, typer.Option("--ledger", help="SQLite ledger file (default WORKDIR/ledger.db).")] = None,
    tasks: Annotated[int, typer.Option(min=1, help="Jobs to post.")] = 2,
    solvers: Annotated[int, typer.Option(min=1, help="Competing solvers.")] = 3,
    verifiers: Annotated[int, typer.Option(min=1, help="Staked verifiers.")] = 3,
    cheater: Annotated[list[str] | None, typer.Option(help="A solver that forges its bundle (repeatable), e.g. solver-2.")] = None,
    lazy: Annotated[list[str] | None, typer.Option(help="A verifier that approves without checking (repeatable).")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the market.")] = 0,
    sampling: Annotated[str, typer.Option(help="'shared': the committee splits one sample; 'independent': each verifier samples alone.")] = "shared",
    confidence: Annotated[float | None, typer.Option(help="Required detection posted with each task: catch a cheat of --cheat-fraction with this probability.")] = None,
    cheat_fraction: Annotated[float, typer.Option(help="The cheat fraction the required detection is against.")] = 0.1,
    publish: Annotated[str, typer.Option(help="'local': parties read the solver's bundle directory; 'http': each solver serves its bundle over loopback HTTP and parties fetch by URL.")] = "local",
    as_json: JsonOpt = False,
) -> None:
    """Run a whole market with real work on the SQLite ledger: post, auction, train, commit, verify, dispute
    (pinpoint), settle; then print every party's compute and the protocol tax. Re-running on the same --workdir
    after a crash continues where it stopped, paying nothing twice. Then `pol ledger show WORKDIR/ledger.db`.
    With --publish http, verifiers and the referee fetch only the manifest and the checkpoints they replay, each
    checked against the posted commitment; a verifier that cannot fetch votes "unavailable" (never an approval)."""
    from games.market import render_compute, report_to_dict, run_market

    def show(event: Any) -> None:
        if not as_json:
            out.print(str(event), markup=False, highlight=False)

    report = run_market(workdir, ledger_path=ledger_path, n_tasks=tasks, n_solvers=solvers, n_verifiers=verifiers,
                        cheaters=tuple(cheater) if cheater is not None else ("solver-2",),
                        lazy_verifiers=tuple(lazy or ()), seed=seed, on_event=show, sampling=sampling,
                        detection=(confidence, cheat_fraction) if confidence is not None else None,
                        publish=publish)
    if as_json:
        print_json(report_to_dict(report))
        return
    out.print(f"\nledger {report.ledger_path}: supply {report.total_supply:,}, {report.ledger_events} events, {report.seconds:.1f} s")
    for name, balance in sorted(report.balances.items()):
        out.print(f"  {name:<14} {balance:>14,}")
    out.print("\ncompute (steps and wall seconds; protocol tax = protocol / training):")
    out.print(render_compute(report), markup=False, highlight=False)


@game_app.command("simulate")
@handle_errors()
def game_simulate(
    tasks: Annotated[int, typer.Option(min=1, help="Tasks to play.")] = 4000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the simulation.")] = 0,
    lazy: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of verifier seats that approve without checking.")] = 0.3,
    whistle: Annotated[float, typer.Option(min=0.0, max=1.0, help="Probability a whistleblower re-checks a task.")] = 0.2,
    sampling: Annotated[str, typer.Option(help="'independent': each verifier samples alone; 'shared': the committee splits one sample.")] = "independent",
    plot: Annotated[Path | None, typer.Option(help="Write a PNG plot here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Play many tasks with honest, cheating and lazy strategies on the in-memory ledger and report each
    strategy's expected profit per task, and the stake at which cheating stops paying."""
    from games.simulate import SimConfig, render_markdown, report_to_dict, save_plot, simulate
    from games.task import GameParams

    config = SimConfig(params=GameParams(sampling=sampling), n_tasks=tasks, seed=seed, lazy_fraction=lazy,
                       whistle_rate=whistle)
    report = simulate(config)
    if plot is not None:
        save_plot(report, plot)
        err.print(f"wrote {plot}")
    if as_json:
        print_json(report_to_dict(report))
    else:
        out.print(render_markdown(report), markup=False)


@ledger_app.command("show")
@handle_errors()
def ledger_show(
    path: Annotated[Path, typer.Argument(help="The SQLite ledger file.")] = Path("pol-ledger.sqlite"),
    events: Annotated[int, typer.Option(min=0, help="How many of the latest events to show.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Print balances, open escrows and the latest events of a ledger, after checking its invariants."""
    from games.ledger_sqlite import SqliteLedger
    from games.views import ledger_to_dict, render_ledger

    if not path.is_file():
        fail(escape(f"no ledger at {path}"), EXIT_USAGE, "pol game run creates one")
    with SqliteLedger(path, create=False) as ledger:
        if as_json:
            print_json(ledger_to_dict(ledger, last_events=events))
        else:
            out.print(render_ledger(ledger, last_events=events), markup=False)


@app.command()
@handle_errors()
def env(as_json: JsonOpt = False) -> None:
    """Print what a bug report needs: pol, torch, Python, the CPU's instruction set, threads, devices, whether the
    exact-numerics kernels compiled, and the versions of the libraries pol's results depend on.

    An exact bundle is verified with the torch version its spec names (`pol inspect BUNDLE` shows it)."""
    import importlib.metadata
    import platform

    import torch

    from pol import __version__
    from pol.exact import native

    def version_of(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    info: dict[str, Any] = {
        "pol": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda or "none (CPU build)",
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        "exact_kernels": native.available(),
        "exact_kernels_status": native.status(),
        "libraries": {d: version_of(d) for d in ("numpy", "safetensors", "blake3", "networkx", "typer", "rich", "transformers", "fsspec")},
    }
    if as_json:
        print_json(info)
        return
    for key, value in info.items():
        if key == "libraries":
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif key == "cuda_devices":
            value = ", ".join(value) or "none"
        out.print(f"{key:<22}{value}", markup=False)


def main() -> None:
    """The `pol` command. In a process torchrun started, it ends with `os._exit` once its output is flushed and its
    process group left: gloo's worker threads may otherwise free tensors during interpreter finalization, which
    aborts the process ("terminate called without an active exception") after the work succeeded."""
    from pol import distributed

    if not distributed.launched_by_torchrun():
        app()
        return
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    distributed.leave_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
