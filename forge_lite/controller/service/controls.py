"""The teaching controls: break a running service on purpose, and watch it heal.

``kill_replica`` and ``kill_host`` SIGKILL processes the way a crash or a
machine losing power would, and nothing tells the service: it finds out by
the doors a real failure takes (Monarch's supervision, a failed call, the
health loop, the cluster's probe). ``slow_replica`` makes one replica slow,
``scale`` adds or removes replicas while requests flow, and
``wait_for_state`` / ``wait_for_host`` wait on the event stream for what the
service did about it.

``TeachingControls`` is mixed into ``Service``: it acts on the service's
``replicas`` and ``cluster``, changes states with ``_set_state``, starts
replicas with ``_start_replica``, and watches ``events``.
"""

from __future__ import annotations

import asyncio

from forge_lite.controller import cluster as _cluster
from forge_lite.controller.service.events import HostStateChanged, ReplicaStateChanged
from forge_lite.controller.service.replica import Replica, ReplicaState


class TeachingControls:
    """The controls of ``Service`` a notebook uses to break and grow it."""

    # ------------------------------------------------------------ replicas

    async def kill_replica(self, index: int, timeout: float = 30.0) -> None:
        """SIGKILL replica ``index``'s processes and wait until the service notices.

        Nothing tells the service about the kill: it finds out the way it
        would for a real crash (Monarch's supervision, or a failed call),
        which takes about half a second here.
        """
        self._check_open()
        replica = self._replica(index)
        generation = replica.generation
        replica.kill()
        if replica.generation == generation and replica.accepting:
            await self.wait_for_state(index, "FAILED", timeout)

    async def slow_replica(self, index: int, seconds: float) -> None:
        """Hold every request sent to replica ``index`` for ``seconds`` more (0 ends it).

        The delay is added by the controller before the call is sent, so it
        behaves like a slow network or an overloaded GPU: the request is in
        flight, counts against the replica's limit, and routers see it.
        """
        self._check_open()
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        self._replica(index).delay_s = float(seconds)

    async def scale(self, num_replicas: int) -> None:
        """Add replicas, or remove the highest-numbered ones after they drain."""
        self._check_open()
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
        current = len(self.replicas)
        if num_replicas > current:
            new = [Replica(self, i) for i in range(current, num_replicas)]
            self.replicas.extend(new)
            for replica in new:
                self._publish_state(replica, None, ReplicaState.RECOVERING, "starting (scale up)")
            results = await asyncio.gather(*(self._start_replica(r) for r in new), return_exceptions=True)
            for replica, result in zip(new, results):
                if isinstance(result, BaseException):
                    self._set_state(replica, ReplicaState.FAILED, f"failed to start: {result}")
        for replica in reversed(self.replicas[num_replicas:]):
            self._set_state(replica, ReplicaState.STOPPED, f"removed by scale({num_replicas}); draining")
            while replica.in_flight > 0:
                await asyncio.sleep(0.01)
            await replica.stop()
            self.replicas.remove(replica)
            self._router_errors.call(self.router.forget_replica, replica.index)

    async def wait_for_state(self, index: int, state: str, timeout: float = 60.0) -> None:
        """Wait until replica ``index`` is, or passes through, ``state``.

        Event based, so a state that lasts no time at all (FAILED, right
        before RECOVERING) is still seen.
        """
        if str(self._replica(index).state) == str(state):
            return
        reached = self.loop.create_future()

        def watch(event) -> None:
            if (isinstance(event, ReplicaStateChanged) and event.replica == index
                    and event.new == str(state) and not reached.done()):
                reached.set_result(None)

        unsubscribe = self.events.subscribe(watch)
        try:
            await asyncio.wait_for(reached, timeout)
        except asyncio.TimeoutError:
            replica = self._replica(index)
            raise TimeoutError(
                f"replica {index} did not reach {state} within {timeout} s; "
                f"it is {replica.state} ({replica.reason})"
            ) from None
        finally:
            unsubscribe()

    def _replica(self, index: int) -> Replica:
        if not 0 <= index < len(self.replicas):
            raise IndexError(f"no replica {index}: this service has replicas 0..{len(self.replicas) - 1}")
        return self.replicas[index]

    # ------------------------------------------------------------ hosts

    async def kill_host(self, index: int, timeout: float = 30.0) -> None:
        """SIGKILL host ``index`` of the cluster (its worker and every process
        on it) and wait until the service notices.

        Nothing tells the service about the kill: it finds out from the
        cluster's probe, as it would for a machine that lost power (about
        ``probe_interval + probe_timeout`` seconds). Raises ValueError on a
        cluster of this machine alone (there is no other host to kill),
        IndexError for no such host, TimeoutError if not noticed in ``timeout`` s.
        """
        self._check_open()
        if self.cluster.is_local:
            raise ValueError("the cluster is this machine alone: there is no host to kill "
                             "(attach workers with forge_lite.attach_cluster)")
        await self.cluster.kill_host(index)
        await self.wait_for_host(index, _cluster.LOST, timeout)

    async def wait_for_host(self, index: int, state: str, timeout: float = 60.0) -> None:
        """Wait until host ``index`` of the cluster is ``state`` (UP or LOST) for this service."""
        host = self.cluster.host(index)
        if self._host_states.get(host.name) == state:
            return
        reached = self.loop.create_future()

        def watch(event) -> None:
            if (isinstance(event, HostStateChanged) and event.host == host.name
                    and event.new == state and not reached.done()):
                reached.set_result(None)

        unsubscribe = self.events.subscribe(watch)
        try:
            await asyncio.wait_for(reached, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{host.label} did not become {state} within {timeout} s; it is {host.state}") from None
        finally:
            unsubscribe()
