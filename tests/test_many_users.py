"""Many learners on one node: what the kit writes in the shared temporary
folder belongs to one Unix user and is never read, swept or deleted by another.

Every check runs the kit as a real unprivileged user (two throwaway users made
with ``useradd``, removed at the end; skipped where that cannot be done) in a
temporary folder shared like ``/tmp`` (mode 1777, given as ``TMPDIR``, so that
nothing else on this machine runs in it). Before each run, the folders the
kit used to share (``forge_lite_runs``, ``forge_lite_weights_*``,
``forge_lite_worker_*.log``) and folders of other users are left there,
owned by root or by the other user, mode 0700 and 0755; after it the
learner's run worked, its files are in its own ``forge_lite-<uid>`` (0700),
and every folder of the others is exactly as it was (names, modes, owners,
mtimes, bytes).

The ``.venv`` here is built from root's pyenv Python (``/root`` is 0700), which
another user cannot run: each user's command runs in a mount namespace of its
own where ``/root`` holds only that Python (see ``as_user``); nothing changes
for the rest of the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from forge_lite.paths import private_temp_dir
from learners import User, as_user, learners

ROOT = Path(__file__).resolve().parents[1]
TINY = [f"--config={ROOT / 'configs' / 'grpo_tiny.yaml'}", "steps=2", "group_size=2", "batch_size=4",
        "eval_samples=0", "progress=false"]


# ---------------------------------------------------------------- users and their commands


@pytest.fixture(scope="module")
def users():
    """Two throwaway Unix users, removed (with everything they left) at the end."""
    with learners(2, tag="flmu") as made:
        yield made


@pytest.fixture(scope="module")
def shared_tmp(users):
    """A folder shared by everyone as /tmp is (1777, owned by root): the TMPDIR of every run here."""
    path = Path(tempfile.mkdtemp(prefix="fl_shared_tmp_", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_python(user: User, code: str, tmpdir: Path, timeout: float = 120) -> dict:
    """Run ``code`` as ``user``; it prints one JSON line last, returned here."""
    out = as_user(user, ["python", "-c", textwrap.dedent(code)], tmpdir, timeout)
    assert out.returncode == 0, f"as {user}: rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- what others left


def plant(path: Path, mode: int, owner: int = 0, files: dict[str, bytes] | None = None, age_s: float = 600) -> Path:
    """A folder ``path`` owned by ``owner`` with ``mode``, holding ``files``
    (default: one data file), last changed ``age_s`` ago (old enough that a
    sweep of dead runs would take it)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, data in (files or {"data.bin": b"another user's bytes"}).items():
        (path / name).write_bytes(data)
        os.chown(path / name, owner, owner)
        os.chmod(path / name, mode & 0o666)
        os.utime(path / name, (time.time() - age_s,) * 2)
    os.chown(path, owner, owner)
    os.chmod(path, mode)
    os.utime(path, (time.time() - age_s,) * 2)
    return path


def snapshot(path: Path) -> dict:
    """Everything about ``path``'s tree another user must not change."""
    found = {}
    for entry in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
        info = entry.lstat()
        data = entry.read_bytes() if entry.is_file() else None
        found[str(entry.relative_to(path.parent))] = (stat.filemode(info.st_mode), info.st_uid, info.st_mtime_ns, data)
    return found


def private_of(user: User, tmpdir: Path) -> Path:
    return tmpdir / f"forge_lite-{user.uid}"


def assert_private(path: Path, user: User) -> None:
    info = path.lstat()
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == user.uid, (path, info)
    assert stat.S_IMODE(info.st_mode) == 0o700, (path, oct(info.st_mode))


def others_of(users: list[User], tmpdir: Path, kind: str) -> list[Path]:
    """Folders of ``kind`` left by root (0700 and 0755, old and new layout)
    and by the second user, in ``tmpdir``."""
    other = users[1]
    legacy = {  # where the kit put them before (one folder of /tmp for everyone)
        "runs": [tmpdir / "forge_lite_runs"],
        "weights": [tmpdir / "forge_lite_weights_0a1b2c3d", tmpdir / "forge_lite_weights_4e5f6a7b"],
        "host_cache": [tmpdir / "forge_lite_weights_0123456789abcdef", tmpdir / "forge_lite_weights_fedcba9876543210"],
    }[kind]
    new = {"runs": "runs", "weights": "weights_x", "host_cache": "host_cache_0123456789abcdef"}
    files = {"host_cache": {".users": b"", "v1-ab12.bin": b"weights"}}.get(kind)
    planted = [plant(path, mode, files=files) for path, mode in zip(legacy, [0o755, 0o700])]
    planted += [plant(tmpdir / "forge_lite-0" / new[kind], 0o700, files=files)]
    os.chmod(tmpdir / "forge_lite-0", 0o700)
    (tmpdir / f"forge_lite-{other.uid}").mkdir(mode=0o700, exist_ok=True)
    os.chown(tmpdir / f"forge_lite-{other.uid}", other.uid, other.uid)
    planted += [plant(tmpdir / f"forge_lite-{other.uid}" / new[kind], 0o700, owner=other.uid, files=files)]
    return planted


# ---------------------------------------------------------------- the private folder itself


def test_the_private_folder_is_made_0700_and_a_wider_one_of_ours_is_narrowed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = private_temp_dir()
    assert path == tmp_path / f"forge_lite-{os.geteuid()}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700 and path.stat().st_uid == os.geteuid()
    path.chmod(0o755)
    (path / "kept").write_text("x")
    assert private_temp_dir() == path and stat.S_IMODE(path.stat().st_mode) == 0o700
    assert (path / "kept").read_text() == "x"  # made again: nothing inside it is touched


@pytest.mark.parametrize("squat", ["another user's folder", "symlink", "file"])
def test_a_private_folder_name_taken_by_something_else_is_refused(tmp_path, monkeypatch, squat):
    if squat == "another user's folder" and os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = tmp_path / f"forge_lite-{os.geteuid()}"
    if squat == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        path.symlink_to(tmp_path / "elsewhere")
    elif squat == "file":
        path.write_text("")
    else:
        path.mkdir(mode=0o700)
        os.chown(path, 12345, 12345)
    with pytest.raises(PermissionError, match=rf"{path}.*set TMPDIR to a folder of your own"):
        private_temp_dir()
    if squat == "symlink":
        assert stat.S_IMODE((tmp_path / "elsewhere").stat().st_mode) == 0o700  # not followed, not changed


def test_as_a_learner_a_private_folder_squatted_by_root_is_a_clear_error(users):
    learner = users[0]
    tmpdir = Path(tempfile.mkdtemp(prefix="fl_squat_", dir="/tmp"))
    try:
        tmpdir.chmod(0o1777)
        squatted = plant(private_of(learner, tmpdir), 0o700)
        before = snapshot(squatted)
        out = as_user(learner, ["python", "-c", "from forge_lite.actors.weights import WeightStore; WeightStore()"],
                      tmpdir)
        assert out.returncode != 0
        assert f"PermissionError: {squatted} is not a directory of uid {learner.uid}" in out.stderr, out.stderr[-3000:]
        assert "set TMPDIR to a folder of your own" in out.stderr
        assert snapshot(squatted) == before
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# ---------------------------------------------------------------- each kind of path, as a learner


def test_a_run_folder_is_the_learners_own(users, shared_tmp):
    learner = users[0]
    others = others_of(users, shared_tmp, "runs")
    before = {p: snapshot(p) for p in others}
    made = run_python(learner, """
        import json, os
        from forge_lite.grpo.run import make_output_dir
        path = make_output_dir(None)
        (path / "metrics.jsonl").write_text("{}")  # the learner's run can write there
        print(json.dumps(str(path)))
    """, shared_tmp)
    run = Path(made)
    assert run.parent == private_of(learner, shared_tmp) / "runs", run
    for path in (private_of(learner, shared_tmp), run.parent, run):
        assert_private(path, learner)
    assert {p: snapshot(p) for p in others} == before


def test_a_weight_store_folder_is_the_learners_own(users, shared_tmp):
    learner = users[0]
    others = others_of(users, shared_tmp, "weights")
    before = {p: snapshot(p) for p in others}
    made = run_python(learner, """
        import json, os, torch
        from forge_lite.actors.weights import WeightStore
        store = WeightStore(keep_last=1)
        store.put(1, {"w": torch.ones(3)})
        root, mode = store.root, oct(os.stat(store.root).st_mode & 0o777)
        loaded = store.get(1)["w"].tolist()
        store.close()
        print(json.dumps([root, mode, loaded, os.path.exists(root)]))
    """, shared_tmp)
    root, mode, loaded, exists_after_close = made
    assert Path(root).parent == private_of(learner, shared_tmp) and mode == "0o700"
    assert loaded == [1.0, 1.0, 1.0] and not exists_after_close
    assert_private(private_of(learner, shared_tmp), learner)
    assert {p: snapshot(p) for p in others} == before


def test_a_host_cache_sweeps_only_the_learners_own_dead_runs(users, shared_tmp):
    learner = users[0]
    others = others_of(users, shared_tmp, "host_cache")
    before = {p: snapshot(p) for p in others}
    # The learner's own run that was killed long ago: the sweep still takes it.
    private_temp = private_of(learner, shared_tmp)
    private_temp.mkdir(mode=0o700, exist_ok=True)
    os.chown(private_temp, learner.uid, learner.uid)
    own_dead = plant(private_temp / "host_cache_deadbeefdeadbeef", 0o700, owner=learner.uid,
                     files={".users": b"", "v1-ab12.bin": b"weights"})
    made = run_python(learner, """
        import asyncio, json, os, torch
        from forge_lite.actors.host_cache import host_cache, snapshot

        async def main():
            cache = host_cache("00112233aabbccdd", keep_last=2)
            state = {"w": torch.arange(4.0)}
            _, layout = snapshot(state)
            async def fetch():
                return state
            loaded = await cache.load(1, "ab12", layout, fetch)
            folder, mode = str(cache.folder), oct(os.stat(cache.folder).st_mode & 0o777)
            await cache.leave()
            return [folder, mode, loaded["w"].tolist(), os.path.exists(folder)]

        print(json.dumps(asyncio.run(main())))
    """, shared_tmp)
    folder, mode, loaded, exists_after_leave = made
    assert Path(folder) == private_temp / "host_cache_00112233aabbccdd" and mode == "0o700"
    assert loaded == [0.0, 1.0, 2.0, 3.0] and not exists_after_leave
    assert not own_dead.exists()  # the learner's own dead run was swept
    assert {p: snapshot(p) for p in others} == before  # nobody else's was opened or deleted


def test_a_worker_log_is_the_learners_own_and_goes_with_its_process(users, shared_tmp):
    learner = users[0]
    legacy = [plant(shared_tmp / f"forge_lite_worker_{name}", mode, files={"x.log": b"root's worker log"})
              for name, mode in (("a1b2", 0o700), ("c3d4", 0o755))]
    before = {p: snapshot(p) for p in legacy}
    made = run_python(learner, """
        import json, os
        from forge_lite.worker import LocalHosts
        hosts = LocalHosts(1, namespaces=False).start()
        log = hosts.workers[0].log_path
        info = [log, oct(os.stat(log).st_mode & 0o777), "forge_lite worker ready" in open(log).read()]
        hosts.stop()
        print(json.dumps(info))
    """, shared_tmp)
    log, mode, ready = made
    assert Path(log).parent == private_of(learner, shared_tmp) and mode == "0o600" and ready
    assert not Path(log).exists()  # removed when the process that named it exited
    assert {p: snapshot(p) for p in legacy} == before


# ---------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_a_grpo_run_from_the_terminal_works_for_root_then_for_a_learner(users, shared_tmp):
    learner = users[0]
    legacy_runs = shared_tmp / "forge_lite_runs"  # what the kit made before: root's, 0755
    if not legacy_runs.exists():
        plant(legacy_runs, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGE_LITE_", "PYTEST_"))}
    first = subprocess.run([sys.executable, "-m", "forge_lite.grpo", *TINY], cwd=shared_tmp, capture_output=True,
                           text=True, timeout=180, env={**env, "TMPDIR": str(shared_tmp)})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    roots_runs = shared_tmp / "forge_lite-0" / "runs"
    assert len(list(roots_runs.glob("grpo-*"))) == 1
    before = {p: snapshot(p) for p in (roots_runs, legacy_runs)}
    learners_runs = private_of(learner, shared_tmp) / "runs"
    earlier = set(learners_runs.iterdir()) if learners_runs.exists() else set()

    second = as_user(learner, ["python", "-m", "forge_lite.grpo", *TINY], shared_tmp, timeout=180)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "2 steps in" in second.stdout, second.stdout[-2000:]
    runs = list(set(learners_runs.iterdir()) - earlier)
    assert len(runs) == 1 and (runs[0] / "metrics.jsonl").exists(), runs
    assert_private(runs[0], learner)
    assert {p: snapshot(p) for p in (roots_runs, legacy_runs)} == before


WEIGHT_SYNC = """
import asyncio, json, os
import torch
import forge_lite  # before monarch
from forge_lite.actors.engines import SamplingConfig, make_engine
from forge_lite.actors.policy import Policy
from forge_lite.actors.weight_server import open_weight_store
from forge_lite.paths import private_temp_dir

GREEDY = {"n": 1, "temperature": 0.0, "max_tokens": 16}
PROBE = "What is 12 + 30?"

async def main():
    store = await open_weight_store("actor")
    policy = await Policy.options(num_replicas=2).as_service(
        engine_config={"backend": "transformers"}, sampling_config=GREEDY, weight_store=store)
    try:
        engine = make_engine({"backend": "transformers"}, seed=0, device="cpu")
        generator = torch.Generator().manual_seed(1)
        state = {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                 for name, tensor in engine.model.state_dict().items()}
        engine.load_weights(state, version=1)
        expected = engine.generate([PROBE], SamplingConfig.from_dict(GREEDY))[0][0].token_ids.tolist()
        before = [c[0].token_ids.tolist() for c in await policy.generate.fanout(PROBE)]
        await store.aput(1, state)
        await policy.update_weights.fanout(1)
        folder = private_temp_dir() / f"host_cache_{store.id}"
        result = {
            "versions": await policy.get_version.fanout(),
            "answers": [c[0].token_ids.tolist() for c in await policy.generate.fanout(PROBE)],
            "expected": expected, "before": before,
            "folder": str(folder), "mode": oct(os.stat(folder).st_mode & 0o777),
        }
    finally:
        await Policy.shutdown(policy)
        await store.aclose()
    result["folder_after"] = os.path.exists(folder)
    print(json.dumps(result))

asyncio.run(main())
"""


@pytest.mark.slow
def test_a_weight_sync_through_the_host_cache_works_for_a_learner_after_root(users, shared_tmp):
    learner = users[0]
    others = others_of(users, shared_tmp, "host_cache")  # what root's and the other user's runs left
    before = {p: snapshot(p) for p in others}
    made = run_python(learner, WEIGHT_SYNC, shared_tmp, timeout=240)
    assert made["versions"] == [1, 1]
    assert made["answers"] == [made["expected"]] * 2  # both replicas serve what was published
    assert made["answers"] != made["before"]  # the weights did change
    assert Path(made["folder"]).parent == private_of(learner, shared_tmp) and made["mode"] == "0o700"
    assert not made["folder_after"]  # the last replica out deleted it
    assert {p: snapshot(p) for p in others} == before
    assert wait_for_no_process(learner) == []  # the learner's teardown left nothing running


def wait_for_no_process(user: User, timeout: float = 15.0) -> list[int]:
    """Pids of ``user``'s live processes once none is left or ``timeout`` s passed."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for process in psutil.process_iter(["uids", "status"]):
            if process.info["uids"] and process.info["uids"].real == user.uid \
                    and process.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)
