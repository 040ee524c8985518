"""The external tools of the accuracy benchmark: Beagle 5.4 (phasing and imputation) and minimac4.

Every command runs in a measuring child process (wall time, CPU = user + sys of its children,
peak RSS of its children) and is written, with its output, to a log next to its result, so a
reader can rerun exactly what was measured.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from storage.atomic import read_json, write_json

# Runs argv[1:] and prints the resources of that child alone (getrusage(CHILDREN) of this wrapper).
_MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); wall = time.perf_counter() - t\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'rc': rc, 'wall': wall, 'cpu': r.ru_utime + r.ru_stime, 'rss_mb': r.ru_maxrss / 1024}))\n"
)


@dataclass(frozen=True)
class Cost:
    wall_s: float
    cpu_s: float
    peak_mb: float
    threads: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.wall_s + other.wall_s, self.cpu_s + other.cpu_s, max(self.peak_mb, other.peak_mb),
                    max(self.threads, other.threads))


ZERO = Cost(0.0, 0.0, 0.0, 0)


def measure(cmd: list[str], log: Path, threads: int, env: dict | None = None) -> Cost:
    """Run ``cmd`` in a measuring wrapper; the command line and its stdout/stderr go to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(map(str, cmd))}\n")
        f.flush()
        done = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, cmd)], stdout=subprocess.PIPE, stderr=f,
                              text=True, env=env)
    *out, last = done.stdout.strip().splitlines() or ["{}"]
    with open(log, "a") as f:
        f.write("\n".join(out))
    stats = json.loads(last)
    if stats.get("rc") != 0:
        raise RuntimeError(f"{shlex.join(map(str, cmd))} failed (exit {stats.get('rc')}); see {log}")
    return Cost(stats["wall"], stats["cpu"], stats["rss_mb"], threads)


def cached_run(done: Path, make, key=None) -> tuple[Path, Cost]:
    """``make() -> (path, Cost)`` unless ``done`` (written last) records a finished run with the same
    ``key`` (JSON-able: the options it ran with) whose output exists."""
    if done.exists():
        saved = read_json(done)
        if saved.get("key") == key and Path(saved["path"]).exists():
            return Path(saved["path"]), Cost(**saved["cost"])
    done.parent.mkdir(parents=True, exist_ok=True)
    path, cost = make()
    write_json(done, {"path": str(path), "cost": asdict(cost), "key": key})
    return path, cost


def index_vcf(path: Path) -> None:
    subprocess.run(["tabix", "-f", "-p", "vcf", str(path)], check=True)


def prephase(target: Path, panel: Path, genetic_map: Path, out_dir: Path, threads: int) -> tuple[Path, Cost]:
    """The unphased array target phased once against the panel (``beagle impute=false``), as a user
    would before handing it to a tool that needs phased input. ``out_dir/phased.vcf.gz``."""
    prefix = out_dir / "phased"

    def make() -> tuple[Path, Cost]:
        cost = measure(["beagle", f"gt={target}", f"ref={panel}", f"map={genetic_map}", f"out={prefix}",
                        "impute=false", f"nthreads={threads}"], out_dir / "phased.run.log", threads)
        index_vcf(Path(f"{prefix}.vcf.gz"))
        return Path(f"{prefix}.vcf.gz"), cost

    return cached_run(out_dir / "phased.done.json", make)


def beagle(target_unphased: Path, panel: Path, genetic_map: Path, out_dir: Path, threads: int) -> tuple[Path, Cost]:
    """Beagle 5.4 phases and imputes the unphased target in one run, with the genetic map."""
    prefix = out_dir / "imputed"

    def make() -> tuple[Path, Cost]:
        cost = measure(["beagle", f"gt={target_unphased}", f"ref={panel}", f"map={genetic_map}", f"out={prefix}",
                        "gp=true", f"nthreads={threads}"], out_dir / "run.log", threads)
        return Path(f"{prefix}.vcf.gz"), cost

    return cached_run(out_dir / "done.json", make)


def minimac4(target_phased: Path, panel: Path, genetic_map: Path, out_dir: Path, threads: int) -> tuple[Path, Cost]:
    """minimac4 on the pre-phased target with the PLINK map (``--map`` reads it as is). The cost
    includes compressing the panel to .msav, which a minimac4 user pays once per panel."""
    msav, out = out_dir / "panel.msav", out_dir / "imputed.vcf.gz"

    def make() -> tuple[Path, Cost]:
        compress = measure(["sh", "-c", f"minimac4 --compress-reference {shlex.quote(str(panel))} > "
                            f"{shlex.quote(str(msav))}"], out_dir / "compress.log", 1)
        cost = measure(["minimac4", msav, target_phased, "--map", genetic_map, "-o", out, "-O", "vcf.gz",
                        "-t", str(threads), "-f", "GT,DS,HDS,GP"], out_dir / "run.log", threads)
        return out, compress + cost

    return cached_run(out_dir / "done.json", make)
