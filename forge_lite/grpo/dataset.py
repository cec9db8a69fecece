"""DatasetActor: serves math problems as prompts the policy can answer and targets the reward can check.

A gsm8k row is ``{"question": ..., "answer": "<worked solution>\\n#### 72"}``.
The policy needs the question in the model's chat format, and the math
reward needs the bare number: the whole worked solution as a target would
score 0 every time (the tutorial's production loop makes that mistake). So
each sample carries both forms:

    {"request": <chat-formatted prompt>, "target": "72",
     "question": <raw question>, "answer": <raw answer>}

With no ``path`` the actor serves the math set the kit ships (offline, same
layout as gsm8k); ``path="openai/gsm8k"`` loads the real one from the hub.
Every epoch, the first one too, serves the data in its own shuffled order,
seeded by the epoch number so that runs repeat. The epoch and the number of
rows served in it are therefore the actor's whole state (``state_dict``): a
resumed run (``load_state_dict``) serves exactly the rows that come next.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from typing import Any

from forge_lite.actors.model_spec import resolve_model
from forge_lite.assets import MATH_DATA_DIR
from forge_lite.controller import ForgeActor
from forge_lite.data.prompts import extract_target, format_request
from monarch.actor import endpoint


def load_math_dataset(
    path: str | None = None,
    revision: str | None = None,
    data_split: str = "train",
    streaming: bool = False,
):
    """A gsm8k-layout dataset: the shipped set when ``path`` is None, else a hub set.

    ``revision`` is passed as the dataset's configuration name, as
    TorchForge's GRPO app does: gsm8k's configurations are ``"main"`` and
    ``"socratic"``, and the hub refuses gsm8k without one.
    """
    # Imported here: `datasets` is slow to import, and the processes of the
    # other GRPO actors import this package without needing it.
    from datasets import load_dataset

    if path is None:
        data_files = {
            split: os.path.join(MATH_DATA_DIR, f"{split}.jsonl") for split in ("train", "test")
        }
        if data_split not in data_files:
            raise ValueError(
                f"the shipped math set has splits {sorted(data_files)}, not {data_split!r}"
            )
        return load_dataset("json", data_files=data_files, split=data_split, streaming=streaming)
    try:
        return load_dataset(path, revision, split=data_split, streaming=streaming)
    except OSError as err:  # ConnectionError offline, FileNotFoundError for a wrong name
        raise OSError(
            f"could not load dataset {path!r} (config {revision!r}, split {data_split!r}): "
            f"{err}. Without access to the Hugging Face hub, use DatasetActor() with no "
            "path: it serves the math set the kit ships, in the same layout as gsm8k."
        ) from err


# Light actors share a process (ForgeActor.shares_process) and Monarch runs
# each actor on a thread of its own: two DatasetActors starting at once (a
# run's training and held-out sets) imported transformers concurrently, and
# its lazy module does not survive that ("cannot import name
# 'PreTrainedTokenizerFast'"). One actor loads at a time.
_loading = threading.Lock()


def load_request_tokenizer(spec: str | dict | None):
    """The model's tokenizer, enough to format requests (its chat template,
    pad and EOS ids): transformers' fast tokenizer read from the model's
    ``tokenizer.json``, or ``load_tokenizer``'s when the model has none.

    Why not ``AutoTokenizer`` here: it imports the model's configuration
    classes on the way, about 200 MB more in a process that runs no model
    (measured in the light actors' process; see benchmarks/memory.py).
    """
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(resolve_model(spec))
    except (OSError, ValueError):  # no tokenizer.json: only the model's own class reads it
        from forge_lite.actors.hf_model import load_tokenizer  # imports torch: only here

        return load_tokenizer(spec)


class ShippedRows:
    """The shipped math set's rows (``MATH_DATA_DIR/<split>.jsonl``) as dicts,
    with what DatasetActor uses of a ``datasets.Dataset``: ``len``, iteration
    and ``shuffle(seed=)`` in the same order (``datasets`` shuffles with
    ``numpy.random.default_rng(seed).permutation``). Reading the file with
    ``json`` spares the light actors' process ``datasets`` and pyarrow
    (about 120 MB).

    Raises ValueError for a split the shipped set does not have.
    """

    def __init__(self, data_split: str = "train", rows: list[dict] | None = None):
        if rows is None:
            path = os.path.join(MATH_DATA_DIR, f"{data_split}.jsonl")
            if not os.path.exists(path):
                raise ValueError(f"the shipped math set has splits ['test', 'train'], not {data_split!r}")
            with open(path) as lines:
                rows = [json.loads(line) for line in lines if line.strip()]
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def shuffle(self, seed: int) -> "ShippedRows":
        import numpy as np

        order = np.random.default_rng(seed).permutation(len(self.rows))
        return ShippedRows(rows=[self.rows[i] for i in order])


class DatasetActor(ForgeActor):
    """Serves one formatted math problem per ``sample()`` call, epoch after epoch."""

    shares_process = True  # runs no model: lives on the caller's shared process of light actors

    def __init__(
        self,
        path: str | None = None,
        revision: str | None = None,
        data_split: str = "train",
        streaming: bool = False,
        model: str | dict | None = None,
    ):
        self.path = path
        self.revision = revision
        self.data_split = data_split
        self.streaming = streaming
        self.model = model

    @endpoint
    async def setup(self) -> None:
        with _loading:
            self.tokenizer = load_request_tokenizer(self.model)
            if self.path is None and not self.streaming:
                self.dataset = ShippedRows(self.data_split)  # as load_math_dataset's, without `datasets`
            else:
                self.dataset = load_math_dataset(
                    self.path, self.revision, self.data_split, self.streaming
                )
        # The first epoch is shuffled too: a file's order is seldom random, and
        # every run's first steps would see its start. (The shipped model got
        # 45% of samples right on the shipped set's first 50 problems, 33% on
        # the next 50, 41% over the first 600.)
        self._start_epoch(0)

    def _start_epoch(self, epoch: int, position: int = 0) -> None:
        """Serve epoch ``epoch``'s shuffled order from its row ``position`` on."""
        self.epoch = epoch
        self.position = position  # rows of this epoch served so far
        # The epoch number seeds the order, so that runs repeat.
        rows = iter(self.dataset.shuffle(seed=epoch))
        self._rows = itertools.islice(rows, position, None)

    @endpoint
    def sample(self) -> dict[str, Any]:
        """The next problem: ``request``, ``target``, and the raw ``question`` and ``answer``."""
        row = next(self._rows, None)
        if row is None:
            self._start_epoch(self.epoch + 1)
            row = next(self._rows, None)
            if row is None:
                raise ValueError(f"the dataset {self.path or MATH_DATA_DIR!r} has no rows")
        self.position += 1
        return {
            "request": format_request(self.tokenizer, row["question"]),
            "target": extract_target(row["answer"]),
            "question": row["question"],
            "answer": row["answer"],
        }

    @endpoint
    def state_dict(self) -> dict[str, int]:
        """Where the actor is: ``{"epoch": e, "position": p}``, p rows of epoch e served.

        Plain ints, so a checkpoint can keep them as JSON. Example: after 3
        ``sample()`` calls on a fresh actor, ``{"epoch": 0, "position": 3}``.
        """
        return {"epoch": self.epoch, "position": self.position}

    @endpoint
    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from what ``state_dict`` returned: the next ``sample()`` is
        the row that would have come next. Skipping to the position reads the
        epoch's rows up to it (milliseconds for the shipped set).

        Raises ValueError for a negative epoch or position.
        """
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"DatasetActor.load_state_dict: epoch and position must be >= 0, got {state}")
        self._start_epoch(epoch, position)

    @endpoint
    def pad_token(self) -> int:
        """The id to pad with: the tokenizer's pad token, or EOS when it has none."""
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id
