"""Which GPU each process gets: shares of the GPUs this machine shows.

A process started with ``with_gpus=True`` sees one GPU (as its cuda:0,
through ``CUDA_VISIBLE_DEVICES``; ``forge_lite.controller.procs`` sets it).
Which one is decided here, from the GPUs this caller may hand out and the
shares of them its processes already hold. A whole GPU (``gpu_share=1.0``)
goes to one process alone; a share below 1 packs onto the fullest GPU it
still fits on, so one learner's policy, reference model and trainer share
the one GPU a workshop server gives them::

    gpus = reserve_gpus(3, "policy", share=0.3)   # e.g. [0, 0, 0]; None on a CPU machine
    ...                                           # the processes run
    release_gpus(gpus, share=0.3)                 # when they stop

The bookkeeping is this caller's (a notebook kernel's or a run's): it knows
nothing of another program using the same GPU.
"""

from __future__ import annotations

import os
import warnings

# GPU id -> the share of it the processes of this caller hold (1.0: all of it).
_gpu_load: dict[int, float] = {}
_warned_no_gpu = False
# Shares are sums of floats like 0.35: compare them with this slack.
_EPS = 1e-9


def visible_gpus() -> list[int]:
    """GPU ids this process may hand out (honours CUDA_VISIBLE_DEVICES)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:
        count = 0
    ids = os.environ.get("CUDA_VISIBLE_DEVICES")
    if ids is not None:
        listed = [int(i) for i in ids.split(",") if i.strip().isdigit()]
        return listed[:count]
    return list(range(count))


def pack_gpus(count: int, share: float, visible: list[int], load: dict[int, float]) -> list[int] | None:
    """Which of the ``visible`` GPUs ``count`` processes go to, each taking
    ``share`` of one GPU, given the shares already taken (``load``); None
    when they do not fit. Nothing is reserved: ``reserve_gpus`` does that.

    A whole GPU (``share=1.0``) goes only to a process of its own. A share
    below 1 goes to the fullest GPU it still fits on, so one learner's
    policy, reference model and trainer pack onto the one GPU a workshop
    gives them instead of spreading over every GPU they can see.
    """
    load = dict(load)
    chosen = []
    for _ in range(count):
        fits = [g for g in visible if load.get(g, 0.0) + share <= 1.0 + _EPS]
        if not fits:
            return None
        gpu = max(fits, key=lambda g: (load.get(g, 0.0), -visible.index(g)))
        load[gpu] = load.get(gpu, 0.0) + share
        chosen.append(gpu)
    return chosen


def reserve_gpus(count: int, what: str, share: float = 1.0) -> list[int] | None:
    """Take ``share`` of a GPU for each of ``count`` processes (see
    ``pack_gpus``), or return None on a machine without GPUs.

    None means "run on CPU": tutorial code asks for GPUs everywhere, and on a
    laptop it should still run, after one warning. Raises RuntimeError,
    with the numbers, when they do not fit.
    """
    global _warned_no_gpu
    gpus = visible_gpus()
    if not gpus:
        if not _warned_no_gpu:
            warnings.warn(
                f"{what} asked for GPUs (with_gpus=True) but this machine has none; "
                "running on CPU instead.",
                stacklevel=3,
            )
            _warned_no_gpu = True
        return None
    taken = pack_gpus(count, share, gpus, _gpu_load)
    if taken is None:
        held = ", ".join(f"GPU {g}: {_gpu_load.get(g, 0.0):.2f}" for g in gpus)
        raise RuntimeError(
            f"{what} needs {count} GPU(s)" + ("" if share == 1.0 else f" at a share of {share:g} each")
            + f" but the machine's {len(gpus)} do not have that free (taken: {held}); "
            "lower procs/num_replicas or gpu_share, or shut down another service."
        )
    for gpu in taken:
        _gpu_load[gpu] = _gpu_load.get(gpu, 0.0) + share
    return taken


def release_gpus(gpus: list[int], share: float = 1.0) -> None:
    """Give back what ``reserve_gpus(..., share)`` took for these GPUs."""
    for gpu in gpus:
        left = _gpu_load.get(gpu, 0.0) - share
        if left > _EPS:
            _gpu_load[gpu] = left
        else:
            _gpu_load.pop(gpu, None)
