"""How the ranks of one engine start and find each other.

A pod (or a machine) runs ranks_per_pod consecutive ranks: its main process is the first of them
and starts the others as child processes. Without a multi-pod environment one pod holds every
rank. Across pods, every pod runs the same command with RANK (this pod's index) and WORLD_SIZE
(the number of pods), or LeaderWorkerSet's LWS_WORKER_INDEX and LWS_GROUP_SIZE, and
MASTER_ADDR/MASTER_PORT (or LWS_LEADER_ADDRESS, port 29500) naming pod 0, where rank 0 listens.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from sarathi_engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from sarathi_engine.distributed import ParallelState, init_distributed
from sarathi_engine.model.llama import check_layout
from sarathi_engine.device import probe_cuda, resolve_device
from sarathi_engine.model_runner import ModelRunner
from sarathi_engine.pipeline import RankFailure
from sarathi_engine.threads import set_engine_threads, threads_per_rank

DEFAULT_MASTER_PORT = 29500
DEFAULT_TIMEOUT = 600.0  # seconds: joining, loading weights on every rank, and any one wait within a step
RESOLVE_RETRY_SECONDS = 1.0

T = TypeVar("T")


@dataclass(frozen=True)
class Placement:
    pod: int
    pods: int
    ranks_per_pod: int
    master: str | None  # host:port of rank 0; None: this machine, a free port

    @property
    def ranks(self) -> range:
        return range(self.pod * self.ranks_per_pod, (self.pod + 1) * self.ranks_per_pod)


def placement_from_env(parallel: ParallelConfig, env: Mapping[str, str]) -> Placement:
    """Where this process sits, from the environment; raises naming the numbers when the
    environment and the parallel degrees do not fit together."""
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    world = tp * pp
    pod_text = env.get("RANK", env.get("LWS_WORKER_INDEX"))
    pods_text = env.get("WORLD_SIZE", env.get("LWS_GROUP_SIZE"))
    if pod_text is None and pods_text is None:
        return Placement(0, 1, world, None)
    pod, pods = _int(pod_text or "0", "RANK"), _int(pods_text or "1", "WORLD_SIZE")
    if not 0 <= pod < pods:
        raise ValueError(f"RANK={pod} is outside WORLD_SIZE={pods}: pods are numbered 0 to {pods - 1}")
    if world % pods:
        raise ValueError(
            f"WORLD_SIZE={pods} pods cannot hold tensor-parallel {tp} x pipeline-parallel {pp} = {world} ranks: "
            "every pod runs the same number of ranks"
        )
    host = env.get("MASTER_ADDR") or env.get("LWS_LEADER_ADDRESS")
    if host is None and pods > 1:
        raise ValueError(f"WORLD_SIZE={pods} pods need MASTER_ADDR (or LWS_LEADER_ADDRESS) naming pod 0")
    port = _int(env.get("MASTER_PORT", str(DEFAULT_MASTER_PORT)), "MASTER_PORT")
    return Placement(pod, pods, world // pods, None if host is None else f"{host}:{port}")


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def _address_of(host: str) -> str:
    return socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)[0][4][0]


def resolved_master(master: str, timeout: float, resolve: Callable[[str], str] = _address_of,
                    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> str:
    """master (host:port) with its host resolved to an address, retried until `timeout`: a pod's
    DNS name (a headless Service's record, LeaderWorkerSet's LWS_LEADER_ADDRESS) appears only once
    the pod exists, which may be after this pod starts; torch gets the address."""
    host, _, port = master.rpartition(":")
    deadline = clock() + timeout
    while True:
        try:
            address = resolve(host)
            break
        except OSError as e:
            if clock() >= deadline:
                raise RuntimeError(f"rank 0's address {host!r} did not resolve within {timeout:.0f}s: {e}") from None
            sleep(RESOLVE_RETRY_SECONDS)
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def dist_timeout(env: Mapping[str, str] = os.environ) -> float:
    return float(env.get("SARATHI_DIST_TIMEOUT", DEFAULT_TIMEOUT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_to_json(config: EngineConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> EngineConfig:
    d = json.loads(text)
    return EngineConfig(**{**d, "cache": CacheConfig(**d["cache"]), "scheduler": SchedulerConfig(**d["scheduler"]),
                           "parallel": ParallelConfig(**d["parallel"])})


class LocalRanks:
    """The ranks this pod runs besides its main process, as child processes that die with it."""

    def __init__(self, config: EngineConfig, placement: Placement, master: str) -> None:
        env = dict(os.environ)
        # Ranks on one machine share its cores; a process that owns them all would starve the rest.
        env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(placement.ranks_per_pod)))
        args = ["--master", master, "--parent", str(os.getpid()), "--config", config_to_json(config)]
        self.procs = {
            rank: subprocess.Popen(
                [sys.executable, "-m", "sarathi_engine.worker", "--rank", str(rank), "--local-rank", str(local), *args],
                env=env,
            )
            for local, rank in enumerate(placement.ranks) if local > 0
        }
        atexit.register(self.kill)

    def check(self) -> None:
        """Raise if a child has exited."""
        for rank, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                raise RankFailure(f"rank {rank} (pid {proc.pid}) exited with code {code}")

    def wait(self, timeout: float) -> None:
        """Give the children `timeout` seconds to exit, then kill them."""
        for proc in self.procs.values():
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.kill()

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def watched(fn: Callable[[], T], children: LocalRanks) -> T:
    """fn() run while watching the children: if one exits first, raise at once instead of
    waiting for the process group to time out."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn()))
        except BaseException as error:
            result.append((False, error))

    thread = threading.Thread(target=run, name="rank-start", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        if not result:
            children.check()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def start_rank(config: EngineConfig, model_cfg: ModelConfig, folder: Path, rank: int, local_rank: int,
               master: str) -> tuple[ModelRunner, ParallelState]:
    """Join the engine's process group as `rank` and load this rank's share of the model."""
    device = resolve_device(config.device, probe_cuda())
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    parallel = config.parallel
    state = init_distributed(rank, parallel.tensor_parallel_size, parallel.pipeline_parallel_size, master, device,
                             dist_timeout())
    return ModelRunner(model_cfg, folder, config.cache, device, config.seed, config.scheduler,
                       config.attention_backend), state


def start_pod(config: EngineConfig, model_cfg: ModelConfig, folder: Path,
              placement: Placement) -> tuple[ModelRunner, ParallelState, LocalRanks]:
    """This pod's ranks: the children first, then this process as the pod's first rank."""
    parallel = config.parallel
    check_layout(model_cfg, parallel.tensor_parallel_size, parallel.pipeline_parallel_size)
    master = resolved_master(placement.master, dist_timeout()) if placement.master else f"127.0.0.1:{free_port()}"
    set_engine_threads(placement.ranks_per_pod)
    config = dataclasses.replace(config, model=str(folder))
    children = LocalRanks(config, placement, master)
    try:
        runner, state = watched(lambda: start_rank(config, model_cfg, folder, placement.ranks.start, 0, master),
                                children)
    except BaseException:
        children.kill()
        raise
    return runner, state, children
