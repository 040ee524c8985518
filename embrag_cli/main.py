"""The ``embrag`` command line. Thin: parse options, call a flow or a storage function, print a summary."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
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


def _env_defaults() -> None:
    # Offline machines: no telemetry; generous start-up for Prefect's temporary local server.
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }.items():
        os.environ.setdefault(key, value)


def load_config(run_dir: Path, config: Path | None, overrides: list[str] | None):
    """Config from ``--config``, else ``<run_dir>/config.json``, else defaults; then ``--set`` overrides."""
    from embrag.config import RunConfig

    path = config or (run_dir / "config.json")
    cfg = RunConfig.from_dict(json.loads(path.read_text())) if path.exists() else RunConfig()
    for item in overrides or []:
        key, _, raw = item.partition("=")
        section, _, name = key.partition(".")
        if not (section and name and raw):
            raise typer.BadParameter(f"--set {item!r}: expected section.field=value, e.g. train.epochs=3")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        cfg = cfg.replace(**{f"{section}__{name}": tuple(value) if isinstance(value, list) else value})
    return cfg


def _save_config(run_dir: Path, cfg) -> Path:
    from storage.atomic import write_json

    path = run_dir / "config.json"
    write_json(path, cfg.to_dict())
    return path


@app.callback()
def main(verbose: Annotated[int, typer.Option("-v", count=True, help="-v info, -vv debug")] = 0) -> None:
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _env_defaults()


@app.command()
def config(run_dir: RunDir = Path("runs/demo"), config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Write the resolved config to <run-dir>/config.json (edit it, then pass it back)."""
    cfg = load_config(run_dir, config, set_)
    typer.echo(_save_config(run_dir, cfg))


@app.command()
def simulate(run_dir: RunDir = Path("runs/demo"), config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Simulate a human-like panel, study cohort, test set and array target (stdpopsim/msprime)."""
    from storage.layout import RunLayout
    from storage.simulate import simulate as run_simulation

    cfg = load_config(run_dir, config, set_)
    t0 = time.perf_counter()
    result = run_simulation(cfg.simulate, RunLayout(run_dir).vcf_dir)
    typer.echo(f"simulated {result.n_sites} sites ({result.n_array_sites} array sites) for "
               f"{result.n_panel} panel / {result.n_study} study / {result.n_test} test samples "
               f"in {time.perf_counter() - t0:.1f} s -> {result.panel_vcf.parent}")


@app.command()
def prepare(
    run_dir: RunDir = Path("runs/demo"), config: ConfigOpt = None, set_: SetOpt = None,
    panel: Annotated[Path | None, typer.Option(help="Reference panel VCF (default: simulate)")] = None,
    study: Annotated[Path | None, typer.Option(help="Optional study cohort VCF: extra train/val queries")] = None,
    test: Annotated[Path | None, typer.Option(help="Held-out test VCF")] = None,
) -> None:
    """Ingest VCFs into Zarr, harmonise sites and roles, cut windows and tokens."""
    from storage.layout import RunLayout
    from storage.prepare import prepare as run_prepare
    from storage.simulate import simulate as run_simulation

    cfg = load_config(run_dir, config, set_)
    _save_config(run_dir, cfg)
    layout = RunLayout(run_dir)
    if panel is None:
        sim = run_simulation(cfg.simulate, layout.vcf_dir)
        panel, study, test = sim.panel_vcf, sim.study_vcf, sim.test_vcf
    summary = run_prepare(layout, cfg, panel_vcf=panel, study_vcf=study, test_vcf=test)
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
    cfg = load_config(run_dir, config, set_).replace(model__variant=variant)
    path = _save_config(run_dir, cfg.replace(model__variant="v18"))
    if prefect:
        from flows.train import train_flow

        train_flow(run_dir=str(run_dir), variant=variant, config_path=str(path))
        _print_mlflow(run_dir, None, f"The trained variants of {run_dir} in the MLflow UI:")
    else:
        _train_local(run_dir, cfg)


def _train_local(run_dir: Path, cfg) -> list[dict]:
    from storage.layout import RunLayout
    from storage.training import VariantRun, run_epochs

    run = VariantRun(RunLayout(run_dir), cfg)
    return run_epochs(run, on_epoch=lambda row: typer.echo(_epoch_line(cfg.model.variant, row, cfg.train.epochs)))


def _epoch_line(variant: str, row: dict, n_epochs: int) -> str:
    # 0-based like the files (epoch-000.pt) and MLflow steps; "(1 of 3)" says how far along
    return (f"[{variant}] epoch {row['epoch']} ({row['epoch'] + 1} of {n_epochs}): train loss {row['train_loss']:.4f}  "
            f"val loss {row['val_loss']:.4f}  "
            f"val F1 {row['val_f1']:.4f}  rare F1 {row['val_rare_f1']:.4f}  r2 {row.get('val_r2_all', float('nan')):.4f}  "
            f"mask v{row['mask_version']}  {row['train_ms_per_batch']:.1f} ms/batch")


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="Run directory to continue")],
    variant: Annotated[str, typer.Option(help="v18 | v17 | none")] = "v18",
    epochs: Annotated[int | None, typer.Option(help="Total epochs (default: the config's)")] = None,
) -> None:
    """Continue a run without a Prefect server: finished stages are found on disk and skipped."""
    cfg = load_config(run_dir, None, None).replace(model__variant=variant)
    if epochs is not None:
        cfg = cfg.replace(train__epochs=epochs)
    _train_local(run_dir, cfg)


@app.command()
def compare(
    run_dir: RunDir = Path("runs/demo"), config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Train V17 and V18 on the same data and seeds; one MLflow parent run with a child per variant."""
    from flows.compare import compare_flow

    cfg = load_config(run_dir, config, set_)
    path = _save_config(run_dir, cfg)
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
    path = _save_config(run_dir, cfg)
    from flows.compare import compare_flow
    from flows.prepare import prepare_flow

    typer.echo(f"embrag demo in {run_dir} (config {path})")
    prepare_flow(run_dir=str(run_dir), config_path=str(path))
    rows = compare_flow(run_dir=str(run_dir), config_path=str(path))
    _print_table(rows)
    from flows.impute import impute_flow

    for variant in ("v17", "v18"):  # the held-out array samples, imputed and scored against their truth
        s = impute_flow(run_dir=str(run_dir), variant=variant)
        typer.echo(f"\n{variant}: imputed {s['n_samples']} array samples in {s['seconds']:.1f} s -> {s['out_vcf']}\n"
                   f"{s['evaluation']['table']}" + (f"\n  note: {s['warning']}" if s["warning"] else ""))
    typer.echo(f"\ndone in {time.perf_counter() - t0:.0f} s.")
    _print_mlflow(run_dir, [r["mlflow_run_id"] for r in rows], "V17 vs V18 in the MLflow UI:")


@app.command()
def impute(
    target: Annotated[Path | None, typer.Option(help="Phased target VCF/BCF (default: the simulated array samples)")] = None,
    out: Annotated[Path | None, typer.Option(help="Imputed VCF to write, .vcf.gz + .tbi (default: <run-dir>/imputed/)")] = None,
    run_dir: Annotated[Path, typer.Option("--run-dir", "--panel", help="Prepared run: the panel and sites the model was trained on")] = Path("runs/demo"),
    model: Annotated[Path | None, typer.Option("--model", "--checkpoint", help="Checkpoint (default: last epoch of --variant)")] = None,
    variant: Annotated[str, typer.Option(help="v18 | v17 | none: whose last checkpoint, when --model is not given")] = "v18",
    truth: Annotated[Path | None, typer.Option(help="Truth VCF: score the output by MAF bin")] = None,
    allow_panel_overlap: Annotated[bool, typer.Option(
        help="Allow target samples that are panel samples (their own panel rows are then never retrieved)")] = False,
    sample_chunk: Annotated[int, typer.Option(help="Target samples imputed at once (bounds memory)")] = 500,
    prefect: Annotated[bool, typer.Option(help="Run as the Prefect impute flow")] = False,
) -> None:
    """Impute every panel site for the samples of a phased target VCF (GT:DS:GP:HDS; INFO AF, R2, IMP/TYPED)."""
    if prefect:
        from flows.impute import impute_flow

        s = impute_flow(run_dir=str(run_dir), variant=variant, checkpoint=model and str(model),
                        target_vcf=target and str(target), out_vcf=out and str(out), truth_vcf=truth and str(truth),
                        allow_panel_overlap=allow_panel_overlap, sample_chunk=sample_chunk)
        table = s.get("evaluation", {}).get("table")
    else:
        import dataclasses

        from storage.impute import default_paths, evaluate_imputed, impute_vcf

        model, target, out, truth = default_paths(run_dir, variant, model, target, out, truth)
        s = dataclasses.asdict(impute_vcf(model, run_dir, target, out, sample_chunk=sample_chunk,
                                          allow_panel_overlap=allow_panel_overlap))
        table = evaluate_imputed(run_dir, truth, out)[0].table() if truth else None
    typer.echo(f"imputed {s['n_samples']} samples ({s['variant']}, k={s['k']} neighbours, temperature "
               f"{s['temperature']:.2f}): {s['n_typed_sites']} typed + "
               f"{s['n_imputed_sites']} imputed sites -> {s['out_vcf']} ({s['seconds']:.1f} s)")
    typer.echo(f"  REF/ALT swapped (flipped) {s['n_swapped']}, strand-ambiguous kept {s['n_ambiguous']} / "
               f"dropped {s['n_ambiguous_dropped']}, not in panel {s['n_absent']}, skipped {s['n_skipped']}, "
               f"missing calls {s['n_missing_calls']}")
    if s.get("warning"):
        typer.echo(f"  warning: {s['warning']}", err=True)
    if table:
        typer.echo(table)


@app.command()
def evaluate(
    truth: Annotated[Path, typer.Option(help="Truth VCF (phased GT)")],
    imputed: Annotated[Path, typer.Option(help="Imputed VCF with DS (embrag, Beagle, minimac4)")],
    panel: Annotated[Path, typer.Option(help="Panel VCF: MAF bins come from the panel")],
    out: Annotated[Path, typer.Option(help="Folder for the table and the plot")] = Path("evaluation"),
) -> None:
    """Score an imputed VCF against the truth: r^2, IQS, NRD per MAF bin; table + plot."""
    from storage.evaluate import evaluate_vcfs, write_report

    report = evaluate_vcfs(truth, imputed, panel)
    paths = write_report(report, out)
    typer.echo(report.table())
    typer.echo(f"written: {paths}")


def run() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    run()
