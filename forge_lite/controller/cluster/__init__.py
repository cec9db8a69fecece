"""The cluster: the hosts that services and actors are placed on.

By default the cluster is this machine alone and nothing here runs: every
replica is spawned on Monarch's ``this_host()``, as it always was. To use
several machines, start a Monarch worker on each (``python -m
forge_lite.worker --address tcp://0.0.0.0:26600``) and attach them:

    cluster = await forge_lite.attach_cluster(["tcp://10.0.0.2:26600", "tcp://10.0.0.3:26600"])

or hand the kit a ``monarch.job`` job (``ProcessJob`` on one machine for
testing, ``SlurmJob``, ``KubernetesJob``): ``await forge_lite.attach_job(job)``.
From then on ``options(hosts=H, procs=P, num_replicas=R)`` gives each replica
H hosts × P processes, least-occupied hosts first.

One file per idea, read in this order:

- ``hosts.py``: ``Host`` (one machine: UP or LOST, what is placed there) and
  ``Placement`` (one replica's hosts, mesh and GPUs). Plain records.
- ``agent.py``: the ``HostAgent``, the kit's small process on each host (it
  answers probes, reports the host's facts, kills processes there), and
  attaching one worker by starting its agent.
- ``transport.py``: worker addresses (``tcp://HOST:PORT``), the checks that
  one worker is not attached twice, and making this process reachable
  from other machines (Monarch over TCP).
- ``cluster.py``: the ``Cluster``: placing replicas on its hosts, probing
  them (a host that misses a probe deadline is LOST; every service hears
  it at once), attaching a lost host again, ``replace_host``.
- ``attach.py``: the process-wide current cluster (``current()``), and
  ``attach_cluster``, ``attach_job``, ``detach_cluster`` that change it.

``ClusterError`` lives with the controller's other exceptions in
``forge_lite.controller.errors``.

Security: Monarch 0.7.0 does not implement TLS. Anyone who can reach a
worker's port can run code on that machine, so a cluster must be on a
trusted network (a private subnet, a VPN, a cluster's internal network).
"""

from forge_lite.controller.cluster.agent import HostAgent, host_facts, host_versions_match
from forge_lite.controller.cluster.cluster import (
    ATTACH_TIMEOUT_S,
    PROBE_INTERVAL_S,
    PROBE_TIMEOUT_S,
    REATTACH_INTERVAL_S,
    REATTACH_TIMEOUT_S,
    Cluster,
)
from forge_lite.controller.cluster.attach import attach_cluster, attach_job, current, detach_cluster
from forge_lite.controller.cluster.hosts import LOST, UP, Host, HostListener, Placement
from forge_lite.controller.cluster.transport import accepts_connections
from forge_lite.controller.errors import ClusterError

__all__ = [
    "ATTACH_TIMEOUT_S",
    "LOST",
    "PROBE_INTERVAL_S",
    "PROBE_TIMEOUT_S",
    "REATTACH_INTERVAL_S",
    "REATTACH_TIMEOUT_S",
    "UP",
    "Cluster",
    "ClusterError",
    "Host",
    "HostAgent",
    "HostListener",
    "Placement",
    "accepts_connections",
    "attach_cluster",
    "attach_job",
    "current",
    "detach_cluster",
    "host_facts",
    "host_versions_match",
]
