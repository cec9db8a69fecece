"""ServiceDashboard: watch a service while it works, in the notebook.

Display it in a cell and it keeps updating while later cells run: replica
cards (state, load, latency, sessions; weight version and KV-cache hits for
a service that generates; the host on a cluster, cards grouped by host when
the replicas run on several), buttons to kill, slow and scale replicas (and
to kill a whole host, on a cluster of several), a
replica × time strip of every request coloured by session, the last routing
decisions with the router's reason, and (for a service that generates)
prompt tokens served from the KV cache. Only what the service has is shown:
a reward or counter service gets no KV-cache panel.

It reads the service's event stream and nothing else (see
``service_view.py``). It redraws from the kernel's event loop, which also
runs every service's controller: the cards at most 4 times a second, the
strip (a matplotlib picture, the costly part) at most once a second and with
at most ``max_share`` of the loop's time, and neither when nothing changed.
A control whose action fails (kill on a service that was shut down) says so
under the controls.
"""

from __future__ import annotations

import asyncio
import html
import io
import time

import ipywidgets as w

from .service_view import FLASH_S, SHOW_FAILED_S, STATE_COLOURS, ServiceView, natural_key
from .throttle import Throttle

CSS = """
<style>
.fl-cards { display: flex; flex-wrap: wrap; gap: 8px; }
.fl-replica { border: 3px solid #999; border-radius: 6px; padding: 6px 10px; min-width: 170px;
              font-family: sans-serif; font-size: 12px; line-height: 1.4; }
.fl-replica .fl-state { font-weight: bold; font-size: 14px; }
.fl-replica-healthy { border-color: #2e7d32; }   .fl-replica-healthy .fl-state { color: #2e7d32; }
.fl-replica-overloaded { border-color: #ef6c00; } .fl-replica-overloaded .fl-state { color: #ef6c00; }
.fl-replica-failed { border-color: #c62828; }    .fl-replica-failed .fl-state { color: #c62828; }
.fl-replica-recovering { border-color: #1565c0; } .fl-replica-recovering .fl-state { color: #1565c0; }
.fl-replica-stopped { border-color: #616161; }   .fl-replica-stopped .fl-state { color: #616161; }
.fl-flash { box-shadow: 0 0 8px 2px #fdd835; }
.fl-reason { color: #444; font-style: italic; }
.fl-log { font-family: monospace; font-size: 11px; border-collapse: collapse; }
.fl-log td, .fl-log th { padding: 1px 8px; text-align: left; }
.fl-big { font-size: 28px; font-weight: bold; font-family: sans-serif; }
.fl-bar { display: inline-block; height: 12px; vertical-align: middle; }
.fl-error { color: #c62828; font-family: sans-serif; font-size: 12px; }
.fl-note { color: #555; font-family: sans-serif; font-size: 12px; }
.fl-host { border: 1px dashed #999; border-radius: 6px; padding: 4px 8px; margin-bottom: 6px; }
.fl-host-title { font-family: sans-serif; font-size: 12px; font-weight: bold; margin-bottom: 4px; }
.fl-host-lost { border-color: #c62828; } .fl-host-lost .fl-host-title { color: #c62828; }
.fl-where { color: #555; }
</style>
"""

STATE_MARK = {"HEALTHY": "●", "OVERLOADED": "▲", "FAILED": "✖", "RECOVERING": "↻", "STOPPED": "■"}
ROUTERS = ("round_robin", "least_loaded", "prefix")


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def collapse(rows: list) -> list[tuple]:
    """Consecutive rows that say the same thing, as one: (first row, last row, count).

    A one-replica service routes every request the same way; twelve equal rows
    would tell the learner nothing and push the strip off the screen."""
    runs: list[list] = []
    for row in rows:
        key = (row.endpoint, row.replica, row.session, row.reason)
        if runs and runs[-1][0] == key:
            runs[-1][2] = row
            runs[-1][3] += 1
        else:
            runs.append([key, row, row, 1])
    return [(first, last, count) for _, first, last, count in runs]


class ServiceDashboard(w.VBox):
    """A live dashboard of one service (the handle ``as_service`` returned).

    ``show_kv``: None shows the KV-cache counters once the service returns
    completions that report them (a policy); False never shows them (a
    notebook that has not taught the KV cache yet).
    """

    def __init__(self, service, rows: int = 6, redraw_interval: float = 0.25,
                 show_kv: bool | None = None, max_share: float = 0.02):
        self.service = service
        controller = service.service
        self.view = ServiceView(capacity=controller.config.max_concurrent_requests)
        self.rows_shown = rows
        self.show_kv = show_kv
        self._header = w.HTML()
        self._cards = w.HTML()
        self._log_title = w.HTML("<b>Routing decisions</b> (newest first)")
        self._log = w.HTML()
        self._kv_title = w.HTML("<b>KV cache: prompt tokens from the cache (green) and computed (grey)</b>")
        self._kv = w.HTML()
        self._strip = w.Image(format="png", layout=w.Layout(max_width="720px"))
        self._control_error = w.HTML()  # what the last control action raised, if anything
        self._controls = self._make_controls(controller)
        super().__init__(
            [w.HTML(CSS), self._header, self._cards, self._controls, self._control_error,
             self._strip, self._log_title, self._log]
        )
        self._throttle = Throttle(self._redraw, redraw_interval)
        self._strip_throttle = Throttle(self._redraw_strip, 1.0, max_share)
        self._strip_drawn = None  # the view's version when the strip was last drawn
        self._unsubscribe = service.events.subscribe(self._on_event, replay=True)
        self._redraw()
        self._redraw_strip()

    # ------------------------------------------------------------ events

    def _on_event(self, event) -> None:
        self.view.observe(event)
        if self.view.stopped:
            self.detach()
            return
        self._throttle()
        self._strip_throttle()

    def detach(self) -> None:
        """Stop listening (done automatically when the service shuts down)."""
        self._unsubscribe()
        self._throttle.cancel()
        self._strip_throttle.cancel()
        for child in self._controls.children:
            child.disabled = True
        self._redraw()
        self._redraw_strip()

    @property
    def redraws(self) -> int:
        return self._throttle.runs

    @property
    def kv_shown(self) -> bool:
        """Whether the KV-cache counters are on screen (see ``show_kv``)."""
        if self.show_kv is None:
            return self.view.kv_total.prompt_tokens > 0
        return self.show_kv

    # ------------------------------------------------------------ rendering

    def _redraw(self) -> None:
        self.view.refresh_from(self.service.metrics())
        now = time.time()
        view = self.view
        self._header.value = self._header_html()
        self._cards.value = self._cards_html(now)
        self._log.value = self._log_html()
        if self.kv_shown:
            self._kv.value = self._kv_html()
            if self._kv not in self.children:  # the panel appears with the first completion
                self.children = (*self.children, self._kv_title, self._kv)
        self._follow_router()
        changing = [c for c in view.cards.values() if c.flashing(now) or c.failure_lingering(now)]
        if changing and not view.stopped:  # redraw when FAILED stops lingering, and after the flash
            try:
                loop = asyncio.get_running_loop()
                loop.call_later(SHOW_FAILED_S + 0.05, self._throttle)
                loop.call_later(FLASH_S + 0.1, self._throttle)
            except RuntimeError:
                pass

    def _header_html(self) -> str:
        view = self.view
        title = html.escape(self.service.service.actor_cls.__name__)
        if view.stopped:
            status = "shut down"
        else:
            router = self.service.service.router.name
            status = f"router: {html.escape(router)}"
            last = next((r.router for r in reversed(view.rows) if r.router and r.router != "fanout"), None)
            if last is not None and last != router:
                # Switched since the last request: the rows below are the old router's.
                status += f"; the rows below were routed by {html.escape(last)}"
        hit = view.kv_total.hit_rate
        big = (
            f"<span class='fl-big'>{hit:.0%}</span> of prompt tokens from the KV cache"
            if hit is not None and self.kv_shown else ""
        )
        return f"<b>{title} service</b> ({status}) &nbsp; {big}"

    def _cards_html(self, now: float) -> str:
        """The cards in a row; on several hosts, a row per host under its name."""
        groups = self.view.groups()
        if len(groups) == 1 and groups[0][0] is None:  # one host: no grouping to show
            return "<div class='fl-cards'>" + "".join(self._card_html(c, now) for c in groups[0][1]) + "</div>"
        parts = []
        for host, cards in groups:
            info = self.view.hosts.get(host)
            lost = " fl-host-lost" if info is not None and info.state != "UP" else ""
            parts.append(
                f"<div class='fl-host{lost}' data-host='{html.escape(host)}'>"
                f"<div class='fl-host-title'>{html.escape(self.view.host_label(host))}</div>"
                "<div class='fl-cards'>" + "".join(self._card_html(c, now) for c in cards) + "</div></div>"
            )
        return "".join(parts)

    def _card_html(self, c, now: float) -> str:
        flash = " fl-flash" if c.flashing(now) else ""
        state = c.shown_state(now)
        reason = c.reason if state == c.state else f"{c.reason} (now {c.state})"
        lines = [
            f"<div class='fl-state'>{STATE_MARK.get(state, '')} replica {c.index}: {state}</div>",
            f"<div class='fl-reason'>{html.escape(reason)}</div>",
        ]
        if c.host is not None and c.host != "local":  # on a cluster, where it runs matters
            lines.append(f"<span class='fl-where'>on {html.escape(c.host)}</span>")
        lines += [
            f"in flight {c.in_flight} / {c.capacity} · served {c.served}",
            f"p50 {_fmt(c.p50_ms, '.1f')} ms · sessions {c.sessions}",
        ]
        # A service that generates: every card has a weights line, a replica
        # that has not answered yet (just added by scale +1) too.
        if any(card.weight_version is not None for card in self.view.cards.values()):
            if c.weight_version is None:
                lines.append("weights: shown after its first completion")
            else:
                kv = f" · KV hits {_fmt(c.kv_hit_rate, '.0%')}" if self.kv_shown else ""
                lines.append(f"weights v{c.weight_version}{kv}")
        return (
            f"<div class='fl-replica {c.css_class(now)}{flash}' data-replica='{c.index}' "
            f"data-state='{state}' data-host='{html.escape(c.host or '')}'>" + "<br>".join(lines) + "</div>"
        )

    def _kv_html(self) -> str:
        view = self.view
        if not view.kv_total.prompt_tokens:
            return "<i>no completions yet</i>"
        # The last 8 sessions to have a completion, in the order they were opened.
        sessions = sorted(list(view.kv_by_session)[-8:], key=natural_key)
        groups = [(f"replica {i}", k) for i, k in sorted(view.kv_by_replica.items())]
        groups += [(f"session {s}", view.kv_by_session[s]) for s in sessions]
        scale = max(k.prompt_tokens for _, k in groups)
        rows = []
        for label, k in groups:
            cached_w = 300 * k.cached_tokens / scale
            computed_w = 300 * k.computed_tokens / scale
            rows.append(
                f"<tr><td>{html.escape(label)}</td><td>"
                f"<span class='fl-bar' style='width:{cached_w:.0f}px;background:#2e7d32'></span>"
                f"<span class='fl-bar' style='width:{computed_w:.0f}px;background:#bdbdbd'></span>"
                f"</td><td>{k.cached_tokens} cached / {k.prompt_tokens} prompt tokens</td></tr>"
            )
        return "<table class='fl-log'>" + "".join(rows) + "</table>"

    def _log_html(self) -> str:
        runs = collapse(list(self.view.rows))[-self.rows_shown:]
        if not runs:
            return "<i>no requests yet</i>"
        start = self.view.started_at or 0.0
        body = []
        for first, last, count in reversed(runs):
            when = f"+{first.time - start:.2f}s"
            if count > 1:
                when += f" to +{last.time - start:.2f}s"
            times = f" (×{count})" if count > 1 else ""
            body.append(
                f"<tr><td>{when}</td><td>{html.escape(first.endpoint)}{times}</td>"
                f"<td>{first.replica}</td><td>{html.escape(first.session or '')}</td>"
                f"<td>{html.escape(first.reason)}</td></tr>"
            )
        return ("<table class='fl-log'><tr><th>time</th><th>endpoint</th><th>replica</th>"
                "<th>session</th><th>why</th></tr>" + "".join(body) + "</table>")

    def _redraw_strip(self) -> None:
        if self._strip_drawn == self.view.version:  # nothing new to draw
            return
        self._strip_drawn = self.view.version
        fig = self.strip_figure()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=72)
        self._strip.value = buffer.getvalue()

    def strip_figure(self):
        """Replica × time: each routed request a tick coloured by its session."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 2.2))
        ax = fig.subplots()
        self._draw_strip(ax)
        # Fixed margins: tight_layout would draw the figure twice.
        fig.subplots_adjust(left=0.08, right=0.98, top=0.86, bottom=0.24)
        return fig

    def _draw_strip(self, ax) -> None:
        view = self.view
        start = view.started_at or 0.0
        sessions = sorted({s for _, _, s in view.points if s}, key=natural_key)
        palette = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
        colour = {s: palette[i % len(palette)] for i, s in enumerate(sessions)}
        if view.points:
            xs = [t - start for t, _, _ in view.points]
            ys = [r for _, r, _ in view.points]
            cs = [colour.get(s, "#9e9e9e") for _, _, s in view.points]
            ax.scatter(xs, ys, c=cs, s=10, marker="|")
        for t, r in view.failures:
            ax.scatter([t - start], [r], c="#c62828", marker="x", s=60)
        n = max(list(view.cards) + [0]) + 1
        ax.set_yticks(range(n))
        ax.set_ylim(-0.5, n - 0.5)
        ax.set_ylabel("replica")
        every = "every request" if view.stride == 1 else f"one request in {view.stride}, over the whole run"
        ax.set_title(f"Requests over time ({every}; grey: no session, colour: a session, ✖: a failure)",
                     fontsize=9, loc="left")
        ax.set_xlabel("seconds since the first event")

    def _follow_router(self) -> None:
        """The router dropdown shows the service's router, also after set_router() in code."""
        name = self.service.service.router.name
        dropdown = self._buttons["router"]
        if name in ROUTERS and dropdown.value != name:
            dropdown.value = name  # its observer sees the same name and does nothing

    # ------------------------------------------------------------ controls

    def _make_controls(self, controller) -> w.HBox:
        self._replica_pick = w.Dropdown(
            options=[(f"replica {r.index}", r.index) for r in controller.replicas],
            description="", layout=w.Layout(width="110px"),
        )
        kill = w.Button(description="kill", button_style="danger", tooltip="SIGKILL its processes")
        slow = w.ToggleButton(description="slow (+0.5 s)", tooltip="hold its requests 0.5 s longer")
        up = w.Button(description="scale +1")
        down = w.Button(description="scale −1")
        router = w.Dropdown(options=list(ROUTERS),
                            value=controller.router.name if controller.router.name in ROUTERS else "round_robin",
                            description="router", layout=w.Layout(width="220px"))
        kill.on_click(lambda _: self._run("kill", lambda: self.service.kill_replica(self._replica_pick.value)))
        slow.observe(lambda ch: self._run("slow", lambda: self.service.slow_replica(
            self._replica_pick.value, 0.5 if ch["new"] else 0.0)), "value")
        up.on_click(lambda _: self._run("scale +1", lambda: self._scale(+1)))
        down.on_click(lambda _: self._run("scale −1", lambda: self._scale(-1)))
        router.observe(lambda ch: self._run("router", lambda: self._set_router(ch["new"])), "value")
        self._buttons = {"kill": kill, "slow": slow, "up": up, "down": down, "router": router}
        controls = [self._replica_pick, kill, slow, up, down, router]
        # A whole host to kill only where there is another host than this one:
        # on this machine alone it would take the notebook down with it.
        others = [(h.name, h.index) for h in controller.cluster.hosts if not h.is_this_host]
        if len(controller.cluster.hosts) > 1 and others:
            self._host_pick = w.Dropdown(options=others, description="", layout=w.Layout(width="90px"))
            kill_host = w.Button(description="kill host", button_style="danger",
                                 tooltip="SIGKILL the host's worker and every process on it")
            kill_host.on_click(lambda _: self._run(
                "kill host", lambda: self.service.kill_host(self._host_pick.value)))
            self._buttons["kill host"] = kill_host
            controls += [self._host_pick, kill_host]
        return w.HBox(controls)

    def _set_router(self, name: str) -> None:
        if name != self.service.service.router.name:  # not when the dropdown only follows the service
            self.service.set_router(name)
            self._throttle()

    async def _scale(self, delta: int) -> None:
        target = max(1, len(self.service.replicas) + delta)
        await self.service.scale(target)
        self._replica_pick.options = [(f"replica {r.index}", r.index) for r in self.service.replicas]

    def _run(self, what: str, action) -> None:
        """Run a control's ``action`` (sync, or async: then as a task).

        An error is shown under the controls. Raised from a button handler it
        would go to the kernel's log, where nobody looks, and a failed task
        would only be noticed when garbage collected.
        """
        self._control_error.value = ""
        try:
            outcome = action()
            if asyncio.iscoroutine(outcome):
                task = asyncio.ensure_future(outcome)
                task.add_done_callback(lambda t: self._action_done(what, t))
        except Exception as error:
            self._show_error(what, error)

    def _action_done(self, what: str, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._show_error(what, task.exception())

    def _show_error(self, what: str, error: BaseException) -> None:
        self._control_error.value = (
            f"<span class='fl-error'>{html.escape(what)} failed: "
            f"{html.escape(type(error).__name__)}: {html.escape(str(error))}</span>"
        )

    # ------------------------------------------------------------ static output

    def snapshot(self):
        """A matplotlib figure of the current state, for static output (nbconvert):
        the replicas, the strip, and the KV-cache counters if shown."""
        from matplotlib.figure import Figure

        view = self.view
        kv = self.kv_shown and bool(view.kv_by_replica)
        fig = Figure(figsize=(9, 5 if kv else 3.4))
        ratios = [1, 1.4, 1.2] if kv else [1, 1.4]
        axes = fig.subplots(len(ratios), 1, gridspec_kw={"height_ratios": ratios})
        top, middle = axes[0], axes[1]
        cards = [c for _, c in sorted(view.cards.items())]
        top.barh([f"r{c.index}" for c in cards], [1] * len(cards),
                 color=[STATE_COLOURS.get(c.state, "#999") for c in cards])
        for i, c in enumerate(cards):
            where = f" on {c.host}" if c.host not in (None, "local") else ""
            top.text(0.02, i, f"{c.state}{where}  served {c.served}  in flight {c.in_flight}", va="center",
                     color="white")
        top.set_xticks([])
        top.set_xlim(0, 1)
        top.set_title(f"{self.service.service.actor_cls.__name__} replicas")
        self._draw_strip(middle)
        if kv:
            bottom = axes[2]
            replicas = sorted(view.kv_by_replica)
            cached = [view.kv_by_replica[i].cached_tokens for i in replicas]
            computed = [view.kv_by_replica[i].computed_tokens for i in replicas]
            bottom.bar([f"r{i}" for i in replicas], cached, color="#2e7d32", label="from KV cache")
            bottom.bar([f"r{i}" for i in replicas], computed, bottom=cached, color="#bdbdbd", label="computed")
            bottom.set_ylabel("prompt tokens")
            bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
        fig.tight_layout()  # once, for a static picture: the cost does not matter here
        return fig

    def __repr__(self) -> str:
        # Stable text for notebooks run without a live front end (nbval, nbconvert).
        return f"ServiceDashboard({self.service.service.actor_cls.__name__} service)"
