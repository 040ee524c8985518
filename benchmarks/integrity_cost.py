"""What the integrity manifests cost on the default simulation (storage/integrity.py).

Simulates and prepares the default config (or --length), encodes one embeddings store with a fresh
V18 model, then times, each against the same operation without checks: sealing (hashing every
file once), opening (stat of every listed file), reading every chunk through VerifiedStore (sha256
of every byte read), prepare's deep check on a cache hit, and a checkpoint save + load.

    .venv/bin/python benchmarks/integrity_cost.py [--run-dir runs/integrity] [--length 1000000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402

from embrag.config import RunConfig  # noqa: E402
from embrag.model import build_model  # noqa: E402
from storage.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from storage.embeddings import encode_complete_embeddings  # noqa: E402
from storage.integrity import open_store, store_manifest, verify_store  # noqa: E402
from storage.layout import RunLayout  # noqa: E402
from storage.prepare import prepare  # noqa: E402
from storage.prepared import PreparedData  # noqa: E402
from storage.simulate import simulated_inputs  # noqa: E402


def timed(fn, repeat: int = 3) -> float:
    """Best of ``repeat`` wall seconds (the page cache warm after the first)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_all(group: zarr.Group) -> None:
    """Every chunk, one slice of the first axis at a time (as the stages read: a window at a time)."""
    for _, array in group.arrays():
        if array.ndim > 1:
            for i in range(array.shape[0]):
                array[i]
        else:
            array[...]
    for _, sub in group.groups():
        read_all(sub)


def size_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/integrity"))
    parser.add_argument("--length", type=float, default=None, help="simulated bp (default: the config's)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = RunConfig() if args.length is None else RunConfig().replace(simulate__length=args.length)
    layout = RunLayout(args.run_dir)
    sim = simulated_inputs(cfg.simulate, layout.vcf_dir)
    t0 = time.perf_counter()
    prepare(layout, cfg, panel_vcf=sim.panel_vcf, study_vcf=sim.study_vcf, test_vcf=sim.test_vcf)
    prep_s = time.perf_counter() - t0
    prepared = PreparedData(layout.prepared)
    emb = layout.variant("v18").embeddings(0)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    t0 = time.perf_counter()
    encode_complete_embeddings(emb, prepared, model.embedding, version=0)
    encode_s = time.perf_counter() - t0

    rows = []
    for name, root, made_s in (("prepared.zarr", layout.prepared, prep_s), ("embeddings e0000.zarr", emb, encode_s)):
        files = len(store_manifest(root)["entries"])
        seal = timed(lambda root=root: store_manifest(root), 2)
        plain_open = timed(lambda root=root: zarr.open_group(str(root), mode="r"))
        checked_open = timed(lambda root=root: open_store(root, ""))
        plain_read = timed(lambda root=root: read_all(zarr.open_group(str(root), mode="r")), 2)
        checked_read = timed(lambda root=root: read_all(open_store(root, "")[0]), 2)
        rows.append((name, f"{size_mb(root):.1f} MB, {files} files", f"{made_s:.1f}", f"{seal:.3f}",
                     f"{plain_open * 1e3:.1f} / {checked_open * 1e3:.1f}", f"{plain_read:.3f} / {checked_read:.3f}"))
    deep = timed(lambda: verify_store(layout.prepared, "", deep=True))

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "c.pt"
        bundle = {"model": model.state_dict(), "optimizer": torch.optim.AdamW(model.parameters()).state_dict()}
        plain_save = timed(lambda: torch.save(bundle, Path(tmp) / "plain.pt"))
        sealed_save = timed(lambda: save_checkpoint(ckpt, **bundle))
        plain_load = timed(lambda: torch.load(Path(tmp) / "plain.pt", weights_only=True))
        sealed_load = timed(lambda: load_checkpoint(ckpt))
        ckpt_mb = ckpt.stat().st_size / 1e6

    print(f"default simulation: {len(prepared.sites)} sites, {len(prepared.windows)} windows, "
          f"{prepared.n_haplotypes('panel')} panel haplotypes; 2 threads; best of 2-3 warm runs")
    print("| store | size | made in (s) | sealing (s) | open: plain / checked (ms) | read every chunk: plain / checked (s) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"prepare's cache hit, deep check of every prepared byte: {deep:.3f} s")
    print(f"checkpoint {ckpt_mb:.2f} MB: save {plain_save * 1e3:.1f} -> {sealed_save * 1e3:.1f} ms, "
          f"load {plain_load * 1e3:.1f} -> {sealed_load * 1e3:.1f} ms")
    np.testing.assert_equal(len(rows), 2)


if __name__ == "__main__":
    main()
