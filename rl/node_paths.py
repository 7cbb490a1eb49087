"""Paths an actor reads from its own node's disk, checked where it runs.

The driver resolves `model.path` (rl/train.py, `resolve_model_path`) to an absolute directory
when it is local, or leaves a hub name (`org/name`) for transformers and vLLM to fetch. On a
cluster the actors may run on other machines, and an absolute path is read from the actor's
node: it must exist there too (the same directory on every node, or a shared filesystem). A
missing one would otherwise surface as a transformers/vLLM traceback from deep inside the
loader; this names the node and the path.
"""

from __future__ import annotations

import os

from rl.errors import UserError


def require_on_this_node(paths: dict[str, str | None]) -> None:
    """Raise UserError for the first absolute path in `paths` ({what it is, e.g. `model.path`:
    path}) that does not exist on this node; hub names and None are skipped. Called first
    thing in the rollout and learner actors' constructors (rl/actors.py)."""
    for field, path in paths.items():
        if not path or not os.path.isabs(path):
            continue  # a hub name, or nothing to read
        if os.path.exists(path):
            continue
        raise UserError(
            f"{field} = {path!r} does not exist on node {_node()}, where Ray placed this actor. A local path "
            f"is read by the actor on its own node: copy the directory to the same path on every node, put "
            f"it on a filesystem that every node mounts, or use a hub name (e.g. Qwen/Qwen3-1.7B) that each "
            f"node can download.")


def _node() -> str:
    """This node as Ray reports it (id and IP), or the host name outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return f"{ray.get_runtime_context().get_node_id()} ({ray.util.get_node_ip_address()})"
    except Exception:
        pass
    import socket

    return socket.gethostname()
