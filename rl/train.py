"""Train: `python -m rl.train CONFIG.yaml [key=value ...]`.

Everything the user can get wrong (config, model path, data, reward functions) is checked
before Ray starts; then one step reads top to bottom: rollout -> reward -> advantage ->
update -> weight sync (verified) -> metrics / checkpoint.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from rl.config import Config, load_config
from rl.errors import SyncError, TrainingError, UserError, raised_in_actor


@dataclass
class Prepared:
    """What preflight resolved: all user input, checked, before any actor starts."""

    config: Config
    model_path: str
    tokenizer: object
    prompts: object
    reward_fns: list


def resolve_model_path(path: str) -> str:
    """`demo:SmolLM2-135M-Instruct` -> the converted demo model; local dirs must exist."""
    from rl.demo_model import DEMO_MODEL_NAME, prepare_demo_model

    if path.startswith("demo:"):
        if path != f"demo:{DEMO_MODEL_NAME}":
            raise UserError(f"model.path = {path!r}: the only demo model is demo:{DEMO_MODEL_NAME}.")
        try:
            return str(prepare_demo_model())
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
    # Hub names are exactly `org/name`; anything else is meant as a local path.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not os.path.exists(os.path.join(expanded, "config.json")):
            raise UserError(f"model.path = {path!r} is a directory without config.json: "
                            f"point it at a Hugging Face model directory.")
        # absolute: the actors read it on their own nodes, from their own working directories
        return os.path.abspath(expanded)
    if looks_local:
        raise UserError(f"model.path = {path!r} does not exist. Give a Hugging Face model directory, "
                        f"a hub name like Qwen/Qwen3-1.7B (needs internet), or demo:{DEMO_MODEL_NAME}.")
    _check_hub_model(path)
    return path  # a hub name: transformers/vLLM resolve it


def _check_hub_model(name: str) -> None:
    """A hub name must be cached locally or the hub reachable; otherwise fail in seconds.

    Without this, an offline machine spends a minute in huggingface_hub's retries before the
    same error.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise UserError(
            f"model.path = {name!r} is not a local directory, is not in the Hugging Face cache, and the "
            f"hub ({host}) cannot be reached from this machine. Download the model where there is "
            f"internet and set model.path to its directory, or use demo:SmolLM2-135M-Instruct.") from None


def preflight(config: Config) -> Prepared:
    from transformers import AutoTokenizer

    from rewards import RewardError, load_reward_functions
    from rl.data import PromptSource

    model_path = resolve_model_path(config.model.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # hub name without network, broken directory, ...
        raise UserError(f"model.path = {config.model.path!r}: the tokenizer could not be loaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None
    prompts = PromptSource(config.data, tokenizer, seed=config.trainer.seed)
    try:
        reward_fns = load_reward_functions(config.reward.functions)
    except RewardError as e:
        raise UserError(f"reward.functions: {e}") from None
    return Prepared(config, model_path, tokenizer, prompts, reward_fns)


LOOPBACK = "127.0.0.1"


def _loopback_node() -> None:
    """Make the Ray started by this process take 127.0.0.1 as its node address.

    Ray turns a loopback `_node_ip_address` into the machine's reachable address unless Ray
    clusters are off (`ray._private.services.resolve_ip_for_localhost` ->
    `get_node_ip_address`, which returns 127.0.0.1 only when
    `ray_constants.ENABLE_RAY_CLUSTER` is false, from `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`).
    With the node address 127.0.0.1, every Ray server binds the loopback interface only: the
    GCS, the raylet's node manager and object manager and each worker's gRPC server listen on
    127.0.0.1 when their node address is 127.0.0.1 (otherwise on 0.0.0.0 / ::), and the
    runtime-env agent and the autoscaler's metrics server bind the node address.
    The variable is read when ray is imported and inherited by Ray's processes; the module
    constant is set too in case ray was imported before.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(config: Config) -> None:
    """Join `ray.address` (or $RAY_ADDRESS), else start a local Ray: dashboard off and, with
    ray.loopback_only (the default), every port bound to 127.0.0.1 (docs/CLUSTER.md)."""
    import ray

    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    kwargs = {}
    if config.ray.loopback_only:
        _loopback_node()
        kwargs["_node_ip_address"] = LOOPBACK
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=True,
             configure_logging=True, logging_level="WARNING", **kwargs)


def run(config: Config) -> dict:
    """Train per `config`; returns the last step's metrics.

    trainer.resume_from `auto` is resolved here, before preflight and Ray (rl/checkpoints.py).
    SIGTERM / SIGINT (rl/preemption.py): the running step finishes and is checkpointed, the
    actors stop and `Preempted` is raised (`main` prints the resume command and exits 128 +
    the signal number); before the step loop `Preempted` is raised at once.
    """
    from rl.checkpoints import resolve_resume
    from rl.preemption import handle_signals, install_signal_handlers, keep_handlers_through_ray_init

    with handle_signals() as stop:
        resume, line = resolve_resume(config.trainer.resume_from, config.trainer.output_dir)
        config.trainer.resume_from = resume
        if line:
            print(line, file=sys.stderr)
        prepared = preflight(config)
        with keep_handlers_through_ray_init():  # ray.init installs SIGTERM handlers of its own
            init_ray(config)
        install_signal_handlers()
        from rl.trainer import Trainer

        trainer = Trainer(prepared)
        try:
            with stop.deferred():
                return trainer.fit()
        finally:
            trainer.close()


def _stopped(e, argv: list[str], config: Config | None) -> int:
    """After a SIGTERM/SIGINT (`Preempted`): Ray down (no actor, raylet or vLLM process outlives
    the driver), the resume command on stderr, exit code 128 + the signal number."""
    from rl.checkpoints import newest_complete_checkpoint
    from rl.preemption import report

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    newest = newest_complete_checkpoint(config.trainer.output_dir) if config is not None else None
    total = config.trainer.total_steps if config is not None else None
    print(report(e, argv, str(newest) if newest else None, total), file=sys.stderr)
    return e.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    path, overrides = argv[0], argv[1:]
    if "=" in path:  # only overrides given
        path, overrides = None, argv
    from rl.preemption import find_preempted, handle_signals

    config = None
    with handle_signals():  # a second signal while Ray shuts down exits at once
        try:
            config = load_config(path, overrides)
            run(config)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (TrainingError, SyncError) as e:  # the run stopped cleanly, with the reason and the fix
            print(f"error: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # Preempted, or Ray's SystemError around it (rl/preemption.py)
            stopped = find_preempted(e)
            if stopped is None:
                message = raised_in_actor(e)  # e.g. model.path missing on an actor's node
                if message is None:
                    raise
                print(f"error: {message}", file=sys.stderr)
                return 2
            return _stopped(stopped, argv, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
