"""The learners' data-parallel group: one rank's view (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import socket

import torch


def free_endpoint() -> str:
    """"host:port" on this process's node with a port free now: where a group whose rank 0 is
    this process can meet (on a cluster, rank 0 need not share the driver's node)."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return f"{ray.util.get_node_ip_address()}:{s.getsockname()[1]}"


class DataParallel:
    """Rank, world size and the two collectives the update needs; a no-op group of one."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.joined = False

    def join(self, address: str, device: torch.device) -> None:
        """Every rank at once; `address` is rank 0's `free_endpoint()`."""
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=self.rank,
                                world_size=self.world_size)
        self.joined = True

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(tensor)
        return tensor

    def all_gather_1d(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D `values` [n_rank] concatenated in rank order -> [sum n_rank].

        Ranks hold different counts: the sizes go first, then the values padded to the largest.
        """
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        size = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
        padded[: values.numel()] = values
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
