"""engine-plan: peak GPU memory, FLOPs, bytes moved, kernel launches and the roofline floor of a
config's training step, predicted without a GPU (see engine.plan.planner for the whole, and
engine.plan.step for how the step is run on fake tensors)."""

from engine.plan.gpus import GPUS, gpu
from engine.plan.planner import HEADROOM, BatchPlan, Lever, Plan, make_plan, parse_bytes

__all__ = ["GPUS", "HEADROOM", "BatchPlan", "Lever", "Plan", "gpu", "make_plan", "parse_bytes"]
