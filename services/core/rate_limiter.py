"""Triton's rate limiter (``--rate-limit=execution_count``): a model instance executes a batch only
while it holds the resources its instance_group's ``rate_limiter`` section lists.

Data flow: ModelManager creates one RateLimiter per service process (``from_settings``; None with
``--rate-limit=off``), shared by every model of the service ─▶ ServedModel.load registers each
version's instances (``register`` ─▶ ModelLimits) and hands them to its scheduler (batcher.py,
sequence_batcher.py) ─▶ the scheduler, with a batch due and an instance free, asks for a grant
(``request``); the grant arrives through its ``on_grant`` callback and the scheduler forms the
batch then (requests that came meanwhile join it) ─▶ ``release`` after the batch gives the
resources back (asking again at once when the instance has another batch due) and grants the
next waiting instance. ``try_acquire`` is the schedulers' fast path: a grant at once, or none.
``close`` unregisters a model's instances when it unloads.

Rules, as Triton's:
* Resources are (name, count) per instance, held for the whole execution, counted per device
  (the instance's GPU; CPU instances are device 0) unless ``global: true`` (one pool for the
  process). How many of a resource exist: ``--rate-limit-resource name:count[:device]`` (no
  device: every device), else the most any one registered instance asks for. A model whose
  instance asks more than the flag gives, or that lists a name as global where another model
  lists it per device, fails to load. Names compare case-insensitively.
* Order: waiting instances are granted by execution count times priority (priority 0 counts as 1),
  lowest first, ties to the one that asked first; strictly in that order, so while the first one
  cannot get its resources the ones behind it wait too (one that needs many copies is not
  starved by many that need few). Instances that list no resources take part in this order
  (Triton's cross-model prioritization) but never wait for resources themselves.

Everything runs on the service's event loop: no locks. ``on_grant`` callbacks run synchronously
inside the limiter's calls and must only record the grant and wake their scheduler.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import ModelLoadError
from services.core.model_prep import instance_specs

if TYPE_CHECKING:
    from services.core.settings import ServerSettings

__all__ = ["GLOBAL", "InstanceLimit", "ModelLimits", "RateLimiter"]

log = logging.getLogger(__name__)

#: the device key of a global resource
GLOBAL = -2
#: the device of a --rate-limit-resource given without one: every device
EVERY_DEVICE = -1

#: (device or GLOBAL, case-folded name): one pool of a resource
Key = tuple[int, str]

_IDLE, _WAITING, _HELD = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Need:
    """What one instance holds while it executes: ``count`` copies from the pool ``key``."""

    key: Key
    count: int
    #: the name as the model's config writes it (for messages)
    label: str

    def describe(self) -> str:
        return f"{self.label}:{self.count} ({_where(self.key)})"


class InstanceLimit:
    """One model instance as the rate limiter sees it."""

    __slots__ = ("asked", "executions", "index", "model", "name", "needs", "priority", "state")

    def __init__(
        self, model: ModelLimits, index: int, name: str, needs: tuple[Need, ...], priority: int
    ) -> None:
        self.model = model
        self.index = index
        self.name = name
        self.needs = needs
        #: the config's priority; 0 counts as 1
        self.priority = max(priority, 1)
        #: batches it executed (its place in the order grows with them)
        self.executions = 0
        #: when it last asked (ties in the order go to the earlier one)
        self.asked = 0
        self.state = _IDLE

    @property
    def waiting(self) -> bool:
        """Asked for a grant and not yet given one."""
        return self.state == _WAITING

    @property
    def holding(self) -> bool:
        """Holds its resources (granted, its batch not done)."""
        return self.state == _HELD

    @property
    def score(self) -> int:
        """Triton's scaled priority: the lower, the sooner it is granted."""
        return self.executions * self.priority


def _order(instance: InstanceLimit) -> tuple[int, int]:
    return instance.score, instance.asked


class ModelLimits:
    """The rate limiter's view of one model version's instances, by instance index; what its
    scheduler calls. Create with ``RateLimiter.register``; ``close`` when the model unloads."""

    def __init__(self, limiter: RateLimiter, model: str) -> None:
        self.model = model
        self.instances: list[InstanceLimit] = []
        self._limiter = limiter
        self._on_grant: Callable[[int], None] | None = None
        self.closed = False

    def __len__(self) -> int:
        return len(self.instances)

    def bind(self, on_grant: Callable[[int], None]) -> None:
        """Set what a grant calls (with the instance index), synchronously; it must not raise."""
        self._on_grant = on_grant

    def first(self, free: Iterable[int]) -> int:
        """Of the instances ``free`` (indices), the one to ask for first (Triton's order)."""
        return min(free, key=lambda i: (self.instances[i].score, i))

    def try_acquire(self, index: int) -> bool:
        """Grant at once when nothing waiting comes first and the resources are free."""
        return self._limiter.try_acquire(self.instances[index])

    def request(self, index: int) -> None:
        """Wait for a grant; ``on_grant(index)`` is called once it comes (maybe before this
        returns). The instance must be idle (not waiting, not holding)."""
        if self.closed or self._on_grant is None:
            why = "is closed" if self.closed else "has no on_grant bound"
            raise RuntimeError(f"model '{self.model}': rate limiter registration {why}")
        self._limiter.request(self.instances[index])

    def withdraw(self, index: int) -> bool:
        """Stop waiting for a grant; False when it was not waiting."""
        return self._limiter.withdraw(self.instances[index])

    def release(self, index: int, *, executed: bool = True, again: bool = False) -> None:
        """Give the resources back after a batch (``executed``: counts in the order); a no-op
        when it holds nothing. ``again``: the instance has another batch due and asks again
        before the next grant is given (as Triton re-stages an instance with work pending),
        so it competes with the instances already waiting instead of queueing behind them."""
        self._limiter.release(self.instances[index], executed, again)

    def granted(self, index: int) -> None:
        if self._on_grant is None:
            raise RuntimeError(f"model '{self.model}': a grant came before the scheduler bound")
        self._on_grant(index)

    def close(self) -> None:
        """Unregister (the model unloads): nothing of it waits or holds afterwards."""
        if not self.closed:
            self.closed = True
            self._limiter.unregister(self)


class RateLimiter:
    """The service process's resources and the instances waiting for them."""

    def __init__(self, resources: Iterable[tuple[str, int, int]] = ()) -> None:
        """``resources``: the --rate-limit-resource values as (name, count, device), device -1
        meaning every device; a name given twice for the same device keeps the last count."""
        self._explicit: dict[tuple[int, str], int] = {}
        for name, count, device in resources:
            if not name or count < 0 or device < EVERY_DEVICE:
                raise ValueError(
                    f"--rate-limit-resource {name}:{count}:{device}: give a name, a count >= 0 "
                    "and a device >= 0 (or none for every device)"
                )
            self._explicit[(device, name.casefold())] = count
        self._models: list[ModelLimits] = []
        #: copies of each pool in use, and how many exist (recomputed when models come and go)
        self._in_use: dict[Key, int] = {}
        self._capacity: dict[Key, int] = {}
        self._waiting: list[InstanceLimit] = []
        self._asked = itertools.count(1)
        self._granting = False

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> RateLimiter | None:
        """The limiter --rate-limit asks for: None when off."""
        if settings.rate_limit == "off":
            return None
        limiter = cls(settings.rate_limit_resources)
        given = ", ".join(
            f"{name}:{count}" + ("" if device == EVERY_DEVICE else f":{device}")
            for name, count, device in settings.rate_limit_resources
        )
        log.info(
            "rate limiter: execution_count; resources given: %s (any other: the most one "
            "instance asks for)",
            given or "none",
        )
        return limiter

    def capacity(self, key: Key) -> int:
        """How many copies of the pool ``key`` exist (0: no registered instance uses it)."""
        return self._capacity.get(key, 0)

    def in_use(self, key: Key) -> int:
        return self._in_use.get(key, 0)

    # -- registration ------------------------------------------------------------------------

    def register(self, config: mc.ModelConfig) -> ModelLimits:
        """Register a model version's instances (in model_prep.instance_specs order); a
        ModelLoadError when one asks for more than --rate-limit-resource gives, or lists a
        resource as global where a registered model lists it per device (or the reverse)."""
        limits = ModelLimits(self, config.name)
        specs = instance_specs(config)
        for index, spec in enumerate(specs):
            group = config.instance_group[spec.group] if spec.group >= 0 else None
            device = spec.device_id if spec.kind == mc.ModelInstanceGroup.KIND_GPU else 0
            needs: dict[Key, Need] = {}
            for r in group.rate_limiter.resources if group is not None else ():
                key = (GLOBAL if getattr(r, "global") else max(device, 0), r.name.casefold())
                needs[key] = Need(key, r.count, r.name)
            priority = group.rate_limiter.priority if group is not None else 0
            limits.instances.append(
                InstanceLimit(limits, index, spec.name, tuple(needs.values()), priority)
            )
        self._check(limits)
        self._models.append(limits)
        self._recompute()
        log.info("model %r: rate limiter: %s", config.name, _describe(limits))
        self._grant()  # a larger default may let a waiting instance through
        return limits

    def _check(self, new: ModelLimits) -> None:
        scope: dict[str, tuple[bool, str]] = {}
        for limits in [*self._models, new]:
            for instance in limits.instances:
                for need in instance.needs:
                    scope.setdefault(need.key[1], (need.key[0] == GLOBAL, limits.model))
        for instance in new.instances:
            for need in instance.needs:
                is_global, other = scope[need.key[1]]
                if is_global != (need.key[0] == GLOBAL):
                    raise ModelLoadError(
                        f"model '{new.model}': rate_limiter resource '{need.label}' is "
                        f"{'per device' if is_global else 'global'} here but "
                        f"{'global' if is_global else 'per device'} in model '{other}'; a "
                        "resource must be global in every config that lists it, or in none"
                    )
                given = self._explicit_count(need.key)
                if given is not None and need.count > given:
                    raise ModelLoadError(
                        f"model '{new.model}': instance '{instance.name}' needs {need.count} of "
                        f"rate_limiter resource '{need.label}' ({_where(need.key)}), but "
                        f"--rate-limit-resource makes only {given} available, so it could never "
                        "run; raise that count or lower the instance group's rate_limiter count"
                    )

    def _explicit_count(self, key: Key) -> int | None:
        """What --rate-limit-resource gives the pool ``key`` (None: not given): for a global
        resource the largest count given for its name on any device, for a device the larger
        of what is given for that device and for every device."""
        device, name = key
        counts = [
            count
            for (d, n), count in self._explicit.items()
            if n == name and (device == GLOBAL or d in (device, EVERY_DEVICE))
        ]
        return max(counts) if counts else None

    def _recompute(self) -> None:
        largest: dict[Key, int] = {}
        for limits in self._models:
            for instance in limits.instances:
                for need in instance.needs:
                    largest[need.key] = max(largest.get(need.key, 0), need.count)
        self._capacity = {
            key: count if (given := self._explicit_count(key)) is None else given
            for key, count in largest.items()
        }

    def unregister(self, limits: ModelLimits) -> None:
        """Forget a model's instances: withdraw the waiting ones, take back what they hold."""
        for instance in limits.instances:
            if instance.state == _WAITING:
                self._waiting.remove(instance)
            elif instance.state == _HELD:
                log.warning(
                    "model %r: instance %r still held its rate limiter resources at unload",
                    limits.model,
                    instance.name,
                )
                self._give_back(instance)
            instance.state = _IDLE
        if limits in self._models:
            self._models.remove(limits)
        self._recompute()
        self._grant()

    # -- grants ------------------------------------------------------------------------------

    def try_acquire(self, instance: InstanceLimit) -> bool:
        if instance.state != _IDLE or instance.model.closed:
            return False
        if any(w.score <= instance.score for w in self._waiting) or not self._fits(instance):
            return False
        self._take(instance)
        return True

    def request(self, instance: InstanceLimit) -> None:
        if instance.state != _IDLE:
            raise RuntimeError(f"instance '{instance.name}' asked for a grant twice")
        self._wait(instance)
        self._grant()

    def _wait(self, instance: InstanceLimit) -> None:
        instance.state = _WAITING
        instance.asked = next(self._asked)
        self._waiting.append(instance)

    def withdraw(self, instance: InstanceLimit) -> bool:
        if instance.state != _WAITING:
            return False
        self._waiting.remove(instance)
        instance.state = _IDLE
        self._grant()  # it may have been the first, holding up the others
        return True

    def release(self, instance: InstanceLimit, executed: bool, again: bool = False) -> None:
        if instance.state != _HELD:
            return
        self._give_back(instance)
        instance.state = _IDLE
        if executed:
            instance.executions += 1
        if again and not instance.model.closed:
            self._wait(instance)
        self._grant()

    def _fits(self, instance: InstanceLimit) -> bool:
        in_use, capacity = self._in_use, self._capacity
        return all(in_use.get(n.key, 0) + n.count <= capacity[n.key] for n in instance.needs)

    def _take(self, instance: InstanceLimit) -> None:
        for need in instance.needs:
            self._in_use[need.key] = self._in_use.get(need.key, 0) + need.count
        instance.state = _HELD

    def _give_back(self, instance: InstanceLimit) -> None:
        for need in instance.needs:
            self._in_use[need.key] -= need.count

    def _grant(self) -> None:
        """Grant waiting instances in order while the first one's resources are free."""
        if self._granting:  # called back from a grant: the loop below looks again anyway
            return
        self._granting = True
        try:
            while self._waiting:
                first = min(self._waiting, key=_order)
                if not self._fits(first):
                    break
                self._waiting.remove(first)
                self._take(first)
                try:
                    first.model.granted(first.index)
                except Exception:
                    log.exception("model %r: rate limiter grant callback failed", first.model.model)
                    self._give_back(first)
                    first.state = _IDLE
        finally:
            self._granting = False


def _where(key: Key) -> str:
    return "global" if key[0] == GLOBAL else f"device {key[0]}"


def _describe(limits: ModelLimits) -> str:
    return "; ".join(
        f"{i.name} needs {', '.join(n.describe() for n in i.needs) or 'no resources'}"
        f" (priority {i.priority})"
        for i in limits.instances
    )
