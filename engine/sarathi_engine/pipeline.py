"""How rank 0 drives the other ranks when the model spans several processes.

Rank 0 owns the scheduler. For each batch it sends a FORWARD message (a fixed-size int64 header,
then an int64 body: the batch layout) to the other ranks of the first stage and runs its own
share. Every stage passes the message and its hidden states on to the same tensor-parallel rank
of the next stage; the last stage sends only the normed rows whose logits are needed back to the first
(the stages form a ring). Later rank 0 sends COLLECT: the first stage takes those rows, computes
the logits (the vocabulary is split over its ranks and gathered on rank 0) and rank 0 samples.
Up to pp_size batches sit between FORWARD and COLLECT at once, so the stages work on different
micro-batches at the same time.

Messages on one link (a pair of ranks, one direction) arrive in the order sent, so none needs an
id. Waiting for the next message may last forever (the server may be idle); every other wait is
bounded by the step timeout. A rank that dies closes its sockets, which fails the wait on it at
once; ranks that lose a peer exit, and so the failure reaches rank 0.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sarathi_engine.distributed import ParallelState
from sarathi_engine.model_runner import Batch, BatchInputs, ModelRunner, make_inputs
from sarathi_engine.sampler import Sampled

FORWARD, COLLECT, REPORT, STOP = 1, 2, 3, 4
HEADER_SIZE = 5  # kind, tokens, sequences, block-table width, logit rows
FOREVER = timedelta(days=365)


class RankFailure(RuntimeError):
    """Another rank of the engine died or stopped answering: the engine cannot go on."""


def pack(inputs: BatchInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A FORWARD message: header and body, CPU int64."""
    meta = inputs.meta
    tables = meta.block_tables.cpu()
    header = torch.tensor([FORWARD, len(inputs.input_ids), len(meta.query_lens), tables.shape[1],
                           len(inputs.logit_rows)], dtype=torch.int64)
    body = torch.cat([
        inputs.input_ids.cpu(), inputs.positions.cpu(), meta.slot_mapping.cpu(),
        torch.tensor(meta.query_lens + meta.context_lens + inputs.logit_rows, dtype=torch.int64),
        tables.flatten(),
    ])
    return header, body


def body_size(header: torch.Tensor) -> int:
    _, tokens, seqs, width, rows = header.tolist()
    return 3 * tokens + 2 * seqs + rows + seqs * width


def unpack(header: torch.Tensor, body: torch.Tensor, device: torch.device) -> BatchInputs:
    _, tokens, seqs, width, rows = header.tolist()
    ids, positions, slots, lens, tables = body.split([tokens, tokens, tokens, 2 * seqs + rows, seqs * width])
    lens = lens.tolist()
    return make_inputs(ids, positions, slots, lens[:seqs], lens[seqs : 2 * seqs], tables.view(seqs, width),
                       lens[2 * seqs :], device)


def control(kind: int) -> torch.Tensor:
    return torch.tensor([kind, 0, 0, 0, 0], dtype=torch.int64)


@contextmanager
def lost_rank(peer: int, what: str) -> Iterator[None]:
    """Name the peer when a transfer with it fails (torch reports only its address)."""
    try:
        yield
    except RuntimeError as error:
        raise RankFailure(f"waited in vain for rank {peer} {what}: {error}") from error


class Link:
    """Tensors to and from other ranks, point to point. Sends do not block; at most one message
    per destination is outstanding, so buffers stay alive until the peer has them."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timedelta(seconds=timeout)
        self._pending: dict[int, list] = {}

    def send(self, dst: int, tensors: list[torch.Tensor]) -> None:
        self._wait_sent(dst)
        with lost_rank(dst, "to take a message"):
            self._pending[dst] = [(dist.isend(t, dst), t) for t in tensors]

    def flush(self) -> None:
        for dst in list(self._pending):
            self._wait_sent(dst)

    def _wait_sent(self, dst: int) -> None:
        with lost_rank(dst, "to take a message"):
            for work, _ in self._pending.pop(dst, []):
                work.wait(self.timeout)

    def recv(self, src: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu",
             timeout: timedelta | None = None) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=device)
        with lost_rank(src, "to send"):
            dist.irecv(t, src).wait(timeout or self.timeout)
        return t

    def recv_message(self, src: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next header (waiting as long as it takes) and, for FORWARD, its body."""
        header = self.recv(src, (HEADER_SIZE,), torch.int64, timeout=FOREVER)
        if header[0] != FORWARD:
            return header, None
        return header, self.recv(src, (body_size(header),), torch.int64)


class StageClock:
    """Time this rank spends on model work, as opposed to waiting for its neighbours."""

    def __init__(self) -> None:
        self.busy = 0.0
        self.first: float | None = None
        self.last = 0.0

    def __enter__(self) -> None:
        self._start = time.monotonic()

    def __exit__(self, *exc) -> None:
        self.last = time.monotonic()
        self.busy += self.last - self._start
        self.first = self._start if self.first is None else self.first

    def summary(self) -> torch.Tensor:
        """[busy seconds, seconds from the first piece of work to the end of the last]."""
        span = 0.0 if self.first is None else self.last - self.first
        return torch.tensor([self.busy, span], dtype=torch.float64)


@dataclass(frozen=True)
class StageTiming:
    rank: int
    stage: int
    busy: float
    span: float

    @property
    def idle_share(self) -> float:
        return 1 - self.busy / self.span if self.span else 0.0


def bubble_share(timings: list[StageTiming]) -> float:
    """Idle stage time over total stage time, one rank per stage (tensor-parallel peers match)."""
    stages: dict[int, StageTiming] = {}
    for t in sorted(timings, key=lambda t: t.rank):
        stages.setdefault(t.stage, t)
    total = sum(t.span for t in stages.values())
    return sum(t.span - t.busy for t in stages.values()) / total if total else 0.0


class Driver:
    """Rank 0's side: runs its share of each batch and tells the other ranks to run theirs."""

    def __init__(self, runner: ModelRunner, state: ParallelState, timeout: float) -> None:
        self.runner = runner
        self.state = state
        self.link = Link(timeout)
        self.clock = StageClock()
        self.peers = [state.rank_of(0, t) for t in range(1, state.tp_size)]

    def launch(self, batch: Batch) -> list[Sampled] | None:
        """Start a batch; what it sampled at once when every stage is here, else None (collect it later)."""
        header, body = pack(batch.inputs)
        self._tell_peers([header, body])
        if self.state.pp_size == 1:
            with self.clock:
                return self.runner.execute(batch)
        with self.clock:
            hidden = self.runner.forward(batch.inputs)
        self.link.send(self.state.next_rank, [header, body, hidden])
        return None

    def collect(self, batch: Batch) -> list[Sampled]:
        """What the oldest launched batch sampled, once the last stage has it."""
        self._tell_peers([control(COLLECT)])
        rows = batch.inputs.logit_rows
        if not rows:
            return [Sampled() for _ in batch.chunks]
        runner = self.runner
        hidden = self.link.recv(self.state.prev_rank, (len(rows), runner.cfg.hidden_size), runner.activation_dtype,
                                runner.device)
        with self.clock:
            logits = self.runner.logits(hidden)
        return self.runner.sample(batch, logits)

    def report(self) -> list[StageTiming]:
        """Every rank's stage timings; only with no batch in flight."""
        self._tell_peers([control(REPORT)])
        if not self.state.is_last_stage:
            self.link.send(self.state.next_rank, [control(REPORT)])
        others = [self.link.recv(r, (2,), torch.float64) for r in range(1, self.state.world_size)]
        timings = [self.clock.summary(), *others]
        tp = self.state.tp_size
        return [StageTiming(rank, rank // tp, *t.tolist()) for rank, t in enumerate(timings)]

    def stop(self) -> None:
        """End every other rank's loop; only with no batch in flight."""
        self._tell_peers([control(STOP)])
        if not self.state.is_last_stage:
            self.link.send(self.state.next_rank, [control(STOP)])
        self.link.flush()

    def _tell_peers(self, tensors: list[torch.Tensor]) -> None:
        for peer in self.peers:
            self.link.send(peer, tensors)


def serve(runner: ModelRunner, state: ParallelState, timeout: float) -> None:
    """Every rank but 0: follow the messages until STOP. Raises RankFailure when a peer is lost."""
    link, clock = Link(timeout), StageClock()
    source = 0 if state.is_first_stage else state.prev_rank
    hidden_shape = (runner.cfg.hidden_size,)
    awaiting_rows: deque[int] = deque()  # first stage: logit rows of each batch not yet collected
    while True:
        header, body = link.recv_message(source)
        kind = int(header[0])
        if kind == FORWARD:
            inputs = unpack(header, body, runner.device)
            rows = inputs.logit_rows
            hidden = None
            if not state.is_first_stage:
                hidden = link.recv(source, (len(inputs.input_ids), *hidden_shape), runner.activation_dtype,
                                   runner.device)
            with clock:
                hidden = runner.forward(inputs, hidden)
                if state.pp_size == 1 and rows:
                    runner.logits(hidden[rows])
            if state.pp_size == 1:
                continue
            if state.is_first_stage:
                awaiting_rows.append(len(rows))
            if not state.is_last_stage:
                link.send(state.next_rank, [header, body, hidden])
            elif rows:
                link.send(state.next_rank, [hidden[rows]])
        elif kind == COLLECT:
            n = awaiting_rows.popleft()
            if n:
                hidden = link.recv(state.prev_rank, (n, *hidden_shape), runner.activation_dtype, runner.device)
                with clock:
                    runner.logits(hidden)
        else:
            if not state.is_last_stage:
                link.send(state.next_rank, [header])
            if kind == REPORT:
                link.send(0, [clock.summary()])
            else:
                link.flush()
                return
