"""forge_lite: services, sessions and GRPO on Monarch actors, made to be watched.

The names below are the ones the tutorial uses; everything else is machinery.
Importing this package first also tunes Monarch for interactive use (see
``forge_lite.controller.runtime``), so import it before ``monarch``.
"""

from forge_lite.controller import runtime as _runtime  # noqa: F401  (sets env before monarch loads)
from forge_lite.controller import ForgeActor

# In the caller's process (a notebook kernel, a script) install the fault hook
# now, so even raw Monarch used after this import cannot take the kernel down.
# (Monarch's client itself starts at the first spawn, so that attach_cluster
# can still choose its transport.) The kit's own worker processes import this
# package too; they leave Monarch's defaults alone.
if not _runtime.in_worker_process():
    _runtime.install_fault_hook()

from forge_lite.controller.cluster import (  # noqa: E402
    attach_cluster,
    attach_job,
    detach_cluster,
)
from forge_lite.controller.cluster import current as cluster  # noqa: E402
from forge_lite.lazy import lazy_exports  # noqa: E402

__all__ = ["ForgeActor", "LocalHosts", "attach_cluster", "attach_job", "cluster", "detach_cluster"]

# LocalHosts (a cluster of workers on this machine, notebook 05) on first
# use: every worker process imports this package and needs none of it.
__getattr__ = lazy_exports(__name__, {"LocalHosts": "forge_lite.local_hosts"})[0]

__version__ = "0.1.0"
