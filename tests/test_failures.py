"""Nothing silently wrong: the review's reproductions (D1-D14), run through the `embrag` command.

Each case ends either in exit status 2 with one line ``error (embrag <command>): ...`` naming the
file, the record or stage and the fix, with the run directory byte for byte as it was; or in the
correct result. The tiny run is trained once (V18, 2 epochs, no Prefect) and copied per test.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embrag_cli.main import run
from storage.layout import RunLayout
from storage.locks import RUN_LOCK

REPO = Path(__file__).resolve().parent.parent


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``embrag *argv`` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        run([str(a) for a in argv])
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def error_line(err: str, command: str) -> str:
    """The one error line of a failed command (no traceback, nothing else starting with "error")."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error (embrag {command}): "), lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the lock file aside: holding it is not a change)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != RUN_LOCK}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def trained(prepared_template, tmp_path_factory) -> Path:
    """A tiny run dir with V18 trained for 2 epochs by `embrag train --no-prefect` (read-only: copy it)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(prepared_template, run_dir)
    with pytest.raises(SystemExit) as done:
        run(["train", "--run-dir", str(run_dir), "--variant", "v18", "--no-prefect"])
    assert done.value.code == 0
    return run_dir


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


@pytest.fixture(scope="module")
def other(tmp_path_factory, prepared_template) -> Path:
    """A second prepared run dir: the same settings, another simulation (another panel, other sites)."""
    from embrag.config import RunConfig
    from storage.prepare import prepare
    from storage.simulate import simulate

    layout = RunLayout(tmp_path_factory.mktemp("other") / "run")
    cfg = RunConfig.from_dict(json.loads((prepared_template / "config.json").read_text()))
    sim = simulate(cfg.replace(simulate__seed=777).simulate, layout.vcf_dir)
    prepare(layout, cfg, panel_vcf=sim.panel_vcf, study_vcf=sim.study_vcf, test_vcf=sim.test_vcf)
    return layout.root


def _vcfs(root: Path) -> list[str]:
    vcf = RunLayout(root).vcf_dir
    return ["--panel", str(vcf / "panel.vcf.gz"), "--study", str(vcf / "study.vcf.gz"), "--test", str(vcf / "test.vcf.gz")]


def _swap_prepared(run_dir: Path, source: Path) -> None:
    """What an older embrag allowed: the prepared data replaced under trained variants."""
    data = RunLayout(run_dir).prepared
    shutil.rmtree(data)
    shutil.copytree(RunLayout(source).prepared, data)
    shutil.copy(f"{RunLayout(source).prepared}.manifest.json", f"{data}.manifest.json")


# -- D1 stale lineage -----------------------------------------------------------------------------------------


def test_d1_preparing_another_panel_over_a_trained_run_is_refused(run_dir, other, capsys):
    before = snapshot(run_dir)
    rc, _, err = cli(capsys, "prepare", "--run-dir", run_dir, *_vcfs(other))
    line = error_line(err, "prepare")
    assert rc == 2 and f"{run_dir.resolve()} holds trained variants (v18)" in line and "pass --force" in line
    assert snapshot(run_dir) == before  # D11 too: no .vcz or stamp replaced, no staging left


def test_d1_forced_prepare_sets_the_variants_aside_and_their_checkpoints_are_refused(run_dir, other, capsys, tmp_path):
    rc, _, err = cli(capsys, "prepare", "--run-dir", run_dir, "--force", *_vcfs(other))
    assert rc == 0, err
    moved = list((run_dir / "superseded").glob("*/v18"))
    assert len(moved) == 1 and not (run_dir / "v18").exists()
    assert (moved[0] / "checkpoints" / "epoch-001.pt").exists()
    out = tmp_path / "x.vcf.gz"
    rc, _, err = cli(capsys, "impute", "--run-dir", run_dir, "--model", moved[0] / "checkpoints" / "epoch-001.pt",
                     "--target", RunLayout(other).vcf_dir / "test_array.vcf.gz", "--out", out)
    line = error_line(err, "impute")
    assert rc == 2 and "epoch-001.pt was trained on prepared data" in line and "(--run-dir)" in line
    assert not out.exists()


def test_d1_artifacts_of_other_prepared_data_are_refused_by_resume_and_impute(run_dir, other, capsys, tmp_path):
    _swap_prepared(run_dir, other)
    before = snapshot(run_dir)
    out = tmp_path / "x.vcf.gz"
    for argv, fix in ((["resume", "--run-dir", run_dir, "--variant", "v18"], "train in a new run dir"),
                      (["resume", "--run-dir", run_dir, "--epochs", "1"], "train in a new run dir"),
                      (["impute", "--run-dir", run_dir, "--out", out], "impute with the run dir the model was trained in")):
        rc, _, err = cli(capsys, *argv)
        line = error_line(err, argv[0])
        assert rc == 2 and "was trained on prepared data" in line and fix in line, line
    assert snapshot(run_dir) == before and not out.exists()


def test_d1_a_checkpoint_from_another_run_dir_is_refused(trained, other, capsys, tmp_path):
    out = tmp_path / "x.vcf.gz"
    rc, _, err = cli(capsys, "impute", "--run-dir", other, "--model", RunLayout(trained).variant("v18").checkpoint(1),
                     "--target", RunLayout(other).vcf_dir / "test_array.vcf.gz", "--out", out)
    line = error_line(err, "impute")
    assert rc == 2 and f"but {other} holds" in line and not out.exists()


# -- D2 checkpoints, D3 Zarr chunks, D13 truncated files ---------------------------------------------------


def _flip_tensor_bytes(path: Path) -> None:
    """The review's D2: 64 bytes flipped inside the largest tensor record of the zip."""
    import zipfile

    z = zipfile.ZipFile(path)
    i = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    o = i.header_offset + 30 + len(i.filename.encode()) + len(i.extra)
    b = bytearray(path.read_bytes())
    for j in range(o + 100, o + 164):
        b[j] ^= 0x7F
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("damage, message", [
    (_flip_tensor_bytes, "does not match its manifest"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1000]), "bytes, its manifest says"),  # D13: truncated
])
def test_d2_a_damaged_checkpoint_is_refused(run_dir, capsys, tmp_path, damage, message):
    ckpt = RunLayout(run_dir).variant("v18").checkpoint(1)
    damage(ckpt)
    before = snapshot(run_dir)
    out = tmp_path / "x.vcf.gz"
    rc, _, err = cli(capsys, "impute", "--run-dir", run_dir, "--out", out)
    line = error_line(err, "impute")
    assert rc == 2 and f"{ckpt}" in line and message in line and "rerun its epoch" in line
    assert snapshot(run_dir) == before and not out.exists()


def test_d2_following_the_fix_retrains_the_epoch_and_imputes_with_it(run_dir, capsys, tmp_path):
    ckpt = RunLayout(run_dir).variant("v18").checkpoint(1)
    good = ckpt.read_bytes()
    _flip_tensor_bytes(ckpt)
    ckpt.unlink()  # the fix the error prints: delete the checkpoint and its manifest, resume
    Path(f"{ckpt}.manifest.json").unlink()
    rc, _, err = cli(capsys, "resume", "--run-dir", run_dir, "--variant", "v18")
    assert rc == 0, err
    assert ckpt.read_bytes() == good  # the epoch was trained again, not skipped for its old summary
    out = tmp_path / "x.vcf.gz"
    rc, _, err = cli(capsys, "impute", "--run-dir", run_dir, "--out", out)
    assert rc == 0, err
    with gzip.open(out, "rt") as f:
        assert "epoch-001.pt" in next(line for line in f if line.startswith("##source"))


def test_d3_d10_a_damaged_prepared_store_is_refused_and_prepare_rebuilds_it(run_dir, capsys, tmp_path):
    prepared = RunLayout(run_dir).prepared
    chunk = prepared / "tokens" / "panel" / "c" / "0" / "0" / "0"
    good = snapshot(run_dir)
    out = tmp_path / "x.vcf.gz"
    damages = {
        "missing chunk": (lambda: chunk.unlink(), "tokens/panel/c/0/0/0 is missing"),
        "flipped byte (D13 codec)": (lambda: chunk.write_bytes(bytes([chunk.read_bytes()[0] ^ 1]) + chunk.read_bytes()[1:]),
                                     "tokens/panel/c/0/0/0 does not match its sha256"),
        "corrupt zarr.json (D10)": (lambda: (prepared / "zarr.json").write_text("{"), "zarr.json"),
    }
    timed = ("data/prepared.json", "data/prepared.zarr/zarr.json", "data/prepared.zarr.manifest.json")  # timings
    digest = json.loads(Path(f"{prepared}.manifest.json").read_text())["content_sha256"]
    for name, (damage, message) in damages.items():
        damage()
        before = snapshot(run_dir)
        rc, _, err = cli(capsys, "impute", "--run-dir", run_dir, "--out", out)
        line = error_line(err, "impute")
        assert rc == 2 and str(prepared) in line and message in line and "re-run `embrag prepare" in line, (name, line)
        assert snapshot(run_dir) == before and not out.exists()
        rc, _, err = cli(capsys, "prepare", "--run-dir", run_dir)  # the fix: same inputs, no --force needed
        assert rc == 0, err
        assert {k: v for k, v in snapshot(run_dir).items() if k not in timed} == \
               {k: v for k, v in good.items() if k not in timed}, name
        assert json.loads(Path(f"{prepared}.manifest.json").read_text())["content_sha256"] == digest
    rc, _, err = cli(capsys, "impute", "--run-dir", run_dir, "--out", out)
    assert rc == 0 and out.exists(), err


def test_d3_a_damaged_embeddings_store_is_refused_and_re_encoded(run_dir):
    from embrag.config import RunConfig
    from storage.embeddings import EmbeddingStore, is_complete
    from storage.errors import IntegrityError
    from storage.training import reencode_after_epoch
    from storage.variant import VariantRun

    store = RunLayout(run_dir).variant("v18").embeddings(2)  # made after epoch 1
    chunk = store / "table" / "c" / "0" / "0" / "0" / "0"
    original = chunk.read_bytes()
    chunk.unlink()
    with pytest.raises(IntegrityError, match=rf"{store}: table/c/0/0/0/0 is missing.*delete {store} and rerun"):
        EmbeddingStore(store)
    assert not is_complete(store)
    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    reencode_after_epoch(VariantRun(RunLayout(run_dir), cfg), 1)  # what `resume` runs: the stage is redone
    assert chunk.read_bytes() == original and is_complete(store)


# -- D4 changed settings, D9 bad options --------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["train", "--no-prefect"], ["train"],  # Prefect's path: refused before any flow (or server) starts
    ["config"],
])
def test_d4_changing_a_setting_of_a_trained_run_is_refused_before_config_json_changes(run_dir, capsys, argv):
    before = snapshot(run_dir)
    rc, _, err = cli(capsys, *argv, "--run-dir", run_dir, "--set", "train.lr=0.05")
    line = error_line(err, argv[0])
    assert rc == 2 and "was trained with train.lr=0.001 (now 0.05)" in line and "lineage.json" in line
    assert snapshot(run_dir) == before


def test_d4_a_hand_edited_config_json_is_refused_by_resume(run_dir, capsys):
    config = json.loads((run_dir / "config.json").read_text())
    config["train"]["lr"] = 0.05
    (run_dir / "config.json").write_text(json.dumps(config))
    before = snapshot(run_dir)
    rc, _, err = cli(capsys, "resume", "--run-dir", run_dir)
    assert rc == 2 and "train.lr=0.001 (now 0.05)" in error_line(err, "resume")
    assert snapshot(run_dir) == before


def test_d4_the_prefect_flows_run_the_same_check_before_writing_config_json(run_dir, tmp_path):
    from storage.errors import LineageError
    from tasks._common import resolve_config

    config = json.loads((run_dir / "config.json").read_text())
    config["train"]["lr"] = 0.05
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(config))
    before = snapshot(run_dir)
    with pytest.raises(LineageError, match=r"train\.lr=0\.001 \(now 0\.05\)"):
        resolve_config(str(run_dir), str(changed), "v18")
    assert snapshot(run_dir) == before


def test_d9_a_bad_variant_is_refused_before_any_path_is_built(run_dir, capsys, monkeypatch, tmp_path):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    shutil.move(run_dir, work / "run")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for argv in (["train", "--run-dir", "run", "--no-prefect"], ["resume", "--run-dir", "run"], ["impute", "--run-dir", "run"]):
        rc, _, err = cli(capsys, *argv, "--variant", "../../../ESCAPED")
        assert rc == 2 and "--variant '../../../ESCAPED': expected one of v17, v18, none" in error_line(err, argv[0])
    assert snapshot(tmp_path) == before and not (tmp_path / "ESCAPED").exists()


@pytest.mark.parametrize("item, message", [
    ("train.epochs=two", "--set train.epochs=two: train.epochs: expected an integer, got 'two'"),
    ("train.epochs=-1", "--set train.epochs=-1: TrainConfig.epochs must be >= 1, got -1"),
    ('train.lr="abc"', "train.lr: expected a number, got 'abc'"),
    ("train.eopchs=3", "unknown field train.eopchs (did you mean train.epochs?)"),
    ("trian.epochs=3", "unknown section 'trian' (did you mean train?)"),
    ("train.epochs", "expected section.field=value"),
])
def test_d9_bad_set_values_are_one_line_errors(run_dir, capsys, item, message):
    before = snapshot(run_dir)
    rc, _, err = cli(capsys, "train", "--run-dir", run_dir, "--no-prefect", "--set", item)
    assert rc == 2 and message in error_line(err, "train")
    assert snapshot(run_dir) == before


# -- D5 simulate's settings -----------------------------------------------------------------------------------


def test_d5_simulate_saves_its_settings_and_prepare_uses_its_vcfs(prepared_template, tmp_path, capsys):
    root = tmp_path / "sim"
    tiny = prepared_template / "config.json"
    assert cli(capsys, "simulate", "--run-dir", root, "--config", tiny, "--set", "simulate.n_panel=24")[0] == 0
    assert json.loads((root / "config.json").read_text())["simulate"]["n_panel"] == 24
    vcfs = {p: p.stat().st_mtime_ns for p in RunLayout(root).vcf_dir.glob("*.vcf.gz")}
    rc, out, err = cli(capsys, "prepare", "--run-dir", root)  # the README's next step, no options
    assert rc == 0 and "panel=24" in out, err
    assert {p: p.stat().st_mtime_ns for p in vcfs} == vcfs  # the simulated VCFs were used, not re-simulated
    before = snapshot(root)
    rc, _, err = cli(capsys, "prepare", "--run-dir", root, "--set", "simulate.n_panel=30")
    line = error_line(err, "prepare")
    assert rc == 2 and "simulation.json" in line and "simulate.n_panel=24 (config: 30)" in line
    assert snapshot(root) == before


# -- D10 corrupt markers -------------------------------------------------------------------------------------


def test_d10_corrupt_markers_are_named_with_the_fix_or_rewritten(run_dir, capsys):
    layout = RunLayout(run_dir)
    (layout.prepared.with_name("prepared.json")).write_text("")
    assert cli(capsys, "prepare", "--run-dir", run_dir)[0] == 0  # redone: the marker is rewritten
    assert json.loads(layout.prepared.with_name("prepared.json").read_text())["summary"]["n_sites"] > 0

    summary = layout.variant("v18").epoch_metrics(1).with_suffix(".summary.json")
    good = json.loads(summary.read_text())
    summary.write_text('{"epoch": 1, "train_lo')
    before = snapshot(run_dir)
    rc, _, err = cli(capsys, "resume", "--run-dir", run_dir)
    line = error_line(err, "resume")
    assert rc == 2 and f"{summary}: not valid JSON" in line and "delete it and rerun" in line
    assert snapshot(run_dir) == before
    summary.unlink()  # the fix the message gives
    assert cli(capsys, "resume", "--run-dir", run_dir)[0] == 0
    assert {k: v for k, v in json.loads(summary.read_text()).items() if "seconds" not in k} == \
           {k: v for k, v in good.items() if "seconds" not in k}

    (run_dir / "config.json").write_text("{")
    rc, _, err = cli(capsys, "resume", "--run-dir", run_dir)
    assert rc == 2 and f"{run_dir / 'config.json'}: not valid JSON" in error_line(err, "resume")


@pytest.mark.parametrize("record, command, fix", [
    (lambda layout: layout.variant("v18").root / "lineage.json", "resume", "move"),  # nothing rewrites what it was made from
    (lambda layout: Path(f"{layout.variant('v18').checkpoint(1)}.manifest.json"), "impute", "rerun its epoch"),
])
def test_d10_a_corrupt_record_that_no_rerun_rewrites_gives_its_own_fix(run_dir, capsys, tmp_path, record, command, fix):
    path = record(RunLayout(run_dir))
    path.write_text('{"prepa')
    before = snapshot(run_dir)
    extra = ["--out", tmp_path / "x.vcf.gz"] if command == "impute" else []
    rc, _, err = cli(capsys, command, "--run-dir", run_dir, *extra)
    line = error_line(err, command)
    assert rc == 2 and f"{path}: not valid JSON" in line and fix in line and "which rewrites it" not in line
    assert snapshot(run_dir) == before


# -- D11 a refused prepare ------------------------------------------------------------------------------------


def test_d11_a_refused_prepare_leaves_the_run_dir_as_it_was(prepared_template, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(prepared_template, root)
    vcf = RunLayout(root).vcf_dir
    with gzip.open(vcf / "study.vcf.gz", "rt") as f:  # the study on other positions: no site in common
        lines = [line if line.startswith("#") else "\t".join([line.split("\t")[0], str(int(line.split("\t")[1]) + 7),
                 *line.split("\t")[2:]]) for line in f]
    study = tmp_path / "moved_study.vcf"
    study.write_text("".join(lines))
    before = snapshot(root)
    rc, _, err = cli(capsys, "prepare", "--run-dir", root, "--panel", vcf / "panel.vcf.gz", "--study", study)
    line = error_line(err, "prepare")
    assert rc == 2 and "no sites in common" in line and str(study) in line and ".staging-" not in line
    assert snapshot(root) == before  # the study .vcz and its stamp were staged, never moved in


# -- D13 errors and resume ------------------------------------------------------------------------------------


def test_d13_resume_of_a_finished_run_changes_nothing(run_dir, capsys):
    before = snapshot(run_dir)
    rc, out, err = cli(capsys, "resume", "--run-dir", run_dir)
    assert rc == 0, err
    assert "[v18] epoch 1 (2 of 2):" in out
    assert snapshot(run_dir) == before  # the pruned e0000 store is not re-encoded


@pytest.mark.parametrize("code, message", [
    (errno.ENOSPC, "no space left on device; free space and rerun"),
    (errno.EROFS, "Read-only file system; make it writable"),
])
def test_d13_a_full_or_read_only_disk_is_one_line(run_dir, capsys, monkeypatch, code, message):
    def refuse(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    before = snapshot(run_dir)
    monkeypatch.setattr(Path, "write_text", refuse)
    rc, _, err = cli(capsys, "config", "--run-dir", run_dir)
    monkeypatch.undo()
    line = error_line(err, "config")
    assert rc == 2 and message in line and "config.json.tmp-" in line
    assert snapshot(run_dir) == before  # the tmp file was removed, config.json untouched


def test_d13_a_truncated_masks_file_names_the_file_and_the_fix(run_dir):
    from storage.epoch_inputs import read_masks
    from storage.errors import IntegrityError

    masks = RunLayout(run_dir).variant("v18").val_masks
    masks.write_bytes(masks.read_bytes()[:200])
    with pytest.raises(IntegrityError, match=rf"{masks}: cannot be read .*delete it and rerun: masks are regenerated"):
        read_masks(masks)


def test_missing_files_and_run_dirs_are_named(capsys, tmp_path):
    rc, _, err = cli(capsys, "evaluate", "--truth", tmp_path / "t.vcf", "--imputed", tmp_path / "i.vcf",
                     "--panel", tmp_path / "p.vcf")
    assert rc == 2 and f"{tmp_path / 't.vcf'}: file not found; pass the path of a VCF/BCF as --truth" in error_line(
        err, "evaluate")
    rc, _, err = cli(capsys, "recover", "--run-dir", tmp_path / "gone")
    assert rc == 2 and "no such run dir" in error_line(err, "recover") and not (tmp_path / "gone").exists()
    rc, _, err = cli(capsys, "train", "--run-dir", tmp_path / "gone", "--no-prefect")
    assert rc == 2 and "no prepared data" in error_line(err, "train") and not (tmp_path / "gone").exists()


def test_a_bug_is_one_line_with_status_1_and_its_traceback_with_v(run_dir, capsys, monkeypatch):
    import embrag.settings

    def broken(*args, **kwargs):
        raise KeyError("table")

    monkeypatch.setattr(embrag.settings, "apply_overrides", broken)
    rc, _, err = cli(capsys, "config", "--run-dir", run_dir)
    assert rc == 1 and "internal error (KeyError: 'table'); this is a bug: rerun with -v" in error_line(err, "config")
    rc, _, err = cli(capsys, "-v", "config", "--run-dir", run_dir)
    assert rc == 1 and "Traceback" in err and 'raise KeyError("table")' in err


# -- D14 concurrent writers, D8 impute's work dir ------------------------------------------------------------


def _hold(lock_args: str) -> subprocess.Popen:
    """Another process holding a lock (``storage.locks`` call), until killed."""
    code = (f"import sys, time\nfrom storage import locks\nlocks.{lock_args}\nprint('held', flush=True)\n"
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_d14_a_run_dir_in_use_is_refused_with_the_holders_pid(run_dir, capsys):
    holder = _hold(f"acquire(locks.run_lock_file({str(run_dir)!r}), 'embrag train', 'run dir')")
    try:
        before = snapshot(run_dir)
        for argv in (["train", "--run-dir", run_dir, "--no-prefect"], ["resume", "--run-dir", run_dir], ["prepare", "--run-dir", run_dir]):
            rc, _, err = cli(capsys, *argv)
            line = error_line(err, argv[0])
            assert rc == 2 and f"is in use by PID {holder.pid} (embrag train, since" in line and "kill" in line
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    assert cli(capsys, "resume", "--run-dir", run_dir)[0] == 0  # the kernel dropped the dead holder's lock


def test_d14_an_output_file_in_use_is_refused(run_dir, capsys, tmp_path):
    out = tmp_path / "x.vcf.gz"
    holder = _hold(f"acquire(locks.output_lock_file({str(out)!r}), 'embrag impute', 'output')")
    try:
        rc, _, err = cli(capsys, "impute", "--run-dir", run_dir, "--out", out)
        assert rc == 2 and f"output {out} is in use by PID {holder.pid}" in error_line(err, "impute")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_d8_impute_removes_its_work_dir_on_failure_and_those_of_dead_imputations(run_dir, capsys, tmp_path):
    out_dir = tmp_path / "out"
    stale = out_dir / f".impute-{dead_pid()}-0123abcd"  # what a kill -9 left
    stale.mkdir(parents=True)
    (stale / "probs.npy").write_bytes(b"\0" * 1000)
    live = out_dir / f".impute-{os.getppid()}-0123abcd"  # another live imputation's: never touched
    live.mkdir()
    target = tmp_path / "elsewhere.vcf"  # phased, valid, but on no panel site: fails inside the work dir
    target.write_text("##fileformat=VCFv4.2\n##contig=<ID=20>\n##FORMAT=<ID=GT,Number=1,Type=String,Description=\"GT\">\n"
                      "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tS1\n20\t5\t.\tA\tG\t.\t.\t.\tGT\t0|1\n")
    rc, _, err = cli(capsys, "impute", "--run-dir", run_dir, "--target", target, "--out", out_dir / "x.vcf.gz")
    assert rc == 2 and "no record matches a panel site" in error_line(err, "impute")
    assert sorted(out_dir.glob(".impute-*")) == [live]


def test_d14_writers_remove_only_the_tmp_files_of_dead_writers(tmp_path):
    from storage.atomic import write_json

    target = tmp_path / "x.json"
    mine = tmp_path / f"x.json.tmp-{os.getppid()}-0123abcd"  # a live writer's
    gone = tmp_path / f"x.json.tmp-{dead_pid()}-0123abcd"
    for p in (mine, gone):
        p.write_text("half")
    write_json(target, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.json", mine.name])


def test_d14_a_killed_holder_leaves_its_record_but_no_lock(run_dir):
    """A killed holder leaves its record (an orphan) but never a held lock."""
    from storage import locks

    holder = _hold(f"acquire(locks.run_lock_file({str(run_dir)!r}), 'embrag train', 'run dir')")
    holder.kill()
    holder.wait()
    time.sleep(0.1)
    with locks.hold_run_dir(run_dir, "test") as orphan:
        assert orphan is not None and orphan["pid"] == holder.pid and orphan["command"] == "embrag train"
