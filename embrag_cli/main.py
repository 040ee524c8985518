"""The ``embrag`` command line. Thin: parse options, call a flow or a storage function, print a summary.

Failures: a :class:`embrag.errors.UserError` (and an OSError such as a full or read-only disk) is
printed as one line, ``error (embrag <command>): <file>: <what>; <fix>``, exit status 2; anything
else is a bug, printed as one line too, exit status 1; ``-v`` adds the traceback. Checks run before
anything is written: ``--variant`` and ``--set`` are validated against the config dataclasses, the
run directory is locked for writers (``storage.locks``), and ``config.json`` is written only once
the settings agree with the artifacts already there (``storage.lineage.check_config``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated

# Before torch/faiss load OpenMP: idle OpenMP workers must sleep, not spin. With spinning workers
# (the default) small torch ops ran ~100x slower here whenever another process shared the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Retrieval-augmented genotype imputation (V17 vs V18).")

RunDir = Annotated[Path, typer.Option("--run-dir", help="Folder holding every artifact of the run.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="RunConfig JSON (see `embrag config`).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set train.epochs=3 (repeatable).")]


def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM ends the command like Ctrl-C does: through Python's exit path, so atexit handlers run.
    Prefect stops its temporary local server in one (``SubprocessASGIServer.stop``); with the default
    SIGTERM action the process vanished and left that server running."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def _env_defaults() -> None:
    # Offline machines: no telemetry; generous start-up for Prefect's temporary local server.
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }.items():
        os.environ.setdefault(key, value)


_VERBOSE = {"level": 0}


def load_config(run_dir: Path, config: Path | None, overrides: list[str] | None):
    """Config from ``--config``, else ``<run_dir>/config.json``, else defaults; then ``--set`` overrides.

    Every value is checked against the config dataclasses (types, ranges, unknown fields with a
    suggestion); nothing is written.
    """
    from embrag.settings import apply_overrides
    from storage.run_config import read_config

    return apply_overrides(read_config(run_dir, config), overrides or [])


def _check_variant(variant: str) -> str:
    """``--variant`` must be a model variant before any path is built from it."""
    from embrag.config import ModelConfig
    from embrag.settings import check_choice

    return check_choice(variant, ModelConfig, "variant", "--variant")


def _need_prepared(run_dir: Path) -> None:
    from embrag.errors import UserError
    from storage.layout import RunLayout

    if not RunLayout(run_dir).is_prepared():
        raise UserError(f"{run_dir}: no prepared data (data/prepared.zarr); run `embrag prepare --run-dir {run_dir}` first")


def _lock(run_dir: Path, command: str):
    from storage.locks import hold_run_dir

    return hold_run_dir(run_dir, f"embrag {command}")


def _save_config(run_dir: Path, cfg, **check) -> Path:
    """Check ``cfg`` against the run directory's artifacts, then write ``config.json`` (call under the lock)."""
    from storage.atomic import write_json
    from storage.layout import RunLayout
    from storage.lineage import check_config

    layout = RunLayout(run_dir)
    check_config(layout, cfg, **check)
    path = layout.config
    write_json(path, cfg.to_dict())
    return path


@app.callback()
def main(verbose: Annotated[int, typer.Option("-v", count=True, help="-v info and tracebacks, -vv debug")] = 0) -> None:
    _VERBOSE["level"] = verbose
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _env_defaults()


@app.command()
def config(run_dir: RunDir = Path("runs/demo"), config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Write the resolved config to <run-dir>/config.json (edit it, then pass it back)."""
    cfg = load_config(run_dir, config, set_)
    with _lock(run_dir, "config"):
        typer.echo(_save_config(run_dir, cfg))


@app.command()
def simulate(run_dir: RunDir = Path("runs/demo"), config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Simulate a human-like panel, study cohort, test set and array target (stdpopsim/msprime)."""
    from storage.layout import RunLayout
    from storage.simulate import simulate as run_simulation

    cfg = load_config(run_dir, config, set_)
    t0 = time.perf_counter()
    with _lock(run_dir, "simulate"):
        _save_config(run_dir, cfg)  # the next step (`embrag prepare`) reads these settings
        result = run_simulation(cfg.simulate, RunLayout(run_dir).vcf_dir)
    typer.echo(f"simulated {result.n_sites} sites ({result.n_array_sites} array sites) for "
               f"{result.n_panel} panel / {result.n_study} study / {result.n_test} test samples "
               f"in {time.perf_counter() - t0:.1f} s -> {result.panel_vcf.parent}")


@app.command()
def prepare(
    run_dir: RunDir = Path("runs/demo"), config: ConfigOpt = None, set_: SetOpt = None,
    panel: Annotated[Path | None, typer.Option("--panel-vcf", "--panel", help="Reference panel VCF (default: simulate)")] = None,
    study: Annotated[Path | None, typer.Option("--study-vcf", "--study", help="Optional study cohort VCF: extra train/val queries")] = None,
    test: Annotated[Path | None, typer.Option("--test-vcf", "--test", help="Held-out test VCF")] = None,
    force: Annotated[bool, typer.Option(
        help="Prepare other inputs or settings even though variants are trained: they move to superseded/")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Threads writing runs of windows at once (same bytes; "
                                                     "memory grows with it)")] = 1,
) -> None:
    """Ingest VCFs into Zarr, harmonise sites and roles, cut windows and tokens (a panel alone is enough:
    its samples are then the training and validation queries, never retrieving their own haplotypes)."""
    from storage.layout import RunLayout
    from storage.lineage import check_config
    from storage.prepare import prepare as run_prepare
    from storage.simulate import simulated_inputs

    cfg = load_config(run_dir, config, set_)
    layout = RunLayout(run_dir)
    with _lock(run_dir, "prepare"):
        check_config(layout, cfg, prepared_too=False, variants_too=not force)
        if panel is None:  # the run's simulation: reused when made with these settings, refused when not
            sim = simulated_inputs(cfg.simulate, layout.vcf_dir)
            panel, study, test = sim.panel_vcf, sim.study_vcf, sim.test_vcf
        summary = run_prepare(layout, cfg, panel_vcf=panel, study_vcf=study, test_vcf=test, force=force,
                              workers=workers)
        _save_config(run_dir, cfg, variants_too=False)  # after success: config.json describes the prepared data
    _print_prepare(summary)


def _print_prepare(s) -> None:
    typer.echo(f"prepared {s.path}: {s.n_sites} sites, {s.n_windows} windows of {s.window_size} sites")
    typer.echo("  samples per role: " + ", ".join(f"{k}={v}" for k, v in s.samples.items()))
    skipped = {k: sum(v.values()) for k, v in s.skipped_records.items()}
    typer.echo(f"  skipped records: {skipped}; panel-only sites {s.n_panel_only_sites}, study-only {s.n_study_only_sites}")


@app.command()
def train(
    run_dir: RunDir = Path("runs/demo"), config: ConfigOpt = None, set_: SetOpt = None,
    variant: Annotated[str, typer.Option(help="v18 | v17 | none")] = "v18",
    prefect: Annotated[bool, typer.Option(help="Run as a Prefect flow with MLflow tracking")] = True,
) -> None:
    """Train one variant on a prepared run directory."""
    _check_variant(variant)
    cfg = load_config(run_dir, config, set_).replace(model__variant=variant)
    _need_prepared(run_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: data parallel
        if prefect:
            raise typer.BadParameter("under torchrun, train with --no-prefect (one process per device; "
                                     "rank 0 writes the run's files)", param_hint="--prefect")
        _train_parallel(run_dir, cfg)
        return
    with _lock(run_dir, "train"):
        path = _save_config(run_dir, cfg.replace(model__variant="v18"))
        if prefect:
            from flows.train import train_flow

            train_flow(run_dir=str(run_dir), variant=variant, config_path=str(path))
            _print_mlflow(run_dir, None, f"The trained variants of {run_dir} in the MLflow UI:")
        else:
            _train_local(run_dir, cfg)
    _print_next(run_dir, variant)


def _train_parallel(run_dir: Path, cfg) -> None:
    """``embrag train --no-prefect`` in each of torchrun's processes (``storage.distributed``): rank 0
    holds the run directory's lock and writes; every rank trains its share of each batch."""
    from storage.distributed import barrier, finish, init_from_env, is_writer

    init_from_env()
    try:
        with _lock(run_dir, "train") if is_writer() else contextlib.nullcontext():
            if is_writer():
                _save_config(run_dir, cfg.replace(model__variant="v18"))
            barrier()
            _train_local(run_dir, cfg)
        if is_writer():
            _print_next(run_dir, cfg.model.variant)
    finally:
        finish()


def _print_next(run_dir: Path, variant: str) -> None:
    """Where the model is, and the command that uses it."""
    from storage.layout import RunLayout

    checkpoint = RunLayout(run_dir).variant(variant).latest_checkpoint()
    typer.echo(f"checkpoint: {checkpoint}\nnext: embrag impute --run-dir {run_dir} --model {checkpoint} "
               "--target-vcf TARGET.vcf.gz [--truth-vcf TRUTH.vcf.gz]")


def _train_local(run_dir: Path, cfg, epochs: int | None = None) -> list[dict]:
    from storage.distributed import barrier, is_writer
    from storage.layout import RunLayout
    from storage.training import run_epochs
    from storage.variant import VariantRun

    # refuses artifacts of other data or settings (storage.lineage); rank 0 first, it may record them
    run = VariantRun(RunLayout(run_dir), cfg) if is_writer() else None
    barrier()
    run = run or VariantRun(RunLayout(run_dir), cfg)
    n_epochs = epochs if epochs is not None else cfg.train.epochs

    def echo(row: dict) -> None:
        if is_writer():
            typer.echo(_epoch_line(cfg.model.variant, row, n_epochs))

    return run_epochs(run, epochs, on_epoch=echo)


def _epoch_line(variant: str, row: dict, n_epochs: int) -> str:
    # 0-based like the files (epoch-000.pt) and MLflow steps; "(1 of 3)" says how far along
    return (f"[{variant}] epoch {row['epoch']} ({row['epoch'] + 1} of {n_epochs}): train loss {row['train_loss']:.4f}  "
            f"val loss {row['val_loss']:.4f}  "
            f"val F1 {row['val_f1']:.4f}  rare F1 {row['val_rare_f1']:.4f}  r2 {row.get('val_r2_all', float('nan')):.4f}  "
            f"mask v{row['mask_version']}  {row['train_ms_per_batch']:.1f} ms/batch")


@app.command()
def resume(
    run_dir: RunDir = Path("runs/demo"),
    variant: Annotated[str, typer.Option(help="v18 | v17 | none")] = "v18",
    epochs: Annotated[int | None, typer.Option(
        help="Train up to this many epochs of the planned train.epochs (default: all)")] = None,
) -> None:
    """Continue a run without a Prefect server: finished stages are found on disk and skipped."""
    from embrag.errors import ConfigError

    _check_variant(variant)
    cfg = load_config(run_dir, None, None).replace(model__variant=variant)
    if epochs is not None and not 0 < epochs <= cfg.train.epochs:
        # train.epochs sets the LR schedule: more epochs is another run, not a continuation of this one
        raise ConfigError(f"--epochs {epochs}: must be in 1..{cfg.train.epochs} (train.epochs of {run_dir}/config.json, "
                          "which sets the learning-rate schedule); to train longer, use a new run dir with a larger "
                          "train.epochs")
    _need_prepared(run_dir)
    with _lock(run_dir, "resume"):
        _train_local(run_dir, cfg, epochs)
    _print_next(run_dir, variant)


@app.command()
def compare(
    run_dir: RunDir = Path("runs/demo"), config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Train V17 and V18 on the same data and seeds; one MLflow parent run with a child per variant."""
    cfg = load_config(run_dir, config, set_)
    _need_prepared(run_dir)
    with _lock(run_dir, "compare"):
        path = _save_config(run_dir, cfg)
        from flows.compare import compare_flow

        rows = compare_flow(run_dir=str(run_dir), config_path=str(path))
    _print_table(rows)
    _print_mlflow(run_dir, [r["mlflow_run_id"] for r in rows], "V17 vs V18 in the MLflow UI:")


def _print_mlflow(run_dir: Path, run_ids: list[str] | None, title: str) -> None:
    """The MLflow UI link of ``run_ids`` (default: the run directory's variant runs), printed last,
    after the command that serves the UI for a local store."""
    from storage.layout import RunLayout
    from storage.tracking import tracking_uri, ui_link

    layout = RunLayout(run_dir)
    lines = ui_link(layout, run_ids).lines() or [f"runs {run_ids or ''} in {tracking_uri(layout)} (no UI address known)"]
    typer.echo("\n".join([title, *(f"  {line}" for line in lines)]))


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    typer.echo("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        typer.echo("  ".join(_fmt(r.get(k)).ljust(widths[k]) for k in keys))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


DEMO_OVERRIDES = ["train.epochs=3", "train.max_train_batches=150", "train.max_val_batches=60"]


@app.command()
def demo(run_dir: RunDir = Path("runs/demo"), set_: SetOpt = None) -> None:
    """Simulate -> prepare -> compare V17 and V18 for a few CPU epochs -> impute the array samples -> print."""
    t0 = time.perf_counter()
    cfg = load_config(run_dir, None, DEMO_OVERRIDES + list(set_ or []))
    with _lock(run_dir, "demo"):
        path = _save_config(run_dir, cfg)
        from flows.compare import compare_flow
        from flows.prepare import prepare_flow

        typer.echo(f"embrag demo in {run_dir} (config {path})")
        prepare_flow(run_dir=str(run_dir), config_path=str(path))
        rows = compare_flow(run_dir=str(run_dir), config_path=str(path))
        _print_table(rows)
        from flows.impute import impute_flow

        summaries = {variant: impute_flow(run_dir=str(run_dir), variant=variant) for variant in ("v17", "v18")}
    for variant, s in summaries.items():  # the held-out array samples, imputed and scored against their truth
        typer.echo(f"\n{variant}: imputed {s['n_samples']} array samples in {s['seconds']:.1f} s -> {s['out_vcf']}\n"
                   f"{s['evaluation']['table']}")
    _print_legend()  # the flows logged any design warning once each
    typer.echo(f"\ndone in {time.perf_counter() - t0:.0f} s.")
    _print_mlflow(run_dir, [r["mlflow_run_id"] for r in rows], "V17 vs V18 in the MLflow UI:")


@app.command()
def impute(
    target: Annotated[list[Path] | None, typer.Option("--target-vcf", "--target", help=(
        "Phased target VCF/BCF (default: the simulated array samples); repeat it to impute several targets "
        "with the model loaded once"))] = None,
    out: Annotated[Path | None, typer.Option(help=(
        "Imputed VCF to write, .vcf.gz + .tbi (default: <run-dir>/imputed/); with several targets, a folder "
        "receiving <target>.<variant>.vcf.gz each"))] = None,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Prepared run: the panel and sites the model was trained on")] = Path("runs/demo"),
    model: Annotated[Path | None, typer.Option("--model", "--checkpoint", help="Checkpoint (default: last epoch of --variant)")] = None,
    variant: Annotated[str, typer.Option(help="v18 | v17 | none: whose last checkpoint, when --model is not given")] = "v18",
    truth: Annotated[Path | None, typer.Option("--truth-vcf", "--truth", help="Truth VCF: score the output by MAF bin")] = None,
    allow_panel_overlap: Annotated[bool, typer.Option(
        help="Allow target samples that are panel samples (their own panel rows are then never retrieved)")] = False,
    sample_chunk: Annotated[int, typer.Option(help="Target samples imputed at once (bounds memory)")] = 500,
    threads: Annotated[int | None, typer.Option(help="Threads of torch, FAISS and the BLAS libraries (default 1: more only spin; run targets in parallel instead)")] = None,
    prior_gate: Annotated[float | None, typer.Option(help=(
        "Haplotypes whose Li-Stephens prior is within this of 0 or 1 at every site of a window take the prior "
        "without the model (default: the gate validation chose for the checkpoint, else its model.prior_gate; 0 = the model everywhere)"))] = None,
    depth: Annotated[str | None, typer.Option(help=(
        "How far the other haplotypes go through the model: transformer | copy (the copy head on the retrieved "
        "neighbours, no transformer) | prior (the output head on the prior, no retrieval) (default: the depth "
        "validation chose for the checkpoint, else its model.depth)"))] = None,
    prefect: Annotated[bool, typer.Option(help="Run as the Prefect impute flow (impute-many with several targets)")] = False,
) -> None:
    """Impute every panel site for the samples of a phased target VCF (GT:DS:GP:HDS; INFO AF, R2, RSQ, IMP/TYPED)."""
    _check_variant(variant)
    if target and len(target) > 1:
        if truth is not None:
            raise typer.BadParameter("--truth scores one target; impute and score them one at a time",
                                     param_hint="--truth-vcf")
        _impute_many(target, out, run_dir, model, variant, allow_panel_overlap, sample_chunk, threads, prefect,
                     prior_gate, depth)
        return
    target = target[0] if target else None
    if prefect:
        from flows.impute import impute_flow

        s = impute_flow(run_dir=str(run_dir), variant=variant, checkpoint=model and str(model),
                        target_vcf=target and str(target), out_vcf=out and str(out), truth_vcf=truth and str(truth),
                        allow_panel_overlap=allow_panel_overlap, sample_chunk=sample_chunk, threads=threads,
                        prior_gate=prior_gate, depth=depth)
        table = s.get("evaluation", {}).get("table")
    else:
        import dataclasses

        from storage.impute import default_paths, evaluate_imputed, impute_vcf

        model, target, out, truth = default_paths(run_dir, variant, model, target, out, truth)
        s = dataclasses.asdict(impute_vcf(model, run_dir, target, out, sample_chunk=sample_chunk,
                                          allow_panel_overlap=allow_panel_overlap, threads=threads,
                                          prior_gate=prior_gate, depth=depth))
        table = evaluate_imputed(run_dir, truth, out)[0].table() if truth else None
    _print_imputed(s, warn=not prefect)  # the flow logged any warning already
    if table:
        typer.echo(table)
        _print_legend()


def _impute_many(targets: list[Path], out: Path | None, run_dir: Path, model: Path | None, variant: str,
                 allow_panel_overlap: bool, sample_chunk: int, threads: int | None, prefect: bool,
                 prior_gate: float | None = None, depth: str | None = None) -> None:
    """Several targets, one model load: outputs ``<out or run-dir/imputed>/<target>.<variant>.vcf.gz``."""
    from storage.impute import many_outputs

    outs = many_outputs(run_dir, variant, targets, out)
    if prefect:
        from flows.impute import impute_many_flow

        summaries = impute_many_flow(run_dir=str(run_dir), target_vcfs=[str(t) for t in targets],
                                     out_dir=out and str(out), variant=variant, checkpoint=model and str(model),
                                     allow_panel_overlap=allow_panel_overlap, sample_chunk=sample_chunk,
                                     threads=threads, prior_gate=prior_gate, depth=depth)
    else:
        import dataclasses

        from storage.impute import default_paths, impute_many

        checkpoint = default_paths(run_dir, variant, model, targets[0], outs[0], None)[0]
        summaries = [dataclasses.asdict(s) for s in impute_many(
            checkpoint, run_dir, list(zip(targets, outs, strict=True)), allow_panel_overlap=allow_panel_overlap,
            sample_chunk=sample_chunk, threads=threads, prior_gate=prior_gate, depth=depth)]
    for s in summaries:
        _print_imputed(s, warn=not prefect)


def _print_imputed(s: dict, *, warn: bool) -> None:
    typer.echo(f"imputed {s['n_samples']} samples ({s['variant']}, k={s['k']} neighbours, temperature "
               f"{s['temperature']:.2f}): {s['n_typed_sites']} typed + "
               f"{s['n_imputed_sites']} imputed sites -> {s['out_vcf']} ({s['seconds']:.1f} s)")
    typer.echo(f"  REF/ALT swapped (flipped) {s['n_swapped']}, strand-ambiguous kept {s['n_ambiguous']} / "
               f"dropped {s['n_ambiguous_dropped']}, not in panel {s['n_absent']}, skipped {s['n_skipped']}, "
               f"missing calls {s['n_missing_calls']}")
    if s.get("prior_gate"):
        size = f"effective size {s.get('hmm_ne', 0):g}" + (f", {s['hmm_ne_rare']:g} below 0.5 % MAF"
                                                          if s.get("hmm_ne_rare") else "")
        typer.echo(f"  the prior decided {s['prior_decided']:.0%} of haplotype-windows alone (prior gate "
                   f"{s['prior_gate']:g}, {size}); the model imputed the rest "
                   f"(depth {s.get('depth', 'transformer')})")
    if s.get("warning") and warn:
        typer.echo(f"  warning: {s['warning']}", err=True)


def _print_legend() -> None:
    from storage.evaluate import LEGEND

    typer.echo("\n".join(LEGEND))


@app.command()
def evaluate(
    truth: Annotated[Path, typer.Option("--truth-vcf", "--truth", help="Truth VCF (phased GT)")],
    imputed: Annotated[Path, typer.Option("--imputed-vcf", "--imputed", help="Imputed VCF with DS (embrag, Beagle, minimac4)")],
    panel: Annotated[Path, typer.Option("--panel-vcf", "--panel", help="Panel VCF: MAF bins come from the panel")],
    out: Annotated[Path | None, typer.Option(
        help="Folder for the table and the plot (default: beside the imputed VCF, <name>.evaluation/)")] = None,
) -> None:
    """Score an imputed VCF against the truth: r^2, IQS, NRD per MAF bin; table + plot."""
    from storage.errors import VcfInputError
    from storage.evaluate import evaluate_vcfs, write_report
    from storage.layout import evaluation_dir

    for option, path in (("--truth-vcf", truth), ("--imputed-vcf", imputed), ("--panel-vcf", panel)):
        if not path.is_file():
            raise VcfInputError(f"{path}: file not found; pass the path of a VCF/BCF as {option}")

    report = evaluate_vcfs(truth, imputed, panel)
    paths = write_report(report, out if out is not None else evaluation_dir(imputed))
    typer.echo(report.table())
    _print_legend()
    typer.echo(f"written: {paths}")


@app.command()
def recover(run_dir: RunDir = Path("runs/demo")) -> None:
    """After a crash (kill -9, a dead worker): mark the dead process's Prefect flow runs Crashed so they can
    be retried (`prefect flow-run retry ID`), and say what was left."""
    from embrag.errors import UserError
    from flows._guard import recover_run_dir

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run dir; pass the --run-dir of the command that died")
    for line in recover_run_dir(run_dir):
        typer.echo(line)


def failure(exc: BaseException, command: str) -> tuple[str, int]:
    """The one line printed for a failure, and the exit status (2: the user can fix it; 1: a bug)."""
    from embrag.errors import UserError

    if isinstance(exc, UserError | FileNotFoundError):
        message, status = str(exc), 2
    elif isinstance(exc, OSError):
        message, status = _os_error(exc), 2
    elif isinstance(exc, ValueError):  # older checks raise ValueError with a user-facing message
        message, status = str(exc), 2
    else:
        message, status = (f"internal error ({type(exc).__name__}: {exc}); this is a bug: rerun with -v for the "
                           "traceback and report it"), 1
    return f"error (embrag {command}): " + " ".join(message.split()), status


def _os_error(exc: OSError) -> str:
    where = exc.filename or "a file of the run"
    if exc.errno == errno.ENOSPC:
        return (f"{where}: no space left on device; free space and rerun: finished stages are kept, "
                "the interrupted one is redone (nothing half-written is ever used)")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where}: {exc.strerror}; make it writable (or use another --run-dir / --out) and rerun"
    if exc.errno is None:  # raised by a library with a message only (htslib: "Error opening ...")
        return f"{exc}; check that the file exists and is readable"
    return f"{where}: {exc.strerror or exc} (errno {exc.errno})"


def _command(argv: list[str]) -> str:
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    return next((a for a in argv if a in names), "")


def run(argv: list[str] | None = None) -> None:
    """Console entry point: every failure ends as one line on stderr (``-v``: with the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    _stop_cleanly_on_sigterm()
    try:
        app(args=argv)
    except (SystemExit, KeyboardInterrupt):  # exit status as given; Ctrl-C: Python's own 130 after cleanup
        raise
    except BaseException as exc:  # noqa: BLE001 - the CLI's last word on any failure
        if _VERBOSE["level"]:
            traceback.print_exception(exc, file=sys.stderr)
        line, status = failure(exc, _command(argv))
        typer.echo(line, err=True)
        sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    run()
