"""Device memory for the plan: the GPU table (GPUS, `--gpu` names), `cpu` as this machine's
RAM, and the byte units the plan counts and prints in."""

from __future__ import annotations

from rl.errors import ConfigError

GIB = 1024**3
MIB = 1024**2


GPUS: dict[str, int] = {
    # Total memory as nvidia-smi reports it (MiB); a few hundred MiB of it are the driver's.
    "H100-80GB": 81559 * MIB,
    "H200-141GB": 143771 * MIB,
    "A100-40GB": 40960 * MIB,
    "A100-80GB": 81920 * MIB,
    "L40S-48GB": 46068 * MIB,
}
"""GPU name -> bytes of memory. `cpu` (this machine's RAM) is accepted too."""


def gpu_memory(name: str) -> tuple[str, int]:
    """(canonical name, bytes) of a GPU name (case-insensitive, a unique prefix is enough)."""
    if name.lower() == "cpu":
        import psutil

        return "cpu", int(psutil.virtual_memory().total)
    matches = [g for g in GPUS if g.lower() == name.lower()] or [g for g in GPUS if g.lower().startswith(name.lower())]
    if len(matches) != 1:
        raise ConfigError(f"--gpu {name!r} is {'ambiguous' if matches else 'unknown'}: use one of "
                          f"{', '.join(GPUS)}, cpu.")
    return matches[0], GPUS[matches[0]]


def _gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"
