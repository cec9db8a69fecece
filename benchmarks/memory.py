"""How much memory does a learner's notebook need? Its peak in a memory cgroup.

    python benchmarks/memory.py                       # every notebook, one after another
    python benchmarks/memory.py --notebooks 02 05     # some of them
    python benchmarks/memory.py --limit-mb 1500       # under a hard limit, as a workshop sets one

Each notebook runs in a Jupyter kernel driven by nbclient, as under the tests
(``PYTEST_CURRENT_TEST`` is set, so a notebook runs its short version and its
last cell shuts everything down). The runner process is put into a fresh
cgroup v1 memory cgroup (``/sys/fs/cgroup/memory/forge_lite_bench_<pid>``)
before it starts the kernel, so the kernel and every worker process the kit
spawns inherit it: the cgroup's ``memory.max_usage_in_bytes`` at the end is
the peak of the whole process tree, page cache included, which is what a
JupyterHub single-user server's memory limit counts.

Also measured, by sampling the cgroup every 0.25 s: the processes started
(Monarch workers among them), the largest sum of their proportional set
sizes (PSS: shared library pages split between the processes that map them)
seen and which processes held it then, and each cell's wall time (the first cell
that starts an actor or a service is the "start-up" a learner waits for).

Needs root and the cgroup v1 memory controller (mounted on these machines).
Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
# FORGE_LITE_BENCH_RESULTS names another folder (the smoke tests' temporary one).
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results") / "memory.json"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
# A cell that starts processes: the start-up a learner waits for.
STARTS = ("as_service(", "as_actor(", "spawn_procs(", "GRPORun(")
MB = 2**20


def cgroup_available() -> str | None:
    """None when this process can make memory cgroups; otherwise why not."""
    if os.geteuid() != 0:
        return "needs root to create a memory cgroup"
    if not (CGROUP_ROOT / "memory.max_usage_in_bytes").exists():
        return f"no cgroup v1 memory controller at {CGROUP_ROOT}"
    return None


class MemoryCgroup:
    """A fresh cgroup v1 memory cgroup, removed on close.

    ``limit_bytes``: a hard limit (the kernel OOM-kills a process of the
    group past it); None: no limit of its own.
    """

    def __init__(self, limit_bytes: int | None = None):
        self.path = CGROUP_ROOT / f"forge_lite_bench_{os.getpid()}_{time.monotonic_ns()}"
        self.path.mkdir()
        if limit_bytes is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))

    def join(self, pid: int = 0) -> None:
        """Move process ``pid`` (0: the calling one) into the group; its children inherit it."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def peak_bytes(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        """How many processes the kernel killed for this group's limit (0 if not reported)."""
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def close(self, grace_s: float = 10.0) -> list[int]:
        """Kill what is still in the group after ``grace_s`` seconds, remove it;
        return the pids that had to be killed."""
        deadline = time.monotonic() + grace_s
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        leftover = self.pids()
        for pid in leftover:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while self.pids():
            time.sleep(0.05)
        for _ in range(50):  # the kernel may need a moment after the last exit
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        return leftover


def _pss_bytes(pid: int) -> int:
    """The process's proportional set size: its private memory plus its share
    of pages it shares (torch's libraries, mapped by every process), so the
    processes' figures add up to about what the cgroup counts."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _kind(cmdline: str) -> str:
    if "bootstrap_main" in cmdline:
        return "worker"
    if "ipykernel" in cmdline:
        return "kernel"
    if "memory.py" in cmdline or "pytest" in cmdline:
        return "runner"
    return cmdline.split(" ", 1)[0].rsplit("/", 1)[-1] or "?"


def run_in_cgroup(command: list[str], limit_bytes: int | None = None, timeout_s: float = 1800,
                  env: dict | None = None, cwd: Path = ROOT) -> dict:
    """Run ``command`` in a fresh memory cgroup; what it used.

    The child joins the group before it execs, so everything it starts is
    counted. Returns ``returncode``, ``peak_mb`` (the cgroup's peak, page
    cache included), ``peak_pss_mb`` (the largest sum of the processes'
    PSS seen, sampled) with ``pss_at_peak`` (kind and MB of each process then), ``processes`` and ``workers`` started, ``oom_kills``,
    ``leftover`` (pids still alive at the end, killed), ``wall_s`` and the
    command's ``output`` (its last 20,000 characters).
    """
    group = MemoryCgroup(limit_bytes)
    seen: dict[int, str] = {}
    peak_pss, pss_at_peak = 0, []
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                                 preexec_fn=group.join, start_new_session=True)
        try:
            while child.poll() is None:
                if time.perf_counter() - started > timeout_s:
                    os.killpg(child.pid, signal.SIGKILL)
                    break
                sample = []
                for pid in group.pids():
                    if pid not in seen:
                        try:
                            seen[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                        except OSError:
                            continue
                    sample.append((_kind(seen[pid]), _pss_bytes(pid)))
                total = sum(rss for _, rss in sample)
                if total > peak_pss:
                    peak_pss, pss_at_peak = total, sorted(sample, key=lambda s: -s[1])
                time.sleep(0.25)
            returncode = child.wait()
            wall = time.perf_counter() - started
        finally:
            if child.poll() is None:
                child.kill()
            peak, ooms = group.peak_bytes(), group.oom_kills()
            leftover = group.close()
        output.seek(0)
        text = output.read()
    return {
        "returncode": returncode,
        "peak_mb": round(peak / MB),
        "peak_pss_mb": round(peak_pss / MB),
        "pss_at_peak": [[kind, round(rss / MB)] for kind, rss in pss_at_peak],
        "processes": len(seen),
        "workers": sum(_kind(c) == "worker" for c in seen.values()),
        "oom_kills": ooms,
        "leftover": leftover,
        "wall_s": round(wall, 1),
        "output": text[-20000:],
    }


def notebook_env() -> dict:
    """The environment a notebook runs in under the tests (test_notebooks.py):
    no FORGE_LITE_* settings of the caller, and PYTEST_CURRENT_TEST set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_LITE_")}
    env.setdefault("PYTEST_CURRENT_TEST", "benchmarks/memory.py (call)")
    return env


def nbval_command(notebook: Path) -> list[str]:
    """The command tests/test_notebooks.py runs a notebook with."""
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
            "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"),
            str(notebook.relative_to(ROOT))]


def execute(notebook: Path, timings: Path) -> None:
    """(In the cgroup.) Run every cell of ``notebook`` with nbclient; write
    each code cell's wall seconds and source start to ``timings``."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}})
    cells = []
    try:
        with client.setup_kernel():
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                began = time.perf_counter()
                client.execute_cell(cell, index)
                cells.append({"index": index, "s": round(time.perf_counter() - began, 2),
                              "source": cell.source})
    finally:
        timings.write_text(json.dumps(cells))


def measure(notebook: Path, limit_bytes: int | None = None) -> dict:
    """One notebook, run with nbclient in a fresh cgroup: ``run_in_cgroup``'s
    numbers plus ``cells`` (wall seconds per code cell) and ``startup_s``
    (the first cell that starts an actor or a service)."""
    with tempfile.TemporaryDirectory() as scratch:
        timings = Path(scratch) / "cells.json"
        result = run_in_cgroup([sys.executable, __file__, "--execute", str(notebook), str(timings)],
                               limit_bytes=limit_bytes, env=notebook_env())
        cells = json.loads(timings.read_text()) if timings.exists() else []
    first = next((c for c in cells if any(s in c["source"] for s in STARTS)), None)
    return {**result, "notebook": notebook.name, "cells": [c["s"] for c in cells],
            "startup_s": first["s"] if first else None, "passed": result["returncode"] == 0}


def select(prefixes: list[str] | None) -> list[Path]:
    if not prefixes:
        return NOTEBOOKS
    chosen = [nb for nb in NOTEBOOKS if any(nb.name.startswith(p) for p in prefixes)]
    if len(chosen) < len(prefixes):
        raise SystemExit(f"--notebooks {prefixes}: not all found in {[nb.name for nb in NOTEBOOKS]}")
    return chosen


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--execute":
        execute(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notebooks", nargs="*", help="name prefixes (01 02 ...); default: all")
    parser.add_argument("--limit-mb", type=int, default=None, help="a hard memory limit for the cgroup")
    parser.add_argument("--label", default="", help="a name for this run in the results file")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    why_not = cgroup_available()
    if why_not:
        raise SystemExit(f"benchmarks/memory.py: {why_not}")

    load = os.getloadavg()[0]
    print(f"load average before: {load:.1f} on {os.cpu_count()} CPUs", flush=True)
    header = f"{'notebook':32} {'peak MB':>8} {'PSS MB':>7} {'procs':>6} {'workers':>8} {'start s':>8} {'wall s':>7}  result"
    print(header)
    rows = []
    for notebook in select(args.notebooks):
        row = measure(notebook, None if args.limit_mb is None else args.limit_mb * MB)
        rows.append(row)
        verdict = "passed" if row["passed"] else f"FAILED (rc {row['returncode']}, oom kills {row['oom_kills']})"
        startup = "-" if row["startup_s"] is None else f"{row['startup_s']:.1f}"
        print(f"{row['notebook']:32} {row['peak_mb']:8d} {row['peak_pss_mb']:7d} {row['processes']:6d} "
              f"{row['workers']:8d} {startup:>8} {row['wall_s']:7.0f}  {verdict}", flush=True)
        print(f"{'':32} at the PSS peak: " + ", ".join(f"{k} {mb}" for k, mb in row["pss_at_peak"]), flush=True)
        if not row["passed"]:
            print(row["output"][-3000:], flush=True)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    results[args.label or time.strftime("%Y-%m-%d %H:%M:%S")] = {
        "limit_mb": args.limit_mb, "load_before": load, "cpus": os.cpu_count(),
        "notebooks": [{k: v for k, v in r.items() if k != "output"} for r in rows],
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
