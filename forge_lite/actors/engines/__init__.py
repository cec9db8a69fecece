"""Inference engines for the Policy, and `make_engine`, which picks one from an engine_config.

Two engines, one interface (`Engine` in base.py):
- "vllm": vLLM in the caller's process (the default wherever `import vllm` works);
- "transformers": plain PyTorch with its own prefix KV cache, for machines
  without vLLM and for fast tests.

Neither vllm nor transformers is imported until an engine is built.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from typing import Any
from urllib.parse import urlparse

from forge_lite.actors.engines.base import Completion, Engine, SamplingConfig

__all__ = ["Completion", "Engine", "SamplingConfig", "make_engine", "resolve_model"]

# engine_config keys the transformers engine understands. The parallelism keys
# are accepted because the tutorial passes them (with value 1), and
# `enforce_eager` because a PyTorch loop is always eager.
_TRANSFORMERS_KEYS = {"dtype", "max_model_len", "prefix_cache_max_tokens"}
_PARALLEL_KEYS = ("tensor_parallel_size", "pipeline_parallel_size")


def make_engine(engine_config: dict[str, Any] | None, *, seed: int, device: str | None = None) -> Engine:
    """Build the engine an `engine_config` describes.

    Keys: `backend` ("auto", "vllm" or "transformers"; "auto" takes vLLM when
    `import vllm` works), `model` (a local path or a hub id; default: the
    shipped model), and engine options. For vLLM every other key goes to
    `vllm.LLM` (tensor_parallel_size, enforce_eager, max_model_len, dtype, ...);
    the transformers engine takes dtype, max_model_len and
    prefix_cache_max_tokens, and warns about keys it ignores.
    `seed` is the engine's sampling seed: give each replica its own.
    `device` ("cpu", "cuda") applies to the transformers engine; vLLM picks its own.
    """
    config = dict(engine_config or {})
    if "seed" in config:
        raise ValueError(
            "engine_config must not set 'seed': make_engine(seed=...) seeds each engine, "
            "so that replicas sample differently"
        )
    backend = config.pop("backend", "auto")
    model = resolve_model(config.pop("model", None))

    if backend == "auto":
        backend = "vllm" if _vllm_works() else "transformers"
    if backend == "vllm":
        from forge_lite.actors.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model, seed=seed, **config)
    if backend == "transformers":
        from forge_lite.actors.engines.transformers_engine import TransformersEngine

        for key in _PARALLEL_KEYS:
            if config.pop(key, 1) != 1:
                raise ValueError(
                    f"the transformers engine runs on one device, so {key} must be 1; "
                    "use backend='vllm' for tensor or pipeline parallelism"
                )
        config.pop("enforce_eager", None)
        ignored = sorted(set(config) - _TRANSFORMERS_KEYS)
        if ignored:
            warnings.warn(
                f"the transformers engine ignores engine_config key(s) {ignored}; "
                f"it understands {sorted(_TRANSFORMERS_KEYS)} (plus model, backend)",
                stacklevel=2,
            )
        options = {key: value for key, value in config.items() if key in _TRANSFORMERS_KEYS}
        return TransformersEngine(model, seed=seed, device=device, **options)
    raise ValueError(f"unknown engine backend {backend!r}; use 'auto', 'vllm' or 'transformers'")


def resolve_model(model: str | None) -> str:
    """A model name the engines can load without surprises: a local directory,
    a hub id already in the local cache, or a hub id that can be downloaded now.

    Fails here, naming the model and the shipped one, instead of deep inside
    transformers or vLLM after a network timeout.
    """
    shipped = _shipped_model()
    if model is None:
        if shipped is None:
            raise ValueError("engine_config needs a 'model' (a local path or a hub id such as 'Qwen/Qwen3-1.7B')")
        return shipped
    use_instead = f"use model=forge_lite.assets.DEFAULT_MODEL ({shipped})" if shipped else "use a local model directory"

    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return path
    if not _HUB_ID.fullmatch(model) or model.startswith(".") or os.path.exists(path):
        raise FileNotFoundError(f"model path {model!r} does not exist (or is not a directory); {use_instead}")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # downloaded before: the local copy works offline
        return snapshot_download(model, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if _hub_offline():
        raise FileNotFoundError(
            f"model {model!r} is not a local directory nor in the Hugging Face cache, and this process is "
            f"offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); {use_instead}"
        )
    if not _hub_reachable():
        raise FileNotFoundError(
            f"model {model!r} is not a local directory nor in the Hugging Face cache, and the hub "
            f"cannot be reached (no network); {use_instead}"
        )
    return model


# A hub id is "name" or "owner/name".
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _shipped_model() -> str | None:
    try:
        from forge_lite.assets import DEFAULT_MODEL
    except ImportError:
        return None
    # The directory may exist before the model is written into it.
    return DEFAULT_MODEL if os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")) else None


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _vllm_works() -> bool:
    from forge_lite.actors.engines.vllm_engine import set_vllm_environment

    set_vllm_environment()  # before the first import, which reads it
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    except Exception as error:  # installed but broken: say why instead of silently falling back
        warnings.warn(f"vllm is installed but `import vllm` failed ({error!r}); using the transformers engine")
        return False
    return True
