"""One GPU per learner: a learner's processes share the one GPU their server
sees (``options(with_gpus=True, gpu_share=...)``). The allocation runs on any
machine: the visible-device list is the input (here a made-up one, so the
processes started below run on the CPU with ``CUDA_VISIBLE_DEVICES`` set as
it would be on a GPU node)."""

from __future__ import annotations

import os

import pytest
from monarch.actor import endpoint

from forge_lite.controller import ForgeActor
from forge_lite.controller import gpus as _gpus
from forge_lite.controller.gpus import pack_gpus
from forge_lite.grpo.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("visible, load, count, share, expected", [
    ([0], {}, 3, 1 / 3, [0, 0, 0]),                    # three thirds of one GPU
    ([0], {0: 0.45}, 1, 0.55, [0]),                    # exactly full
    ([0], {0: 0.5}, 1, 0.55, None),                    # over: refused
    ([0, 1], {}, 2, 1.0, [0, 1]),                      # whole GPUs: one each
    ([0, 1], {0: 0.1}, 1, 1.0, [1]),                   # a whole GPU only where nothing runs
    ([0, 1], {1: 0.3}, 1, 0.5, [1]),                   # a share packs onto the fuller GPU
    ([3, 5], {}, 3, 0.5, [3, 3, 5]),                   # CUDA_VISIBLE_DEVICES=3,5
    ([], {}, 1, 0.5, None),                            # no GPU
])
def test_pack_gpus(visible, load, count, share, expected):
    before = dict(load)
    assert pack_gpus(count, share, visible, load) == expected
    assert load == before  # it only answers; reserve_gpus reserves


def test_the_one_gpu_config_fits_one_gpu_and_the_four_gpu_one_does_not():
    one = load_config(os.path.join(ROOT, "configs", "grpo_qwen3_0_6b_one_gpu.yaml"))
    sections = [(one.policy.num_replicas, one.policy.gpu_share), (one.trainer.procs, one.trainer.gpu_share),
                (one.ref_model.num_replicas, one.ref_model.gpu_share)]
    load: dict[int, float] = {}
    for count, share in sections:
        taken = pack_gpus(count, share, [0], load)
        assert taken == [0] * count
        load[0] = load.get(0, 0.0) + count * share
    assert load[0] <= 1.0
    assert one.policy.engine["gpu_memory_utilization"] <= one.policy.gpu_share  # vLLM keeps to its share
    four = load_config(os.path.join(ROOT, "configs", "grpo_qwen3_1_7b.yaml"))
    assert pack_gpus(four.policy.num_replicas + 2, four.policy.gpu_share, [0], {}) is None


@pytest.mark.parametrize("share", [0, -0.5, 1.5, True, "half"])
def test_a_share_outside_zero_to_one_is_refused_at_options(share):
    with pytest.raises(ValueError, match="gpu_share must be a number in"):
        Device.options(with_gpus=True, gpu_share=share)


class Device(ForgeActor):
    @endpoint
    def visible(self) -> str | None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.fixture
def one_gpu(monkeypatch):
    """This machine as a workshop server sees it: one GPU, id 0. Told where
    every caller of ``visible_gpus`` learns it (torch's device count), so the
    service's fit check and the allocation both see it."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _gpus.visible_gpus() == [0]
    monkeypatch.setattr(_gpus, "_gpu_load", {})
    return _gpus._gpu_load


async def test_a_learners_processes_share_its_one_gpu(one_gpu):
    policy = await Device.options(with_gpus=True, gpu_share=0.3, num_replicas=1).as_service()
    trainer = await Device.options(with_gpus=True, gpu_share=0.55).as_actor()
    try:
        assert await policy.visible.route() == "0"
        assert await trainer.visible.call_one() == "0"
        assert one_gpu == {0: pytest.approx(0.85)}
        # A whole GPU more does not fit, nor a share over what is left ...
        with pytest.raises(RuntimeError, match=r"needs 1 GPU\(s\) at a share of 0.2 each.*GPU 0: 0.85"):
            await Device.options(with_gpus=True, gpu_share=0.2).as_actor()
        with pytest.raises(RuntimeError, match="needs 3 GPUs at a share of 0.4 each"):
            await Device.options(with_gpus=True, gpu_share=0.4, num_replicas=3).as_service()
        # ... but the rest does, and stopping a process gives its share back.
        reference = await Device.options(with_gpus=True, gpu_share=0.15).as_actor()
        assert one_gpu == {0: pytest.approx(1.0)}
        await Device.shutdown(reference)
        assert one_gpu == {0: pytest.approx(0.85)}
    finally:
        await policy.shutdown()
        await Device.shutdown(trainer)
    assert one_gpu == {}
