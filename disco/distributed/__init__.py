"""Who computes what: layouts, the planner, the executors. Never names an algorithm."""

from .config import DistributedConfig, create_auto_config, create_callback_config, create_dtensor_config
from .layout import Layout, Placement
from .planner import Plan, make_plan

__all__ = [
    "DistributedConfig",
    "Layout",
    "Placement",
    "Plan",
    "create_auto_config",
    "create_callback_config",
    "create_dtensor_config",
    "make_plan",
]
