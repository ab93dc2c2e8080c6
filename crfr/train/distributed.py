"""What the processes of one torchrun training say to each other: rank 0's checkpoint sent to every rank, the
replicas' weights compared at the end, and a rank that died or hung turned into one clear error."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from crfr.digests import weights_digest
from crfr.errors import TrainingError
from crfr.train.runtime import Runtime


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def peers_lost_as_error(runtime: Runtime, where: Callable[[], str]) -> Iterator[None]:
    """Turn a collective that failed because another rank died or hung into one TrainingError line.

    Args:
        runtime: this rank.
        where: what this rank was doing (epoch, step, last checkpoint), asked only when it failed.
    """
    try:
        yield
    except RuntimeError as exc:
        # gloo raises a plain RuntimeError naming itself; NCCL a DistBackendError.
        if not runtime.distributed or not (isinstance(exc, dist.DistError) or "gloo" in str(exc)):
            raise
        cause = " ".join(str(exc).split())[:200]
        raise TrainingError(
            f"rank {runtime.rank} of {runtime.world_size} lost the other training processes {where()} ({cause}): "
            f"one of them stopped, or did not answer within runtime.dist_timeout_s={runtime.dist_timeout_s} s. "
            "Restart every node with --resume to continue from the last checkpoint"
        ) from None


def _comm_device(runtime: Runtime) -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU ones.
    return runtime.device if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_bytes(runtime: Runtime, payload: bytes | None, failed: bool = False,
                    what: str = "decide the resume state") -> bytes | None:
    """Rank 0's ``payload`` (None: nothing) on every rank; a no-op in a single process.

    Args:
        runtime: the process group this rank belongs to.
        payload: what rank 0 sends; ignored on the other ranks.
        failed: on rank 0, send a failure instead: the other ranks raise, rank 0 gets None (and raises its own).
        what: what rank 0 was doing, for the other ranks' message.

    Raises:
        TrainingError: on ranks other than 0, when rank 0 sent a failure.
    """
    if not runtime.distributed:
        return payload
    device = _comm_device(runtime)
    status = 2 if failed else (0 if payload is None else 1)
    header = torch.tensor([status, len(payload or b"")] if runtime.is_main else [0, 0], dtype=torch.int64,
                          device=device)
    dist.broadcast(header, src=0)
    status, size = (int(v) for v in header.tolist())
    if status == 2:
        if runtime.is_main:
            return None
        raise TrainingError(f"rank {runtime.rank}: rank 0 failed to {what} (its log says why); stopping too")
    if status == 0:
        return None
    if runtime.is_main:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    else:
        data = torch.empty(size, dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    return payload if runtime.is_main else data.cpu().numpy().tobytes()


def ranks_differing_from_main(runtime: Runtime, digest: bytes) -> list[int]:
    """The ranks whose ``digest`` (same length everywhere) is not rank 0's; [] in a single process."""
    if not runtime.distributed:
        return []
    device = _comm_device(runtime)
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(device)
    every = [torch.empty_like(mine) for _ in range(runtime.world_size)]
    dist.all_gather(every, mine)
    return [r for r, d in enumerate(every) if not torch.equal(d, every[0])]


def check_replicas(net: nn.Module, runtime: Runtime, name: str) -> None:
    """Make every rank hold rank 0's state, then fail the run if any rank's weights differ from it.

    DDP gives every rank rank 0's BatchNorm statistics at the start of each forward, so after the last
    step each rank holds its own: take rank 0's, as the next forward would. The weights themselves must
    already agree; a replica that does not was trained on other weights (a broken resume), and saying so
    beats publishing rank 0's model as if all were well.

    Raises:
        TrainingError: a rank's weights differ from rank 0's.
    """
    if not runtime.distributed:
        return
    for buffer in net.buffers():
        dist.broadcast(buffer, src=0)
    differ = ranks_differing_from_main(runtime, bytes.fromhex(weights_digest(net.state_dict())))
    if differ:
        raise TrainingError(f"{name}: the weights of rank(s) {differ} differ from rank 0's at the end "
                            "of training: the replicas diverged; rerun without --resume")
