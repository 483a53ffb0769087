"""Mining on several processes (``torchrun``, ``accelerate launch``; one node or many).

A launcher sets ``WORLD_SIZE``/``RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``), checked before any connection
(a ``RANK`` outside ``0..WORLD_SIZE-1`` is named at once, not waited on); each rank then embeds
its share of what the shared embedding cache lacks, and rank 0 alone selects the negatives and writes
the folder. Ranks meet only at a few barriers, on a gloo group whatever the device (NCCL cannot say
which rank is missing): a rank that died is named there, within ``NEMO_HF_DIST_TIMEOUT`` seconds
(default 1800; a killed process is usually seen at once, through its closed connections) instead of
the job hanging until the launcher's or NCCL's own timeout. The first meeting (every rank joining) waits
as long and no longer: ``WORLD_SIZE=2`` with one process started fails, naming both variables.
torch is imported only when ranks meet.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

TIMEOUT_ENV = "NEMO_HF_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800
_MAIN_WAIT = datetime.timedelta(days=7)  # the others wait out rank 0's selection and writing, however long
_RESUME = "the embeddings already computed are cached: run the same command again to resume"
_LOG = logging.getLogger(__name__)


class RankFailure(RuntimeError):
    """Another rank died or stopped answering; the message names it when this rank can know which."""


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world} is not a number of processes (>= 1; unset it to run one process)")
    return world > 1


def local_processes() -> int:
    """How many processes the launcher started on this node (they share its cores)."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer (the launcher sets it; unset it to run one process)") from None


@dataclass
class Ranks:
    """This process's place among the ranks, and the meeting points between them."""

    rank: int
    world: int
    group: object  # a gloo ProcessGroup: barriers with the failure timeout
    main_group: object  # a gloo ProcessGroup: the wait for rank 0's folder
    timeout: datetime.timedelta

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int, batch: int = 1) -> np.ndarray:
        """This rank's positions among ``n`` items: a contiguous block of whole ``batch``-sized batches,
        the ranks' counts of batches within one of each other (so every batch holds the items a single
        process would batch together, and the embeddings are bit for bit the same)."""
        batches = -(-n // batch)
        bounds = np.minimum(np.linspace(0, batches, self.world + 1).round().astype(np.int64) * batch, n)
        return np.arange(bounds[self.rank], bounds[self.rank + 1])

    def barrier(self, what: str) -> None:
        """Wait for every rank to reach ``what``. Rank 0 hears from each rank in turn and names the
        ones it cannot hear from (dead: their connection is closed; or silent past the timeout), then
        releases the others. (gloo's ``monitored_barrier`` names a rank only if it dies during the wait.)"""
        import torch
        import torch.distributed as dist

        token = torch.zeros(1)
        if not self.is_main:
            try:
                dist.send(token, dst=0, group=self.group)
                dist.recv(token, src=0, group=self.group)
            except RuntimeError as err:
                raise RankFailure(
                    f"rank {self.rank}: lost contact with rank 0 after {what} (rank 0 names a failed rank; "
                    f"{_first_line(err)}); {_RESUME}"
                ) from err
            return
        deadline = time.monotonic() + self.timeout.total_seconds()
        arrivals, failed = {}, []
        for rank in range(1, self.world):
            try:
                arrivals[rank] = dist.irecv(torch.zeros(1), src=rank, group=self.group)
            except RuntimeError:  # its connection is closed already
                failed.append(rank)
        for rank, arrival in arrivals.items():
            try:
                arrived = arrival.wait(timeout=datetime.timedelta(seconds=max(0.001, deadline - time.monotonic())))
            except RuntimeError:  # its connection closed, or the timeout
                arrived = False
            if not arrived:
                failed.append(rank)
        if failed:
            names = ", ".join(map(str, sorted(failed)))
            raise RankFailure(
                f"rank{'s' * (len(failed) > 1)} {names} of {self.world} did not reach the barrier after {what} "
                f"within {self.timeout.total_seconds():.0f} s ({TIMEOUT_ENV}): died or hung; {_RESUME}"
            )
        for rank in range(1, self.world):
            dist.send(token, dst=rank, group=self.group)

    def main_done(self, error: str | None) -> None:
        """Rank 0: tell the waiting ranks that the folder is written, or why it is not."""
        import torch.distributed as dist

        dist.broadcast_object_list([error], src=0, group=self.main_group)

    def wait_for_main(self) -> None:
        """Ranks > 0: wait until rank 0 has written the folder; raise if it failed."""
        import torch.distributed as dist

        outcome = [None]
        try:
            dist.broadcast_object_list(outcome, src=0, group=self.main_group)
        except RuntimeError as err:
            raise RankFailure(f"rank {self.rank}: lost rank 0 while it was writing the folder ({_first_line(err)})") from err
        if outcome[0] is not None:
            raise RankFailure(f"rank {self.rank}: rank 0 failed to write the folder: {outcome[0]}")


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _launch_env() -> tuple[int, int, int]:
    """``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as the launcher set them, each checked against the others
    (a rank outside the world would wait forever for ranks that never come); ``MASTER_ADDR``/``MASTER_PORT``
    present. ValueError naming the variable otherwise."""
    world = _env_int("WORLD_SIZE", 1)
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the ranks with a launcher "
                         "(torchrun, accelerate launch), or unset WORLD_SIZE to run one process")  # fmt: skip
    rank = _env_int("RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}): each process takes one rank "
                         "of 0..WORLD_SIZE-1")  # fmt: skip
    port = _env_int("MASTER_PORT", 0)
    if not 0 < port < 2**16:
        raise ValueError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    local_rank = _env_int("LOCAL_RANK", 0)
    name, local_world = ("LOCAL_WORLD_SIZE", local_processes()) if os.environ.get("LOCAL_WORLD_SIZE") else ("WORLD_SIZE", world)
    if not 0 <= local_rank < local_world:
        raise ValueError(f"LOCAL_RANK={local_rank} is outside 0..{local_world - 1} ({name}={local_world}): it numbers "
                         "the processes on this node from 0")  # fmt: skip
    return rank, world, local_rank


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e9:  # inf or 1e300 overflow timedelta
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: give the barrier timeout in seconds (> 0, < 1e9)")
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def launched_ranks() -> Iterator[Ranks]:
    """The ranks of this launch: the process group is created (NCCL on GPU, gloo on CPU) unless the
    caller made one already (accelerate's ``PartialState``, its own ``init_process_group``), and is
    destroyed afterwards only if created here. Each rank then uses GPU ``LOCAL_RANK``."""
    import torch
    import torch.distributed as dist

    timeout = _timeout()
    created = not dist.is_initialized()
    if created:
        rank, world, local_rank = _launch_env()
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                                 "start at most one process per GPU")  # fmt: skip
            torch.cuda.set_device(local_rank)
        try:  # the rendezvous waits for every rank at most the timeout (NCCL's own collectives are not used)
            dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timeout)
        except (RuntimeError, ValueError) as err:  # torch's DistError is a RuntimeError
            raise RankFailure(
                f"rank {rank} of {world}: not all WORLD_SIZE={world} ranks met at MASTER_ADDR:MASTER_PORT "
                f"({os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}) within {timeout.total_seconds():.0f} s "
                f"({TIMEOUT_ENV}; {_first_line(err)}): start one process per RANK 0..{world - 1} (torchrun does), "
                "or unset WORLD_SIZE to run one process"
            ) from None
    group = dist.new_group(backend="gloo", timeout=timeout)
    main_group = dist.new_group(backend="gloo", timeout=_MAIN_WAIT)
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), group, main_group, timeout)
    _LOG.info("rank %d of %d (%s)", ranks.rank, ranks.world, dist.get_backend())
    yield ranks
    # Reached only when this rank succeeded: after a failure the process exits, peers may be gone.
    if created:
        dist.destroy_process_group()
