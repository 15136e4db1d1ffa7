"""The fleet planner: which managed models are loaded on which device, and when to swap. No I/O, no clock.

Each method applies one event at time `now` (the queue changed, a server became healthy, stopped or crashed; an
operator asked for a preload or an eviction) and returns the effects to carry out: `Launch(model)` or
`Halt(model)`. The fleet (`fleet/manager.py`) carries them out and reports back; every state change is also kept
as a `Transition` for the fleet to publish.

Rules:
1. A device never holds more than its memory, nor more than one model when it is exclusive. A model counts against
   its device from the moment it is launched until its server has stopped (draining and stopping included).
2. A model with waiting requests loads when it fits. When it does not, idle models on its device are evicted least
   recently used first. A busy model (requests waiting or in flight, or finished less than `idle_grace_s` ago, so a
   client sending requests one after another keeps its model) is drained (no new requests; those in flight finish)
   and stopped only when one of these holds:
   - the newcomer's best waiting request is of a higher class than any waiting or in flight for the busy model, or
   - the newcomer has waited `swap_after_s`, counted from its oldest request's arrival or from the busy model's
     load, whichever is later (so every model keeps its device at least that long while others wait: no thrash),
   - or an operator asked for the newcomer (a manual preload).
3. One swap per device at a time; the device is reserved for that swap's target until it has loaded.
4. Requests for a loading model join its load. When the last one leaves, the load finishes or is aborted
   (`abort_abandoned`).
5. A model idle for `ttl_s` (counted from the end of its last request) is stopped; 0 means never.
6. A server that exits unexpectedly is restarted after a backoff that doubles, whether or not requests wait for it
   (a loaded model comes back loaded), at most `restart_attempts` times in a row; then the model is failed for
   `failure_hold_s` (its requests are refused) and not retried until a request or an operator asks for it. A
   server that served for `STABLE_S` before it crashed starts a new count.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from queuegate.scheduler import Demand
from queuegate.statistics import DeviceStatistics, FleetModelStatistics, FleetStatistics, SwapProgress

NO_DEMAND = Demand()
STABLE_S = 60.0  # a server that stayed ready this long before it crashed is not in a crash loop
_SMOOTHING = 0.3  # weight of the newest sample in the moving averages of load and stop times


class ModelState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    FAILED = "failed"


# States in which a model's server may be running, so it counts against its device.
_ON_DEVICE = frozenset({ModelState.STARTING, ModelState.READY, ModelState.DRAINING, ModelState.STOPPING})


@dataclass(frozen=True, slots=True)
class Launch:
    model: str


@dataclass(frozen=True, slots=True)
class Halt:
    model: str


Effect = Launch | Halt


@dataclass(frozen=True, slots=True)
class Transition:
    at: float
    model: str
    state: ModelState
    reason: str
    load_s: float | None = None  # on turning ready: how long this load took (launch -> healthy)
    crashed: bool = False  # the server exited (or failed to start) unasked


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    name: str
    memory_gb: float
    exclusive: bool = False


@dataclass(frozen=True, slots=True)
class PlannedModel:
    """What the planner knows of a model. `managed=False`: always on (external), never launched or evicted."""

    name: str
    device: str | None = None
    memory_gb: float = 0.0
    ttl_s: float = 0.0
    preload: bool = False
    managed: bool = True


@dataclass(frozen=True, slots=True)
class PlannerPolicy:
    swap_after_s: float = 10.0
    idle_grace_s: float = 0.5
    restart_attempts: int = 2
    restart_backoff_s: float = 2.0
    failure_hold_s: float = 30.0
    abort_abandoned: bool = False
    # Demand of this class rank or lower (the batch class) is background work: it takes a device only once what is
    # on it has been idle swap_after_s, so it uses idle capacity and never swaps a model out between a user's chats.
    background_rank: int | None = None


class Want(enum.Enum):
    """Why a model should load with no request waiting for it."""

    STARTUP = "startup"  # `preload = true` (or adopted at start-up): load into free room, evicting nothing
    RESTART = "restart"  # it crashed: bring it back into free room, evicting nothing
    OPERATOR = "operator"  # a manual preload: load now, draining whatever is in the way


@dataclass(slots=True, eq=False)
class _Model:
    spec: PlannedModel
    state: ModelState = ModelState.STOPPED
    reason: str = "not loaded yet"
    since: float = 0.0  # when it entered its state
    ready_at: float = 0.0  # when it last became ready: the start of its residency
    idle_since: float | None = None  # nothing waiting or in flight since then
    foreground_at: float | None = None  # when work above the background class last waited for it or ran on it
    since_launch: float = 0.0  # when it was last launched
    launched: bool = False  # its server process or container is up (waiting for health)
    want: Want | None = None
    evict: bool = False  # an operator asked to evict it
    failures: int = 0  # unexpected exits in a row
    crashes: int = 0  # unexpected exits since start-up
    retry_at: float = 0.0  # no launch before this (restart backoff, failure hold)
    load_s: float | None = None  # moving average: launch -> healthy
    stop_s: float | None = None  # moving average: halt -> stopped


@dataclass(slots=True)
class _Swap:
    target: str
    victims: list[str]
    started_at: float


class FleetPlanner:
    def __init__(
        self,
        devices: Iterable[DeviceSpec],
        models: Iterable[PlannedModel],
        policy: PlannerPolicy | None = None,
        *,
        now: float = 0.0,
    ) -> None:
        self.policy = policy or PlannerPolicy()
        self._devices = {d.name: d for d in devices}
        self._models: dict[str, _Model] = {}
        for spec in models:
            model = _Model(spec, since=now, idle_since=now)
            if not spec.managed:
                model.state, model.reason = ModelState.READY, "external"
            elif spec.preload:
                model.want = Want.STARTUP
            self._models[spec.name] = model
        self._swaps: dict[str, _Swap] = {}  # device -> its swap in progress
        self._demand: Mapping[str, Demand] = {}
        self._now = now  # of the last plan
        self._wake_at: float | None = None  # earliest swap bound that may pass, from the last plan
        self._transitions: list[Transition] = []
        self.loads = 0
        self.swaps = 0

    # -- events -------------------------------------------------------------------------------------------------

    def plan(self, now: float, demand: Mapping[str, Demand]) -> list[Effect]:
        """Decide what to launch and halt given the queue now. Call after every change and at `next_wakeup`."""
        self._demand = demand
        self._now = now
        self._wake_at = None
        effects: list[Effect] = []
        for model in self._managed():
            self._step(model, now, effects)
        for device, swap in list(self._swaps.items()):
            target = self._models[swap.target]
            if target.state in (ModelState.READY, ModelState.FAILED) or not self._wanted(target):
                del self._swaps[device]
                for name in swap.victims:  # a drain not needed any more: back to serving
                    victim = self._models[name]
                    if victim.state is ModelState.DRAINING and not victim.evict:
                        self._set(victim, ModelState.READY, "swap cancelled", now)
        for model in sorted(
            (m for m in self._managed() if m.state is ModelState.STOPPED and self._wanted(m) and now >= m.retry_at),
            key=self._urgency,
        ):
            self._place(model, now, effects)
            if model.want is Want.RESTART and model.state is ModelState.STOPPED:
                model.want = None  # its room was taken meanwhile: a request brings it back, not the crash
                self._set(model, ModelState.STOPPED, "not restarted: its device is in use by other models", now)
        return effects

    def launched(self, name: str, now: float) -> None:
        """The model's server process or container is up; its health check does not pass yet."""
        model = self._models[name]
        if model.state is ModelState.STARTING:
            model.launched = True
            self._set(model, ModelState.STARTING, "waiting for health", now)

    def ready(self, name: str, now: float) -> None:
        """The model's health check passed: it may serve."""
        model = self._models[name]
        if model.state is not ModelState.STARTING:
            return
        took = now - model.since_launch
        model.load_s = _average(model.load_s, took)
        model.ready_at = now
        model.want = None
        self.loads += 1
        self._set(model, ModelState.READY, "healthy", now, load_s=took)

    def stopped(self, name: str, now: float) -> None:
        """The model's server stopped after a `Halt`."""
        model = self._models[name]
        if model.state is ModelState.STOPPING:
            model.stop_s = _average(model.stop_s, now - model.since)
        model.launched = False
        model.failures = 0  # stopped as asked: whatever crashed before is behind it
        self._set(model, ModelState.STOPPED, "stopped", now)

    def exited(self, name: str, now: float, reason: str) -> None:
        """The model's server exited or failed to start, unasked. Restart with backoff, or fail it."""
        model = self._models[name]
        if model.state is ModelState.STOPPING:
            self.stopped(name, now)
            return
        if model.state in (ModelState.READY, ModelState.DRAINING) and now - model.ready_at >= STABLE_S:
            model.failures = 0  # it served for a good while: a new problem, not a crash loop
        model.launched = False
        model.failures += 1
        model.crashes += 1
        attempts = self.policy.restart_attempts
        if model.failures <= attempts:
            delay = self.policy.restart_backoff_s * 2 ** (model.failures - 1)
            model.retry_at = now + delay
            if model.want is None:
                model.want = Want.RESTART
            why = f"crashed, restart {model.failures} of {attempts} in {delay:g} s: {reason}"
            self._set(model, ModelState.STOPPED, why, now, crashed=True)
        else:
            model.retry_at = now + self.policy.failure_hold_s
            model.failures = 0
            model.want = None
            why = (
                f"crashed {attempts + 1} times in a row, not restarted for {self.policy.failure_hold_s:g} s "
                f"(a request or a preload tries again after that): {reason}"
            )
            self._set(model, ModelState.FAILED, why, now, crashed=True)

    def adopt(self, name: str, now: float) -> bool:
        """At start-up: the model's server is already running (left by an earlier QueueGate that was killed).
        Take it over as a load in progress (it turns ready when its health passes) if it fits on its device beside
        what was adopted before; False: it does not fit, and the caller stops it."""
        model = self._managed_model(name)
        if model.state is not ModelState.STOPPED:
            return False
        if model.spec.device is not None and not self._fits(model.spec.device, model, leaving=()):
            return False
        model.since_launch = now
        model.launched = True
        model.want = Want.STARTUP  # keep it (as if preloaded) until it is healthy; its TTL applies from then
        self._set(model, ModelState.STARTING, "adopting the server an earlier QueueGate left running", now)
        return True

    def preload(self, name: str, now: float) -> None:
        """An operator wants the model loaded now (draining what is in its way). Also clears a failure."""
        model = self._managed_model(name)
        model.evict = False
        if model.state is ModelState.FAILED:
            model.retry_at = now
            self._set(model, ModelState.STOPPED, "preload requested", now)
        if model.state is ModelState.DRAINING:
            self._set(model, ModelState.READY, "preload requested", now)
        elif model.state is not ModelState.READY:
            model.want = Want.OPERATOR

    def evict(self, name: str, now: float) -> None:
        """An operator wants the model unloaded: drained first when busy. Requests still waiting load it again."""
        model = self._managed_model(name)
        model.want = None
        if model.state in (ModelState.STARTING, ModelState.READY):
            model.evict = True

    def next_wakeup(self) -> float | None:
        """When `plan` may decide something with no other event: a TTL, a backoff, a swap bound running out."""
        times = [] if self._wake_at is None else [self._wake_at]
        for model in self._managed():
            if model.state is ModelState.FAILED or (model.state is ModelState.STOPPED and self._wanted(model)):
                times.append(model.retry_at)
            elif model.state is ModelState.READY and model.spec.ttl_s > 0 and model.idle_since is not None:
                times.append(model.idle_since + model.spec.ttl_s)
        return min((t for t in times if t > self._now), default=None)

    def take_transitions(self) -> list[Transition]:
        """The state changes since the last call, oldest first."""
        transitions, self._transitions = self._transitions, []
        return transitions

    # -- decisions ----------------------------------------------------------------------------------------------

    def _step(self, model: _Model, now: float, effects: list[Effect]) -> None:
        """Per-model rules that need no other model: idle time, failure hold, abandoned loads, drains, TTL."""
        demand = self._demand.get(model.spec.name, NO_DEMAND)
        if demand.waiting or demand.in_flight:
            model.idle_since = None
        elif model.idle_since is None:
            model.idle_since = now
        background = self.policy.background_rank
        ranks = [r for r in (demand.top_rank, demand.serving_rank) if r is not None]
        if background is not None and ranks and min(ranks) < background:
            model.foreground_at = now  # (someone other than background work is using it now)
        state = model.state
        if state is ModelState.FAILED and now >= model.retry_at:
            self._set(model, ModelState.STOPPED, "failure hold over", now)
        elif state is ModelState.STARTING and (model.evict or self._abandoned(model)):
            why = "evicted by operator" if model.evict else "nobody waits for it any more"
            self._halt(model, why, now, effects)
        elif state is ModelState.READY and model.evict:
            self._set(model, ModelState.DRAINING, "evicted by operator", now)
            state = model.state
        elif (
            state is ModelState.READY
            and model.spec.ttl_s > 0
            and model.idle_since is not None
            and now - model.idle_since >= model.spec.ttl_s
        ):
            self._halt(model, f"idle for {model.spec.ttl_s:g} s", now, effects)
        if model.state is ModelState.DRAINING and not demand.in_flight:
            self._halt(model, model.reason, now, effects)

    def _place(self, model: _Model, now: float, effects: list[Effect]) -> None:
        """Launch a wanted, stopped model if it fits; else start the swap that would make room, when allowed."""
        device_name = model.spec.device
        swap = self._swaps.get(device_name) if device_name is not None else None
        if swap is not None and swap.target != model.spec.name:
            return  # the device is reserved for another model's swap
        if device_name is None or self._fits(device_name, model, leaving=()):
            self._launch(model, now, effects)
            return
        if swap is not None:
            return  # the models in the way are still on their way out
        victims = self._victims(device_name, model, now)
        if victims is None:
            return
        self._swaps[device_name] = _Swap(model.spec.name, [v.spec.name for v in victims], now)
        for victim in victims:
            self.swaps += 1
            why = f"making room for {model.spec.name}"
            if self._demand.get(victim.spec.name, NO_DEMAND).in_flight:
                self._set(victim, ModelState.DRAINING, why, now)
            else:
                self._halt(victim, why, now, effects)

    def _victims(self, device_name: str, newcomer: _Model, now: float) -> list[_Model] | None:
        """The models to stop so `newcomer` fits, if rule 2 allows it now; else None."""
        residents = [m for m in self._on_device(device_name) if m is not newcomer]
        leaving = [m for m in residents if m.state in (ModelState.DRAINING, ModelState.STOPPING)]
        evictable = [m for m in residents if m.state is ModelState.READY and m.spec.managed]

        # Idle ones first, least recently used first; then the busy ones with the least pressing work.
        evictable.sort(key=lambda m: (self._busy(m, now), m.idle_since or now, self._pressure(m)))
        chosen: list[_Model] = []
        for candidate in evictable:
            if self._fits(device_name, newcomer, leaving=[*leaving, *chosen]):
                break
            chosen.append(candidate)
        if not self._fits(device_name, newcomer, leaving=[*leaving, *chosen]):
            return None  # something in the way cannot go (loading, external): wait for it
        free_room_only = newcomer.want in (Want.STARTUP, Want.RESTART)
        if free_room_only and not self._demand.get(newcomer.spec.name, NO_DEMAND).waiting:
            return None if chosen else []
        for victim in chosen:
            allowed_at = self._swap_allowed_at(victim, newcomer, now)
            if allowed_at > now:
                self._wake_at = allowed_at if self._wake_at is None else min(self._wake_at, allowed_at)
                return None
        return chosen

    def _swap_allowed_at(self, resident: _Model, newcomer: _Model, now: float) -> float:
        """When rule 2 lets `newcomer` displace `resident` (a time not after `now`: at once)."""
        if newcomer.want is Want.OPERATOR:
            return now
        wanted = self._demand.get(newcomer.spec.name, NO_DEMAND)
        background = self.policy.background_rank
        if background is not None and wanted.top_rank is not None and wanted.top_rank >= background:
            return self._background_allowed_at(resident, now)
        if not self._busy(resident, now):
            return now
        held = self._demand.get(resident.spec.name, NO_DEMAND)
        wants = self._demand.get(newcomer.spec.name, NO_DEMAND)
        held_ranks = [r for r in (held.top_rank, held.serving_rank) if r is not None]
        if wants.top_rank is not None and held_ranks and wants.top_rank < min(held_ranks):
            return now
        arrived = wants.oldest_at if wants.oldest_at is not None else resident.ready_at
        allowed_at = max(arrived, resident.ready_at) + self.policy.swap_after_s
        if not held.waiting and not held.in_flight and resident.idle_since is not None:
            allowed_at = min(allowed_at, resident.idle_since + self.policy.idle_grace_s)  # its grace runs out
        return allowed_at

    def _background_allowed_at(self, resident: _Model, now: float) -> float:
        """When background work (the batch class) may displace `resident`: swap_after_s after anyone but background
        work last used it (so a user's next chat finds it loaded), else as soon as its idle grace is over."""
        held = self._demand.get(resident.spec.name, NO_DEMAND)
        if resident.foreground_at is not None:
            if held.waiting or held.in_flight:
                return now + self.policy.swap_after_s  # (busy: looked at again then, or when its work ends)
            return max(now, resident.foreground_at + self.policy.swap_after_s)
        if held.waiting or held.in_flight or resident.idle_since is None:
            return now + self.policy.idle_grace_s
        return max(now, resident.idle_since + self.policy.idle_grace_s)

    def _busy(self, model: _Model, now: float) -> bool:
        demand = self._demand.get(model.spec.name, NO_DEMAND)
        if demand.waiting or demand.in_flight:
            return True
        return model.idle_since is not None and now - model.idle_since < self.policy.idle_grace_s

    def _fits(self, device_name: str, model: _Model, *, leaving: Iterable[_Model]) -> bool:
        device = self._devices[device_name]
        gone = set(map(id, leaving))
        staying = [m for m in self._on_device(device_name) if id(m) not in gone and m is not model]
        if device.exclusive:
            return not staying
        return sum(m.spec.memory_gb for m in staying) + model.spec.memory_gb <= device.memory_gb + 1e-9

    def _launch(self, model: _Model, now: float, effects: list[Effect]) -> None:
        model.since_launch = now
        self._set(model, ModelState.STARTING, "launching", now)
        effects.append(Launch(model.spec.name))

    def _halt(self, model: _Model, reason: str, now: float, effects: list[Effect]) -> None:
        self._set(model, ModelState.STOPPING, reason, now)
        model.evict = False
        effects.append(Halt(model.spec.name))

    def _set(
        self,
        model: _Model,
        state: ModelState,
        reason: str,
        now: float,
        load_s: float | None = None,
        *,
        crashed: bool = False,
    ) -> None:
        if state is not model.state:
            model.since = now
        model.state, model.reason = state, reason
        self._transitions.append(Transition(now, model.spec.name, state, reason, load_s, crashed))

    # -- helpers ------------------------------------------------------------------------------------------------

    def _managed(self) -> Iterable[_Model]:
        return (m for m in self._models.values() if m.spec.managed)

    def _managed_model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            raise KeyError(f"no model {name!r}")
        if not model.spec.managed:
            raise ValueError(f"model {name!r} is external: QueueGate does not start or stop it")
        return model

    def _on_device(self, device_name: str) -> list[_Model]:
        return [m for m in self._models.values() if m.spec.device == device_name and m.state in _ON_DEVICE]

    def _wanted(self, model: _Model) -> bool:
        return model.want is not None or self._demand.get(model.spec.name, NO_DEMAND).waiting > 0

    def _abandoned(self, model: _Model) -> bool:
        demand = self._demand.get(model.spec.name, NO_DEMAND)
        return self.policy.abort_abandoned and model.want is None and not demand.waiting and not demand.in_flight

    def _urgency(self, model: _Model) -> tuple[int, int, float]:
        """Sort key: operator preloads first, then by best waiting class, then by the oldest waiting request."""
        demand = self._demand.get(model.spec.name, NO_DEMAND)
        rank = demand.top_rank if demand.top_rank is not None else 1 << 20
        return (model.want is not Want.OPERATOR, rank, demand.oldest_at or 0.0)

    def _pressure(self, model: _Model) -> tuple[int, int]:
        """How much a resident would lose by going: its best waiting class (lower = more), then its queue."""
        demand = self._demand.get(model.spec.name, NO_DEMAND)
        rank = demand.top_rank if demand.top_rank is not None else 1 << 20
        return (-rank, demand.waiting)

    # -- observation --------------------------------------------------------------------------------------------

    def state(self, name: str) -> tuple[ModelState, str]:
        model = self._models[name]
        return model.state, model.reason

    def load_outlook(self, name: str, now: float) -> SwapProgress | None:
        """What stands between a model and its requests now (None: it serves, or it is not launched here): the
        swap or load under way for it (phase, learned time left), else why it waits (its device busy, failed)."""
        model = self._models.get(name)
        if model is None or not model.spec.managed or model.state is ModelState.READY:
            return None
        swap = self._swaps.get(model.spec.device or "")
        if swap is not None and swap.target == name:
            return self._swap_progress(swap, now)
        if model.state is ModelState.STARTING:
            return self._load_progress(model, now)
        if model.state is ModelState.FAILED:
            return SwapProgress(name, f"failed to start ({model.reason})", 0.0, None)
        if model.state in (ModelState.DRAINING, ModelState.STOPPING):
            return SwapProgress(name, f"being unloaded ({model.state.value})", 0.0, None)
        busy = f"waiting for device {model.spec.device}" if model.spec.device else "waiting to be loaded"
        return SwapProgress(name, busy, 0.0, None)

    def draining_for(self, name: str) -> str | None:
        """The model draining to make room for `name` now, if its swap is at that step (None: it is not)."""
        model = self._models.get(name)
        swap = self._swaps.get(model.spec.device or "") if model is not None else None
        if swap is None or swap.target != name or model is None or model.state is ModelState.STARTING:
            return None
        leaving = self._leaving(swap)
        return leaving.spec.name if leaving is not None and leaving.state is ModelState.DRAINING else None

    def statistics(self, now: float) -> FleetStatistics:
        models = []
        for name, m in self._models.items():
            models.append(
                FleetModelStatistics(
                    name=name,
                    state=m.state.value,
                    reason=m.reason,
                    managed=m.spec.managed,
                    device=m.spec.device,
                    memory_gb=m.spec.memory_gb,
                    in_state_s=round(now - m.since, 3),
                    idle_s=self._idle_s(m, now),
                    load_s=None if m.load_s is None else round(m.load_s, 3),
                    progress=self._load_progress(m, now) if m.state is ModelState.STARTING else None,
                    crashes=m.crashes,
                )
            )
        devices = []
        for name, device in self._devices.items():
            on = self._on_device(name)
            swap = self._swaps.get(name)
            devices.append(
                DeviceStatistics(
                    name=name,
                    memory_gb=device.memory_gb,
                    used_gb=round(sum(m.spec.memory_gb for m in on), 3),
                    exclusive=device.exclusive,
                    models=[m.spec.name for m in on],
                    swap=None if swap is None else self._swap_progress(swap, now),
                )
            )
        return FleetStatistics(models, devices, self.loads, self.swaps)

    @staticmethod
    def _idle_s(model: _Model, now: float) -> float | None:
        """How long a loaded model has had nothing to do: since its last request, or since it loaded if later (None:
        busy, not loaded, or not launched here)."""
        loaded = model.state in (ModelState.READY, ModelState.DRAINING)
        if model.idle_since is None or not model.spec.managed or not loaded:
            return None
        return round(now - max(model.idle_since, model.since), 3)

    def _load_progress(self, model: _Model, now: float) -> SwapProgress:
        elapsed = now - model.since_launch
        phase = f"waiting for health of {model.spec.name}" if model.launched else f"starting {model.spec.name}"
        eta = None if model.load_s is None else round(max(0.0, model.load_s - elapsed), 1)
        return SwapProgress(model.spec.name, phase, round(elapsed, 3), eta)

    def _swap_progress(self, swap: _Swap, now: float) -> SwapProgress:
        target = self._models[swap.target]
        elapsed = round(now - swap.started_at, 3)
        if target.state is ModelState.STARTING:
            load = self._load_progress(target, now)
            return SwapProgress(swap.target, load.phase, elapsed, load.eta_s)
        eta: float | None = target.load_s
        victim = self._leaving(swap)
        if victim is not None:
            verb = "draining" if victim.state is ModelState.DRAINING else "stopping"
            if victim.stop_s is not None and eta is not None:
                eta += max(0.0, victim.stop_s - (now - victim.since)) if verb == "stopping" else victim.stop_s
            phase = f"{verb} {victim.spec.name}"
            return SwapProgress(swap.target, phase, elapsed, None if eta is None else round(eta, 1))
        return SwapProgress(swap.target, f"starting {swap.target}", elapsed, None if eta is None else round(eta, 1))

    def _leaving(self, swap: _Swap) -> _Model | None:
        """The first of a swap's victims still on its way out (draining or stopping): the swap's phase."""
        for name in swap.victims:
            victim = self._models[name]
            if victim.state in (ModelState.DRAINING, ModelState.STOPPING):
                return victim
        return None


def _average(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + _SMOOTHING * (sample - previous)
