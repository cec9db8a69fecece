"""The unprivileged path: what learners run, run by a learner.

CI runs as root; a workshop's learners never are. Here a throwaway Unix
user (``tests/learners.py``) runs the host checks (loopback hosts: a learner
cannot make network namespaces) after root has used the kit on this machine
(the rest of the suite ran as root before, leaving its files in the shared
temporary folder): the learner's runs must work beside them. Notebook 05
runs as a learner in ``tests/test_workshop_hub.py``, with every other
notebook, through a real JupyterHub.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from learners import as_user, learners

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def learner():
    with learners(1, tag="flhl") as made:
        yield made[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_host_checks_pass_as_a_learner(learner):
    # tests/test_hosts.py: placement, failover, partitions, sessions, the
    # dashboard. (Weights through a host cache as a learner, after root left
    # its folders: tests/test_many_users.py.)
    out = as_user(learner, ["python", "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                            "-o", "python_functions=check_*", "tests/test_hosts.py"], cwd=ROOT, timeout=560)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "no output"
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-3000:]
    assert re.search(r"^HOSTS MODE: loopback", out.stdout, re.MULTILINE), out.stdout[-2000:]
    assert " passed" in summary and "failed" not in summary
