"""Routing policies: one interface (`Policy.pick(request, view) -> Decision`), one module per policy."""

from __future__ import annotations

from router.policies.base import Policy, RouterView
from router.policies.cache_aware import CacheAware
from router.policies.kv_overlap import KvOverlap
from router.policies.least_loaded import LeastLoaded
from router.policies.random import RandomPolicy
from router.policies.round_robin import RoundRobin
from router.policies.session_kv import SessionKv
from router.policies.session_sticky import SessionSticky

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (RoundRobin, RandomPolicy, LeastLoaded, SessionSticky, KvOverlap, CacheAware, SessionKv)
}

__all__ = ["POLICIES", "Policy", "RouterView"]
