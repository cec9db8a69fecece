"""Where a service's replicas run, and what it does when a host comes and goes.

On this machine alone there is one host and nothing here has much to do. On
a cluster of several hosts (``forge_lite.attach_cluster``) each replica is
placed on hosts before it spawns (``Replica.place``), and the service
listens to the cluster's probe of each host (``_on_host``):

  - a host is LOST: every replica on it fails at once, with a reason naming
    the host, and its calls in flight are given up (``Replica.abandon``) and
    retried elsewhere; Monarch alone would leave them hanging for a minute or
    more. The replicas respawn on the hosts that are up (``_recover`` in
    service.py, placing each with ``_place_for_respawn``);
  - a host is UP again: the replicas that left it go back home (``_move_home``).

``HostReactions`` is mixed into ``Service``; it uses the service's
``_set_state``, ``replica_failed``, ``_recover``, ``_retired`` and
``_spawn_task``.
"""

from __future__ import annotations

import asyncio

from forge_lite.controller import cluster as _cluster
from forge_lite.controller import gpus as _gpus
from forge_lite.controller.service.events import HostStateChanged
from forge_lite.controller.service.replica import Replica, ReplicaState


def check_gpus(actor_cls: type) -> None:
    """Refuse, before anything spawns, a service whose GPUs cannot fit.

    On this machine: RuntimeError if ``num_replicas × procs`` GPUs (at
    ``gpu_share`` each) do not fit the visible GPUs. On a cluster (which
    counts GPUs per host, ``Cluster.place``): ValueError for a ``gpu_share``
    below 1, since there each process takes a whole GPU.
    """
    if actor_cls.with_gpus and _cluster.current().is_local:
        gpus = _gpus.visible_gpus()
        needed = actor_cls.num_replicas * actor_cls.procs
        share = actor_cls.gpu_share
        if gpus and _gpus.pack_gpus(needed, share, gpus, {}) is None:
            each = "" if share == 1 else f" at a share of {share:g} each"
            raise RuntimeError(
                f"{actor_cls.__name__} needs {needed} GPUs{each} ({actor_cls.num_replicas} replicas × "
                f"{actor_cls.procs} procs) but this machine has {len(gpus)}."
            )
    elif actor_cls.with_gpus and actor_cls.gpu_share < 1:
        raise ValueError(f"{actor_cls.__name__}: gpu_share={actor_cls.gpu_share} shares a GPU of this "
                         "machine; on a cluster each process takes a whole GPU (leave gpu_share at 1)")


class HostReactions:
    """The host side of ``Service``: placing replicas, and reacting to hosts."""

    # ------------------------------------------------------------ placing replicas

    def _check_hosts(self) -> None:
        """The cluster has the hosts the actor class asks for (before any spawn)."""
        cls = self.actor_cls
        self.cluster.check(cls.hosts or 1, f"{cls.__name__}.options(hosts={cls.hosts})")
        if cls.on_hosts is not None:  # every host it names is in the cluster
            self.cluster.choose_among(cls.on_hosts, cls.hosts or 1,
                                      f"{cls.__name__}.options(on_hosts={list(cls.on_hosts)})")

    async def _place_replicas(self) -> None:
        """Place every replica, one by one: each takes the least-occupied hosts left."""
        try:
            for replica in self.replicas:
                replica.place()
        except BaseException:
            for replica in self.replicas:
                await replica.stop()  # gives back the places already taken
            raise

    def _place_for_respawn(self, replica: Replica) -> bool:
        """Place a failed replica for its respawn: its home if that is up, else
        the least-occupied hosts. False when none can take it (no host up, or
        no free GPU): it stays FAILED, and tries again after a cooldown."""
        try:
            replica.place()
        except Exception as e:
            replica.breaker.open_for(self.config.cooldown)
            self._set_state(replica, ReplicaState.FAILED,
                            f"no host to respawn on ({e}); next try in {self.config.cooldown:g} s")
            return False
        return True

    def _where(self, replica: Replica) -> str:
        """Where ``replica`` runs, for a reason: " on host1" on a cluster, "" on this machine alone."""
        return "" if self.cluster.is_local else f" on {replica.host}"

    # ------------------------------------------------------------ news about hosts

    def _watch_hosts(self) -> None:
        """On a cluster: listen to its probe of each host, and publish where they stand."""
        if self.cluster.is_local:
            return
        self._unsubscribe_cluster = self.cluster.subscribe(self._on_host)
        for host in self.cluster.hosts:
            self._publish_host(host, host.state, host.reason)

    def _publish_host(self, host, new: str, reason: str) -> None:
        old = self._host_states.get(host.name)
        self._host_states[host.name] = new
        self.events.publish(HostStateChanged(host.name, old, new, reason, host.where))

    def _on_host(self, state: str, host, reason: str) -> None:
        """The cluster's news about a host: LOST, or UP again."""
        if self._shut_down:
            return
        self._publish_host(host, state, reason)
        if state == _cluster.LOST:
            self._host_lost(host, f"{host.label} lost: {reason}")
        else:
            self._host_back(host)

    def _host_lost(self, host, reason: str) -> None:
        """Fail every replica on ``host`` now, then give up their calls in flight.

        In that order: a given-up call is retried at once, and must not be
        handed to another replica on the same lost host.
        """
        on_host = [r for r in self.replicas
                   if any(h is host for h in r.hosts) and r.state != ReplicaState.STOPPED]
        for replica in on_host:
            self.replica_failed(replica, reason, replica.generation)
        for replica in on_host:
            replica.abandon(reason)  # also a respawn under way there

    def _host_back(self, host) -> None:
        """A host is up again: replicas that left it go back home."""
        for replica in self.replicas:
            if (replica.accepting and replica.displaced and not replica.recovering
                    and any(h is host for h in replica.home)
                    and all(h.state == _cluster.UP for h in replica.home)):
                self._spawn_task(self._move_home(replica))

    async def _move_home(self, replica: Replica) -> None:
        """Move a replica back to its home hosts: out of rotation, drain, respawn there.

        Its requests in flight finish where they are; new ones go to the
        other replicas meanwhile, like during a respawn.
        """
        home = "+".join(h.name for h in replica.home)
        replica.recovering = True
        self._set_state(replica, ReplicaState.RECOVERING, f"moving back to {home}, which is up again")
        try:
            while replica.in_flight > 0 and not self._retired(replica):
                await asyncio.sleep(0.01)
            if self._retired(replica):
                return
            if not all(h.state == _cluster.UP for h in replica.home):
                replica.recovering = False
                self._set_state(replica, ReplicaState.HEALTHY, f"stays on {replica.host}: {home} was lost again")
                return
            await replica.stop()
            replica.place()
            await replica.spawn()
            if self._retired(replica):
                await replica.stop()
                return
        except Exception as e:  # its home was lost again, or the spawn failed
            self.last_failure = f"replica {replica.index}: moving back to {home} failed: {e}"
            replica.recovering = self.config.auto_respawn
            self._set_state(replica, ReplicaState.FAILED, f"moving back to {home} failed ({type(e).__name__}: {e})")
            if self.config.auto_respawn:
                self._spawn_task(self._recover(replica))
            return
        replica.recovering = False
        self._set_state(replica, ReplicaState.HEALTHY, f"back on {replica.host} in {replica.last_spawn_s:.1f} s")
