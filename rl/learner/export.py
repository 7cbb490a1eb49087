"""The learner's side of the weight sync: rank 0 sends, other fsdp ranks help gather.

Two transports (rl/weight_sync.py picks one): a flat buffer through Ray's object store
(rollout/weights.py), or a bucketed collective broadcast into vLLM's weight-transfer API
(rollout/weight_broadcast.py; NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

from rl.learner.model import PolicyModel
from rl.learner.parallel import free_endpoint


class WeightExport:
    def __init__(self, policy: PolicyModel, rank: int):
        self.policy = policy
        self.rank = rank
        self._packer = None  # the flat buffer, reused across steps
        self._broadcaster = None

    def flat(self):
        """The weights as a `rollout.weights.FlatWeights`: one contiguous buffer per dtype.

        The fp32 -> rollout-dtype cast writes straight into a buffer reused across steps, and
        Ray moves it through its shared-memory object store without pickling tensors.
        None on ranks other than 0 (under fsdp they only took part in gathering the shards).
        """
        from rollout.weights import FlatPacker

        named = self.policy.weights_to_send()
        if self.rank != 0:
            return None
        if self._packer is None:
            self._packer = FlatPacker(self.policy.dtype)
        return self._packer.pack(named)

    def broadcast_endpoint(self) -> dict:
        """Where the broadcast group meets: this node's address, a free port (rank 0 hosts the
        group's store there) and the backend (nccl when the weights are on a GPU, else gloo)."""
        host, port = free_endpoint().rsplit(":", 1)
        return {"master_address": host, "master_port": int(port),
                "backend": "nccl" if self.policy.device.type == "cuda" else "gloo"}

    def join_broadcast(self, master_address: str, master_port: int, backend: str, world_size: int,
                       bucket_bytes: int) -> None:
        """Open the broadcast group as its rank 0; blocks until the rollout engines have joined."""
        from rollout.weight_broadcast import WeightBroadcaster, open_group

        group = open_group(master_address, master_port, 0, world_size, backend)
        self._broadcaster = WeightBroadcaster(group, self.policy.device, bucket_bytes)

    def metas(self) -> list:
        """What `broadcast` sends, in order (names, rollout dtype, shapes)."""
        from rollout.weight_broadcast import describe

        policy = self.policy
        # Shapes only: DTensor shards report the full shape, so nothing is gathered here.
        named = policy.merged_lora_weights() if policy.lora else policy.full_weights(gather=False)
        return describe(named, policy.dtype)

    def broadcast(self) -> dict[str, float]:
        """Send the weights to every engine of the group (they run `receive_weight_broadcast`)."""
        named = self.policy.weights_to_send()
        if self.rank != 0:
            return {}  # fsdp: this rank only took part in gathering the shards
        return self._broadcaster.send(named, self.policy.dtype)
