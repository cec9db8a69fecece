"""The kit's temporary folder: one per Unix user, private to that user.

On a workshop node many learners (Unix users) share one ``/tmp``. Everything
the kit writes outside the learner's working directory goes under
``<tempfile.gettempdir()>/forge_lite-<uid>`` (mode 0700, owned by the user):

- ``weights_*``: a file weight store's versions (``WeightStore()``);
- ``host_cache_<store id>``: a host's copy of each weight version
  (``forge_lite.actors.host_cache``);
- ``runs/grpo-<time>-<id>``: a GRPO run's outputs when no ``output_dir`` is given;
- ``worker_*.log``: the logs of the workers ``LocalHosts`` starts.

So one learner never reads, sweeps or deletes another's files, and a folder
another user left in ``/tmp`` (a run of an older version of the kit, say)
is never in the way.

The name carries the uid, not the user name: every process of one learner
(kernel, workers, replicas) finds the same folder without asking anyone,
which the host cache needs. If that name is taken by something that is not
the user's own directory (another user's folder, a symlink, a file), the kit
refuses (PermissionError naming the path) rather than pick another name:
the processes of one learner could not agree on another name, and a folder
squatted in a shared ``/tmp`` is for the node's admin to look at. Setting
``TMPDIR`` to a folder of the learner's own gets around it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def private_temp_dir() -> Path:
    """This Unix user's folder for the kit's temporary files, created if missing.

    Returns ``<tempfile.gettempdir()>/forge_lite-<uid>``: a directory owned
    by the calling process's effective uid, mode 0700 (a wider mode on the
    user's own folder is narrowed to 0700).

    Raises PermissionError, naming the path, when that name is a symlink,
    not a directory, or a directory owned by another user.
    """
    uid = os.geteuid()
    path = Path(tempfile.gettempdir()) / f"forge_lite-{uid}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # made earlier, by this user's other processes (or someone else: checked below)
    advice = (f"the kit keeps its temporary files there, private to uid {uid}; "
              "ask the node's admin to remove it, or set TMPDIR to a folder of your own")
    try:
        # O_NOFOLLOW: a symlink is refused, not followed to a folder someone else chose.
        # The checks below are made on this open folder, so nobody can swap it in between.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as error:  # a symlink (ELOOP), a file (ENOTDIR), another user's folder (EACCES)
        raise PermissionError(f"{path} is not a directory of uid {uid} ({error.strerror}): {advice}") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != uid:
            raise PermissionError(f"{path} belongs to uid {info.st_uid}, not to uid {uid}: {advice}")
        if stat.S_IMODE(info.st_mode) != 0o700:  # a umask of 0o700, or a chmod by hand
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path
