"""Run GRPO from a terminal: ``python -m forge_lite.grpo --config FILE [key=value ...]``.

Overrides use dotted keys for nested settings, e.g.

    python -m forge_lite.grpo --config configs/grpo_tiny.yaml steps=5 trainer.lr=1e-4

``--resume DIR`` continues a run that saved checkpoints (``checkpoint_every``)
from the last complete one in DIR (its output_dir, its checkpoints/ folder or
one checkpoint), with the checkpoint's config and the overrides given:

    python -m forge_lite.grpo --config configs/grpo_tiny.yaml checkpoint_every=50 output_dir=runs/a
    python -m forge_lite.grpo --resume runs/a            # after a crash or Ctrl-C
    python -m forge_lite.grpo --resume runs/a steps=1200  # and train longer

With ``--config`` as well, that file's config is used instead, and it must
keep the keys that cannot change mid-run (``forge_lite.grpo.checkpoint``).

``--cluster`` attaches the Monarch workers at those addresses first
(``forge_lite.attach_cluster``; start one on each node with ``python -m
forge_lite.worker``), so a config's ``placement`` can name their hosts:

    python -m forge_lite.grpo --config configs/grpo_tiny_two_hosts.yaml \
        --cluster tcp://10.0.0.2:26600,tcp://10.0.0.3:26600

Ctrl-C stops the run; every service and actor is shut down before exit.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import forge_lite  # before monarch
from forge_lite.controller.cluster import ClusterError
from forge_lite.grpo.checkpoint import resume_config
from forge_lite.grpo.checkpoint_files import find_checkpoint
from forge_lite.grpo.config import load_config
from forge_lite.grpo.run import run_grpo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forge_lite.grpo",
        description="Train a policy with GRPO on the kit's services.",
    )
    parser.add_argument("--config", help="a YAML config (default: the built-in defaults, or "
                        "with --resume the checkpoint's)")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the run whose checkpoints are in DIR (its output_dir)")
    parser.add_argument("--cluster", metavar="ADDRESSES",
                        help="comma-separated tcp://HOST:PORT of Monarch workers to run on "
                        "(host0, host1, ... in this order); default: this machine alone")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings to change, dotted for nested ones: trainer.lr=1e-5")
    args = parser.parse_args(argv)
    resume = None
    try:
        if args.resume is None:
            config = load_config(args.config, args.overrides)
        else:
            # Checked here, before anything starts: a wrong directory or a
            # config that cannot continue its run is a usage error.
            resume = find_checkpoint(args.resume)
            config = load_config(args.config or resume / "config.yaml", args.overrides)
            config = resume_config(resume, config)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    cluster = [address for address in (args.cluster or "").split(",") if address]
    try:
        asyncio.run(run_on_cluster(config, resume, cluster))
    except ClusterError as error:  # an address that cannot be reached, other versions...
        print(f"GRPO: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("GRPO: interrupted; every service was shut down", file=sys.stderr)
        return 130
    return 0


async def run_on_cluster(config, resume, cluster: list[str]) -> None:
    """``run_grpo`` on the workers at ``cluster`` (attached for the run), or on
    this machine alone when it is empty."""
    if not cluster:
        await run_grpo(config, resume=resume)
        return
    await forge_lite.attach_cluster(cluster)
    try:
        await run_grpo(config, resume=resume)
    finally:
        await forge_lite.detach_cluster()


if __name__ == "__main__":
    sys.exit(main())
