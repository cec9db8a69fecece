"""Hosts, and where one replica runs on them.

One idea: the caller's record of each machine (``Host``: its name, address,
facts, UP or LOST, how much is placed there) and of one replica's share of
them (``Placement``: its hosts, the mesh over them, its GPUs). These are
plain records: the ``Cluster`` (``cluster.py``) decides and changes them;
services and ``procs.py`` read them. Nothing here talks to a machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

UP, LOST = "UP", "LOST"


@dataclass(eq=False)  # a host is itself: compared by identity
class Host:
    """One machine of the cluster, as the caller sees it.

    ``placed`` counts the replicas (and actors) placed here, which is what
    "least occupied" means; ``state`` is UP or LOST.
    """

    index: int
    address: str | None  # "tcp://10.0.0.2:26600"; None for this machine or a job's host
    mesh: Any  # a HostMesh of this one host
    facts: dict = field(default_factory=dict)
    is_this_host: bool = False
    name: str = ""  # "host1"; "local" when the cluster is this machine alone
    agent: Any = None  # the HostAgent (None on this machine: the caller is the probe)
    agent_procs: Any = None
    state: str = UP
    reason: str = "attached"
    placed: int = 0
    gpus_in_use: set = field(default_factory=set)
    orphans: list = field(default_factory=list)  # processes to kill when it comes back
    reattaching: bool = False
    last_reattach: float = 0.0
    attachments: int = 1  # a new worker (replace_host, re-attach) makes it a new host

    def __post_init__(self) -> None:
        self.name = self.name or f"host{self.index}"

    @property
    def where(self) -> str:
        """``10.0.0.3:26600``, ``this machine``, or a job host's hostname."""
        if self.address:
            return strip_scheme(self.address)
        return "this machine" if self.is_this_host else self.facts.get("hostname", "?")

    @property
    def label(self) -> str:
        """``host1 (10.0.0.3:26600)``: the name, and where it is."""
        return f"{self.name} ({self.where})"

    @property
    def gpus(self) -> list[int]:
        return list(self.facts.get("gpus", []))

    def reserve_gpus(self, count: int) -> list[int]:
        free = [g for g in self.gpus if g not in self.gpus_in_use]
        taken = free[:count]
        self.gpus_in_use.update(taken)
        return taken

    def free_gpus(self) -> int:
        return len(self.gpus) - len(self.gpus_in_use)


def strip_scheme(address: str) -> str:
    """``tcp://10.0.0.2:26600`` -> ``10.0.0.2:26600``; of an address that binds
    one place and advertises another (``tcp://A:P@tcp://0.0.0.0:P``), ``A:P``."""
    return address.split("://", 1)[-1].split("@", 1)[0]


@dataclass
class Placement:
    """Where one replica (or actor) runs: its hosts, a HostMesh over exactly
    those hosts, and each process's GPU (per host, per process) or None."""

    # The Cluster (cluster.py) that placed it: procs.py asks it to kill
    # processes on these hosts. (Not imported here: cluster.py imports this.)
    cluster: Any
    hosts: list[Host]
    mesh: Any
    gpus: list[list[int]] | None = None
    released: bool = False

    @property
    def name(self) -> str:
        """``host1``, or ``host0+host2`` for a replica over two hosts."""
        return "+".join(h.name for h in self.hosts)

    @property
    def on_this_host_only(self) -> bool:
        return len(self.hosts) == 1 and self.hosts[0].is_this_host

    @property
    def lost(self) -> list[Host]:
        return [h for h in self.hosts if h.state == LOST]

    def release(self) -> None:
        """Give the hosts' slots and GPUs back; safe to call twice."""
        if self.released:
            return
        self.released = True
        for i, host in enumerate(self.hosts):
            host.placed -= 1
            if self.gpus:
                host.gpus_in_use.difference_update(self.gpus[i])


HostListener = Callable[[str, Host, str], None]  # (UP or LOST, host, reason)
