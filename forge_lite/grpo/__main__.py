"""Run GRPO from a terminal: ``python -m forge_lite.grpo --config FILE [key=value ...]``.

Overrides use dotted keys for nested settings, e.g.

    python -m forge_lite.grpo --config configs/grpo_tiny.yaml steps=5 trainer.lr=1e-4

Ctrl-C stops the run; every service and actor is shut down before exit.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.grpo.config import load_config
from forge_lite.grpo.run import run_grpo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forge_lite.grpo",
        description="Train a policy with GRPO on the kit's services.",
    )
    parser.add_argument("--config", help="a YAML config (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings to change, dotted for nested ones: trainer.lr=1e-5")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    try:
        asyncio.run(run_grpo(config))
    except KeyboardInterrupt:
        print("GRPO: interrupted; every service was shut down", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
