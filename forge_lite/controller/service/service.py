"""The service controller: replicas behind a router, in the caller's process.

``Service`` runs on the caller's event loop (the notebook kernel), so a widget
in the same kernel can watch it directly. For each request it picks a replica
(session pin or router), waits in order when every replica is full, sends the
call, and on an infrastructure failure marks the replica FAILED, retries the
request elsewhere, and respawns the replica in the background. A health loop
probes every replica. Everything it decides is published on ``self.events``.

Where replicas run and what happens when a host comes and goes is in
``hosts.py``; the controls a notebook breaks the service with (kill, slow,
scale) in ``controls.py``; what ``route`` and ``fanout`` raise in
``forge_lite.controller.errors``. Longer than 500 lines because what is left
is one idea, the life of a request (pick a replica, wait for room, send,
fail, retry, respawn), and a reader follows it top to bottom in one file.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import time
from collections import deque
from typing import Any

from forge_lite.controller import cluster as _cluster
# What route and fanout raise lives in errors.py (its docstring lists them);
# importing these names from here still works.
from forge_lite.controller.errors import (
    FanoutError,
    HostLost,
    NoHealthyReplicaError,
    ReplicaFailure,
    ServiceShutdownError,
    UserError,
)
from forge_lite.controller.service.controls import TeachingControls
from forge_lite.controller.service.events import (
    CallbackErrors,
    EventStream,
    ReplicaStateChanged,
    RequestFinished,
    RequestRetried,
    RequestRouted,
    ServiceStopped,
    SessionEnded,
    SessionMoved,
    SessionStarted,
)
from forge_lite.controller.service.hosts import HostReactions, check_gpus
from forge_lite.controller.service.metrics import ServiceMetrics
from forge_lite.controller.service.replica import Replica, ReplicaState
from forge_lite.controller.service.router import Request, make_router
from forge_lite.controller.service.sessions import SessionTable, current_session

HEALTHY, OVERLOADED, FAILED, RECOVERING, STOPPED = (
    ReplicaState.HEALTHY,
    ReplicaState.OVERLOADED,
    ReplicaState.FAILED,
    ReplicaState.RECOVERING,
    ReplicaState.STOPPED,
)


class FanoutResult(list):
    """The results of a fanout in replica order; ``.replicas`` says which answered."""

    def __init__(self, values: list, replicas: list[int]):
        super().__init__(values)
        self.replicas = replicas


class Service(HostReactions, TeachingControls):
    """Replicas behind a router; what ``as_service()`` runs in the caller's process.

    The life of a request (``route``):
      1. acquire: the session's replica, or the router's choice among the
         replicas with room; its in-flight count is taken. When every replica
         is full the request waits in line (``_waiters``).
      2. send (``_send``, the one place a call goes out): the call runs on the
         replica's processes and is classified: a result, the endpoint's own
         exception (raised to the caller as itself), or a ReplicaFailure.
      3. finish: the slot is given back, and a freed slot goes at once to the
         oldest waiter that can use it (``_drain``).
      4. on a ReplicaFailure: back to 1 on another replica, up to max_retries.

    A failure comes in by one of four doors: a routed call, a fanout call
    (``_send`` for both), the health loop's probe (``_health_loop``), or
    Monarch's fault hook (``Replica._on_mesh_failure``). All four end in
    ``replica_failed``: the replica is marked FAILED, its circuit breaker
    counts the failure, and ``_recover`` respawns it in the background.

    Every state change can wake waiters: a replica that becomes HEALTHY
    again serves them, and when no replica can ever take a request (every
    one failed and none respawns) they fail with NoHealthyReplicaError
    instead of waiting forever. Everything decided is published on
    ``events``.

    On a cluster of several hosts (``forge_lite.attach_cluster``) each
    replica is placed on hosts (``Replica.place``), and a fifth door opens:
    the cluster's probe of each host (``_on_host``). When a host is lost,
    every replica on it fails at once with a reason naming the host, and the
    calls in flight there are given up (``Replica.abandon``) and retried
    elsewhere: Monarch alone would leave them hanging for a minute or more.
    The replicas respawn on the hosts that are up, and go back home when
    their host is up again (``_move_home``). That side lives in ``hosts.py``
    (``HostReactions``); the controls a notebook breaks and grows the service
    with (``kill_replica``, ``kill_host``, ``slow_replica``, ``scale``,
    ``wait_for_state``) in ``controls.py`` (``TeachingControls``).
    """

    _ids = itertools.count()

    def __init__(self, actor_cls: type, args: tuple, kwargs: dict):
        self.actor_cls = actor_cls
        self.args, self.kwargs = args, kwargs
        self.config = actor_cls.service_config
        self.id = next(Service._ids)
        self.name = f"{actor_cls.actor_class().__name__.lower()}{self.id}"
        self.loop = asyncio.get_running_loop()
        # Monarch finds "who is calling" through context variables. Work that
        # starts on a Monarch thread (the fault hook) must run in the caller's
        # context, or spawning a replacement finds no client to spawn from.
        self.context = contextvars.copy_context()
        self.cluster = _cluster.current()  # where the replicas are placed
        # Each host's state as this service last published it, and how to stop
        # listening to the cluster (hosts.py; both only on a cluster).
        self._host_states: dict[str, str] = {}
        self._unsubscribe_cluster = None
        self.events = EventStream(self.config.event_history)
        self.metrics = ServiceMetrics(self.events)
        self.router = make_router(self.config.router)
        self._router_errors = CallbackErrors("router hook")  # forget_replica: a notice, not a request
        self.sessions = SessionTable()
        self.replicas: list[Replica] = []
        self.last_failure: str | None = None
        self._waiters: deque[tuple[Request, asyncio.Future]] = deque()
        self._request_ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._health_task: asyncio.Task | None = None
        self._shut_down = False
        # False while the first replicas start; replicas spawned afterwards
        # (respawns, scale-ups) are told they join a running service.
        self.serving = False

    # ------------------------------------------------------------ start / stop

    @classmethod
    async def start(cls, actor_cls: type, args: tuple, kwargs: dict):
        from forge_lite.controller.service.interface import ServiceInterface

        # Where the replicas go (hosts.py): checked, and placed, before anything spawns.
        check_gpus(actor_cls)
        service = cls(actor_cls, args, kwargs)
        service._check_hosts()
        service.replicas = [Replica(service, i) for i in range(actor_cls.num_replicas)]
        await service._place_replicas()
        service._watch_hosts()
        for replica in service.replicas:
            service._publish_state(replica, None, RECOVERING, "starting" + service._where(replica))
        results = await asyncio.gather(
            *(service._start_replica(r) for r in service.replicas), return_exceptions=True
        )
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            await service.shutdown()
            raise errors[0]
        service.serving = True
        service._health_task = service._spawn_task(service._health_loop())
        return ServiceInterface(service)

    async def _start_replica(self, replica: Replica) -> None:
        await replica.spawn()
        self._set_state(replica, HEALTHY, f"started in {replica.last_spawn_s:.1f} s")

    async def shutdown(self) -> None:
        """Stop every replica and the health loop; safe to call twice."""
        if self._shut_down:
            return
        self._shut_down = True
        if self._unsubscribe_cluster is not None:
            self._unsubscribe_cluster()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        self._fail_waiters(ServiceShutdownError(f"service {self.name} is shut down"))
        for replica in self.replicas:
            self._set_state(replica, STOPPED, "service shut down")
        # A respawn cancelled mid-spawn stops its new processes and gives its
        # host slot back as it unwinds: wait for that, or the cluster would
        # still count the replica there after shutdown (detach_cluster refuses).
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.stop() for r in self.replicas), return_exceptions=True)
        self.events.publish(ServiceStopped(self.name))

    def _check_open(self) -> None:
        if self._shut_down:
            raise ServiceShutdownError(
                f"service {self.name} is shut down; start a new one with .as_service()"
            )

    def _spawn_task(self, coro) -> asyncio.Task:
        task = self.loop.create_task(coro, context=self.context.copy())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ route

    async def route(self, endpoint: str, args: tuple, kwargs: dict, sess_id: str | None = None) -> Any:
        """Run ``endpoint`` on one replica (the session's, or the router's
        choice); on an infrastructure failure, again on another, up to
        ``max_retries`` times."""
        self._check_open()
        session = sess_id or current_session(self.id)
        if session is not None and self.sessions.has_ended(session):
            session = None  # ended: route as if it had no session, and pin nothing
        elif session is not None and session not in self.sessions:
            self.sessions.start(session)
        request = Request(endpoint, args, kwargs, session, id=next(self._request_ids))
        while True:
            replica, reason = await self._acquire(request)
            try:
                return await self._send(request, replica, self.router.name, reason)
            except ReplicaFailure as e:
                request.attempt += 1
                request.failed_replicas.append(replica.index)
                if request.attempt > self.config.max_retries:
                    raise NoHealthyReplicaError(
                        f"{endpoint} failed on {request.attempt} replica(s) "
                        f"{request.failed_replicas} (max_retries={self.config.max_retries}); last: {e}"
                    ) from e
                self.events.publish(RequestRetried(request.id, endpoint, replica.index, str(e), request.attempt))

    async def _send(self, request: Request, replica: Replica, router: str, reason: str) -> Any:
        """Send ``request`` to ``replica``, whose slot the caller has taken,
        and give the slot back whatever happens. The one place a call goes out
        (``route`` and ``fanout`` both come here) and is classified:

        - the result: returned;
        - an exception from the endpoint's own code: raised as itself, the
          replica stays healthy (a successful round trip);
        - ReplicaFailure (its process died or is unreachable): the replica is
          marked FAILED, then ReplicaFailure is raised for the caller to retry;
        - anything else (cancelled, bad arguments): raised, the replica is fine.
        """
        # A failure is news about the processes the call went to; by the
        # time it arrives the replica may already run fresh ones.
        generation = replica.generation
        started = time.perf_counter()
        try:  # from here on, whatever happens, _finish gives the slot back
            self.events.publish(
                RequestRouted(request.id, request.endpoint, replica.index, request.session, router, reason,
                              request.attempt, replica.host)
            )
            result = await replica.call(request.endpoint, request.args, request.kwargs)
        except UserError as e:
            self._finish(request, replica, started, ok=False, error=e.original, healthy=True)
            raise e.original from None
        except ReplicaFailure as e:
            # Mark it failed first: finishing frees a slot, and a waiting
            # request must not be handed the replica that just failed.
            self.replica_failed(replica, str(e), generation)
            self._finish(request, replica, started, ok=False, error=e, healthy=False)
            raise
        except BaseException as e:
            self._finish(request, replica, started, ok=False, error=e, healthy=True)
            raise
        self._finish(request, replica, started, ok=True, result=result, healthy=True)
        return result

    def _finish(self, request, replica, started, *, ok, healthy, result=None, error=None) -> None:
        replica.in_flight -= 1
        if healthy:
            replica.requests_served += 1
            if ok or isinstance(error, Exception):
                replica.breaker.record_success()
        try:
            self.events.publish(
                RequestFinished(
                    request.id, request.endpoint, replica.index, request.session,
                    time.perf_counter() - started, ok,
                    None if error is None else type(error).__name__, result,
                )
            )
        finally:  # waiting requests never depend on a subscriber returning
            self._room_freed(replica)

    def _room_freed(self, replica: Replica) -> None:
        """``replica`` has a free slot again: serve waiters, then update its state.

        In that order: a slot a waiting request takes at once does not flip
        the replica OVERLOADED -> HEALTHY -> OVERLOADED (two events per request
        under load).
        """
        if self._waiters:
            self._drain()
        if replica.state == OVERLOADED and replica.has_room:
            self._set_state(replica, HEALTHY, "back under the request limit")

    # ------------------------------------------------------------ picking a replica

    async def _acquire(self, request: Request) -> tuple[Replica, str]:
        """A replica with room for ``request`` (its in-flight count taken), and why."""
        if not self._waiters:
            picked = self._pick(request)
            if picked is not None:
                return picked
        if not self._can_wait():
            raise NoHealthyReplicaError(self._no_replica_message())
        waiter = self.loop.create_future()
        entry = (request, waiter)
        self._waiters.append(entry)
        try:
            if self.config.request_timeout is None:
                return await waiter
            return await asyncio.wait_for(waiter, self.config.request_timeout)
        except asyncio.TimeoutError:
            raise NoHealthyReplicaError(
                f"no replica took the request within request_timeout={self.config.request_timeout} s; "
                + self._no_replica_message()
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Cancelled just after a replica was handed over: give its slot
                # back, or the replica counts this request in flight forever.
                replica, _ = waiter.result()
                replica.in_flight -= 1
                self._room_freed(replica)
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
            if not waiter.done():
                waiter.cancel()

    def _pick(self, request: Request) -> tuple[Replica, str] | None:
        """A replica for ``request`` (its slot taken), or None: none has room.

        Raises what the router raised, or a TypeError/ValueError when it
        answered with something that is not one of the candidates; no slot
        is taken then, so the error fails this one request only.
        """
        candidates = [r for r in self.replicas if r.accepting and r.has_room]
        if request.session is not None and request.session not in self.sessions:
            request.session = None  # its session ended while it waited: no pin may outlive it
        if request.session is not None:
            return self._pick_for_session(request.session, candidates)
        if not candidates:
            return None
        replica, reason = self._ask_router(request, candidates)
        if request.failed_replicas:
            reason = f"retry after replica {request.failed_replicas[-1]} failed: {reason}"
        return self._take(replica, reason)

    def _ask_router(self, request: Request, candidates: list[Replica]) -> tuple[Replica, str]:
        """The router's choice, checked: a router may be the user's code."""
        router = type(self.router).__name__
        answer = self.router.choose(request, candidates)
        if not (isinstance(answer, tuple) and len(answer) == 2):
            raise TypeError(f"{router}.choose must return (replica, reason), it returned {answer!r}")
        replica, reason = answer
        if not any(replica is c for c in candidates):
            raise ValueError(
                f"{router}.choose returned {replica!r}, which is not one of its candidates "
                f"(replicas {[c.index for c in candidates]})"
            )
        return replica, str(reason)

    def _pick_for_session(self, session: str, candidates: list[Replica]):
        pin = self.sessions.pinned(session)
        if pin is not None:
            index, generation = pin
            replica = self.replicas[index] if index < len(self.replicas) else None
            if replica is not None and replica.accepting and replica.generation == generation:
                if not replica.has_room:
                    return None  # sticky: wait for this replica
                return self._take(replica, f"session {session} pinned → {index}")
        if not candidates:
            return None
        counts = self.sessions.counts()
        replica = min(candidates, key=lambda r: (r.in_flight, counts.get(r.index, 0), r.index))
        self.sessions.pin(session, (replica.index, replica.generation))
        if pin is None:
            self.events.publish(SessionStarted(session, replica.index))
            return self._take(replica, f"session {session} new, least loaded → {replica.index}")
        old = pin[0]
        why = (
            f"replica {old} restarted"
            if old < len(self.replicas) and self.replicas[old].accepting
            else f"replica {old} is {self.replicas[old].state} ({self.replicas[old].reason})"
            if old < len(self.replicas)
            else f"replica {old} is gone"
        )
        self.events.publish(
            SessionMoved(session, old, replica.index, f"{why}; session state on replica {replica.index} starts fresh")
        )
        return self._take(replica, f"session {session} moved {old} → {replica.index}")

    def _take(self, replica: Replica, reason: str) -> tuple[Replica, str]:
        replica.in_flight += 1
        if replica.state == HEALTHY and not replica.has_room:
            self._set_state(
                replica, OVERLOADED,
                f"{replica.in_flight} requests in flight (limit {self.config.max_concurrent_requests})",
            )
        return replica, reason

    def _drain(self) -> None:
        """Hand waiting requests, oldest first, to replicas that have room."""
        still_waiting: deque = deque()
        while self._waiters:
            request, waiter = entry = self._waiters.popleft()
            if waiter.done():
                continue
            try:
                picked = self._pick(request)
            except Exception as error:  # the router's: it fails this waiter only
                waiter.set_exception(error)
                continue
            if picked is None:
                still_waiting.append(entry)
            else:
                waiter.set_result(picked)
        self._waiters = still_waiting
        if self._waiters and not self._can_wait():
            self._fail_waiters(NoHealthyReplicaError(self._no_replica_message()))

    def _can_wait(self) -> bool:
        """Is there a replica that is, or soon will be, able to take requests?"""
        for r in self.replicas:
            if r.accepting or r.state == RECOVERING:
                return True
            if r.recovering and not r.breaker.is_open:
                return True  # failed a moment ago; its respawn is under way
        # An open circuit breaker closes after its cooldown: worth a bounded wait.
        return self.config.request_timeout is not None and any(r.recovering for r in self.replicas)

    def _no_replica_message(self) -> str:
        states = ", ".join(f"{r.index}: {r.state} ({r.reason})" for r in self.replicas)
        last = f"; last failure: {self.last_failure}" if self.last_failure else ""
        return f"no replica of {self.name} is healthy [{states}]{last}"

    def _fail_waiters(self, error: BaseException) -> None:
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    # ------------------------------------------------------------ states and failures

    def _publish_state(self, replica: Replica, old, new, reason: str) -> None:
        self.events.publish(
            ReplicaStateChanged(replica.index, None if old is None else str(old), str(new), reason, replica.host)
        )

    def _set_state(self, replica: Replica, new: ReplicaState, reason: str) -> None:
        old = replica.state
        if old == new and replica.reason == reason:
            return
        replica.state, replica.reason = new, reason
        self._publish_state(replica, old, new, reason)
        if replica.accepting and self._waiters:
            self._drain()
        elif self._waiters and not self._can_wait():
            self._fail_waiters(NoHealthyReplicaError(self._no_replica_message()))

    def replica_failed(self, replica: Replica, reason: str, generation: int | None = None) -> None:
        """An infrastructure failure: mark FAILED, then recover in the background."""
        if self._shut_down or (generation is not None and generation != replica.generation):
            return  # a stale report about processes already replaced
        if not replica.accepting:
            return  # already failed, recovering, or stopped
        self.last_failure = f"replica {replica.index}: {reason}"
        opened = replica.breaker.record_failure(self.config.failure_threshold, self.config.cooldown)
        replica.kill()  # a replica that stopped answering may still be alive
        self._router_errors.call(self.router.forget_replica, replica.index)
        # Before FAILED is published: waiting requests read it to decide
        # between waiting for the respawn and failing now.
        replica.recovering = self.config.auto_respawn
        self._set_state(replica, FAILED, reason)
        if opened:
            self._set_state(
                replica, FAILED,
                f"circuit open after {replica.breaker.consecutive_failures} consecutive failures "
                f"(last: {reason}); next try in {self.config.cooldown:g} s",
            )
        if self.config.auto_respawn:
            self._spawn_task(self._recover(replica))

    def _retired(self, replica: Replica) -> bool:
        """Shut down with the service, or removed by ``scale``: never respawn it."""
        return self._shut_down or replica.state == STOPPED

    async def _recover(self, replica: Replica) -> None:
        """Clean up a failed replica, wait out an open breaker, respawn it."""
        try:
            await replica.stop()  # FAILED stays visible while old processes go
            while not self._retired(replica):
                wait = replica.breaker.seconds_left()
                if wait > 0:
                    await asyncio.sleep(wait)
                    if self._retired(replica):
                        return
                    reason = "cooldown over: one respawn decides"
                else:
                    reason = f"respawning after: {replica.reason}"
                replica.breaker.close()
                if not self._place_for_respawn(replica):  # hosts.py
                    continue  # no host can take it: FAILED, and tried again after a cooldown
                reason = reason.replace("respawning", "respawning" + self._where(replica), 1)
                self._set_state(replica, RECOVERING, reason)
                try:
                    await replica.spawn()
                except HostLost as e:  # its new host was lost too: straight to another
                    await replica.stop()
                    self._set_state(replica, FAILED, f"host lost while respawning: {e}")
                    continue
                except Exception as e:
                    replica.breaker.consecutive_failures += 1
                    self.last_failure = f"replica {replica.index}: respawn failed: {e}"
                    await replica.stop()
                    if self._retired(replica):
                        return
                    replica.breaker.open_for(self.config.cooldown)
                    self._set_state(
                        replica, FAILED,
                        f"respawn failed ({type(e).__name__}: {e}); next try in {self.config.cooldown:g} s",
                    )
                    continue
                if self._retired(replica):
                    await replica.stop()
                    return
                self._set_state(replica, HEALTHY, f"respawned in {replica.last_spawn_s:.1f} s{self._where(replica)}")
                return
        finally:
            replica.recovering = False

    # ------------------------------------------------------------ health

    async def _health_loop(self) -> None:
        probe_timeout = max(5.0, 5 * self.config.health_poll_rate)
        while not self._shut_down:
            await asyncio.sleep(self.config.health_poll_rate)
            live = [(r, r.generation) for r in self.replicas if r.accepting]
            results = await asyncio.gather(*(r.probe(probe_timeout) for r, _ in live), return_exceptions=True)
            for (replica, generation), result in zip(live, results):
                if isinstance(result, ReplicaFailure):
                    self.replica_failed(replica, f"health probe: {result}", generation)

    # ------------------------------------------------------------ fanout

    async def fanout(self, endpoint: str, args: tuple, kwargs: dict) -> FanoutResult:
        self._check_open()
        targets = [r for r in self.replicas if r.accepting]
        if not targets:
            raise NoHealthyReplicaError(self._no_replica_message())
        outcomes = await asyncio.gather(
            *(self._call_replica(r, endpoint, args, kwargs) for r in targets), return_exceptions=True
        )
        failures = {r.index: o for r, o in zip(targets, outcomes) if isinstance(o, BaseException)}
        results = {r.index: o for r, o in zip(targets, outcomes) if not isinstance(o, BaseException)}
        if failures:
            raise FanoutError(endpoint, failures, results)
        return FanoutResult(list(results.values()), list(results))

    async def _call_replica(self, replica: Replica, endpoint: str, args: tuple, kwargs: dict) -> Any:
        """One call on one given replica (fanout): no router, no retry."""
        request = Request(endpoint, args, kwargs, None, id=next(self._request_ids))
        self._take(replica, "fanout")
        return await self._send(request, replica, "fanout", f"fanout → {replica.index}")

    # ------------------------------------------------------------ sessions

    def start_session(self, session_id: str | None = None) -> str:
        self._check_open()
        return self.sessions.start(session_id)

    def terminate_session(self, session_id: str) -> None:
        pin = self.sessions.end(session_id)
        self.events.publish(SessionEnded(session_id, None if pin is None else pin[0]))
