"""Who computes what: layouts, the planner, the engines. Never names an algorithm.

``build_engine(params, config)`` gives the :class:`Engine` an optimizer speaks to (``map``, ``all_reduce``,
agreement checks); ``create_dtensor_config`` / ``create_auto_config`` / ``create_callback_config`` say where
parameters live; ``make_plan`` is the pure planner (``python -m disco plan`` simulates any world size).
"""

from .config import (
    DistributedConfig,
    create_auto_config,
    create_callback_config,
    create_dtensor_config,
    create_local_config,
)
from .engine import Engine, EngineStats, Job, LocalEngine, build_engine, local_piece
from .layout import PARTIAL, REPLICATE, Layout, Placement, shard
from .planner import Plan, make_plan

__all__ = [
    "PARTIAL",
    "REPLICATE",
    "DistributedConfig",
    "Engine",
    "EngineStats",
    "Job",
    "Layout",
    "LocalEngine",
    "Placement",
    "Plan",
    "build_engine",
    "create_auto_config",
    "create_callback_config",
    "create_local_config",
    "create_dtensor_config",
    "local_piece",
    "make_plan",
    "shard",
]
