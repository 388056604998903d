"""Batching policies side by side under one interface: sarathi (stall-free chunked prefills)
and the paper's baselines vllm, orca and fastertransformer."""
from __future__ import annotations

from sarathi_engine.config import SchedulerConfig
from sarathi_engine.kv_cache import BlockManager
from sarathi_engine.scheduler.base import ScheduledChunk, Scheduler, SchedulerOutput
from sarathi_engine.scheduler.fastertransformer import FasterTransformerScheduler
from sarathi_engine.scheduler.orca import OrcaScheduler
from sarathi_engine.scheduler.sarathi import SarathiScheduler
from sarathi_engine.scheduler.vllm import VLLMScheduler
from sarathi_engine.slo_planner import SloPlanner

POLICY_CLASSES: dict[str, type[Scheduler]] = {
    "sarathi": SarathiScheduler,
    "vllm": VLLMScheduler,
    "orca": OrcaScheduler,
    "fastertransformer": FasterTransformerScheduler,
}


def make_scheduler(config: SchedulerConfig, blocks: BlockManager, planner: SloPlanner | None = None) -> Scheduler:
    return POLICY_CLASSES[config.policy](config, blocks, planner)


__all__ = ["ScheduledChunk", "Scheduler", "SchedulerOutput", "make_scheduler", "POLICY_CLASSES"]
