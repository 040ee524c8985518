"""Build and search time of the flat (seed), compact (exact, ~2L dims) and token indexes.

    .venv/bin/python benchmarks/index_build_search.py [--haps 1000] [--queries 1000] [--threads 1]

One window: H panel haplotypes, L sites, mask rate 0.5, Q queries, k neighbours. "build" includes
encoding the panel (for flat: gathering the [H, L*D] masked embedding), "search" includes masking
and encoding the queries. Times are the best of ``--repeat`` runs (a loaded
machine makes OpenMP/OpenBLAS threads contend on small searches: compare ``--threads 1``). The neighbour check is tie-aware:
a compact row that differs from flat's must have the same distance.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from embrag.constants import ALT, MISSING, REF, VOCAB_SIZE
from embrag.retrieval import build_index

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time(fn, repeat: int, clock: str):
    now, best, out = CLOCKS[clock], float("inf"), None
    for _ in range(repeat):
        start = now()
        out = fn()
        best = min(best, now() - start)
    return best, out


def window(rng, n_haps: int, n_queries: int, length: int, dim: int, rate: float):
    alphabet = np.array([REF, ALT, MISSING], np.uint8)
    panel = alphabet[rng.choice(3, size=(n_haps, length), p=[0.6, 0.38, 0.02])]
    queries = alphabet[rng.choice(3, size=(n_queries, length), p=[0.6, 0.38, 0.02])]
    table = rng.normal(size=(length, VOCAB_SIZE, dim)).astype(np.float32)
    return table, panel, queries, rng.random(length) < rate


def same_neighbours(reference, other, atol: float) -> bool:
    (d_ref, r_ref), (d, r) = reference, other
    return bool(np.allclose(d, d_ref, rtol=1e-4, atol=atol) and ((r == r_ref) | np.isclose(d, d_ref, atol=atol)).all())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--haps", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 192])
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="queries per call in the batched column (training loop)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: process CPU time (all threads), robust to other load with --threads 1")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: leave faiss's default)")
    parser.add_argument("--blas-threshold", type=int, default=0,
                        help="faiss.cvar.distance_compute_blas_threshold (on n_queries*dim; 0: faiss default 128000)")
    return parser.parse_args()


def measure(kind: str, table, panel, queries, mask, args) -> dict:
    t_build, index = best_time(lambda: build_index(kind, panel, mask, table), args.repeat, args.clock)
    t_search, found = best_time(lambda: index.search(queries, args.k), args.repeat, args.clock)
    batches = [queries[i : i + args.batch] for i in range(0, len(queries), args.batch)]
    t_batched, _ = best_time(lambda: [index.search(b, args.k) for b in batches], args.repeat, args.clock)
    n_bytes = index.ntotal * (index.dim // 8 if kind == "token" else index.dim * 4)
    return {"dim": index.dim, "mb": n_bytes / 1e6, "build": t_build, "search": t_search, "batched": t_batched,
            "found": found}


def main() -> None:
    args = parse_args()
    if args.blas_threshold:
        faiss.cvar.distance_compute_blas_threshold = args.blas_threshold
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"H={args.haps} L={args.length} mask rate={args.rate} Q={args.queries} k={args.k} "
          f"faiss {faiss.__version__} threads={faiss.omp_get_max_threads()} clock={args.clock} "
          f"blas_threshold={faiss.cvar.distance_compute_blas_threshold}")
    header = (f"{'D':>4} {'kind':>8} {'dim':>6} {'MB':>6} {'build ms':>9} {'search ms':>10} {f'b{args.batch} ms':>8} "
              f"{'build x':>8} {'search x':>9} {f'b{args.batch} x':>6}  same-nn")
    print(header)
    print("-" * len(header))
    for dim in args.dims:
        table, panel, queries, mask = window(rng, args.haps, args.queries, args.length, dim, args.rate)
        res = {kind: measure(kind, table, panel, queries, mask, args) for kind in ("flat", "compact", "token")}
        flat = res["flat"]
        atol = 1e-4 * float(flat["found"][0].max())
        for kind, r in res.items():
            same = {"flat": "ref", "compact": str(same_neighbours(flat["found"], r["found"], atol)),
                    "token": "n/a (Hamming)"}[kind]
            print(f"{dim:>4} {kind:>8} {r['dim']:>6} {r['mb']:>6.2f} {r['build'] * 1e3:>9.2f} "
                  f"{r['search'] * 1e3:>10.2f} {r['batched'] * 1e3:>8.1f} {flat['build'] / r['build']:>8.0f} "
                  f"{flat['search'] / r['search']:>9.0f} {flat['batched'] / r['batched']:>6.0f}  {same}")


if __name__ == "__main__":
    main()
