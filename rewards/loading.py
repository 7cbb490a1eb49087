"""Load user reward functions by import path or file, and work out how to call them.

Three calling conventions are recognised from the function's signature, so existing reward
functions load unchanged:

- ``trl``:   ``f(prompts, completions, **columns) -> list[float | None]``  (one call per chunk),
             called as TRL's GRPOTrainer calls it: every input by keyword, and for a
             conversational prompt (one rendered with the chat template, see
             PROMPT_MESSAGES) `prompts` as message lists and `completions` as
             ``[{"role": "assistant", "content": text}]`` (TRL's own `trl.rewards` load as they are)
- ``verl``:  ``compute_score(data_source, solution_str, ground_truth, extra_info=None)``
             ``-> float | dict`` (dict: "score" plus sub-scores)            (one call per sample)
- ``plain``: ``f(prompt, completion, **columns) -> float | None | dict``    (one call per sample)

Auto-detection looks at parameter names: ``solution_str`` -> verl; ``completions`` or
``prompts`` -> trl; ``completion`` -> plain; ``completion_ids`` alone -> trl. Anything else needs an explicit ``convention``,
and then the first positional parameters receive the convention's inputs in order.
Every mistake a user can make in the config is reported here, at config time, as a
``RewardError`` naming the function and the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from rewards import registry
from rewards.config import CONVENTIONS, RewardFunctionConfig
from rewards.errors import RewardError

# The inputs each convention feeds to the function, in positional order.
_PRIMARY = {
    "trl": ("prompts", "completions"),
    "plain": ("prompt", "completion"),
    "verl": ("data_source", "solution_str", "ground_truth", "extra_info"),
}
# Inputs a function cannot do without (the rest are passed when the signature accepts them).
_NEEDED = {"trl": "completions", "plain": "completion", "verl": "solution_str"}
# Column names never forwarded as extra keyword columns: the convention passes them itself.
PROMPT_MESSAGES = "prompt_messages"
"""Reserved batch column: per sample, the chat messages ([{role, content}, ...]) its prompt was
rendered from with the chat template, or None for a prompt used as plain text. It tells the
TRL convention that a sample is conversational (rewards/calling.py converts `prompts` and
`completions` as TRL does); it is consumed there and never passed to a function."""
_RESERVED = {"prompt", "prompts", "completion", "completions", "solution_str", PROMPT_MESSAGES}

_SIGNATURE_HELP = (
    "Reward functions must follow one of three conventions: TRL "
    "`f(prompts, completions, **kwargs)`, verl `compute_score(data_source, solution_str, "
    "ground_truth, extra_info=None)`, or plain `f(prompt, completion, **columns)`."
)


@dataclass(frozen=True)
class CallPlan:
    """How to call one function: plain data, pickled to the worker processes."""

    convention: str
    is_async: bool
    positional: tuple[str, ...]
    """Convention inputs passed positionally, in order (only when the names do not match)."""
    keyword: tuple[str, ...]
    """Convention inputs passed by keyword (parameter name == input name)."""
    column_params: tuple[str, ...]
    """Named parameters that columns may fill (trl/plain); trl also PROMPT_MESSAGES, so that the
    executor sends that column along (calling.py consumes it)."""
    required_columns: tuple[str, ...]
    """Parameters without a default that only a column can fill."""
    var_kwargs: bool
    """The function has **kwargs: trl/plain then receive every column."""

    @property
    def batched(self) -> bool:
        """TRL functions take a whole chunk per call; the others one sample per call."""
        return self.convention == "trl"


@dataclass
class LoadedReward:
    """A reward function ready for the executor. `fn` stays in this process; workers reload by `path`."""

    name: str
    path: str
    """Resolved path: `module:function` or an absolute `file.py:function`."""
    weight: float
    kwargs: dict[str, Any]
    plan: CallPlan
    fn: Callable[..., Any] = field(repr=False, compare=False)


def _fail(label: str, problem: str, fix: str) -> RewardError:
    return RewardError(f"reward function {label!r}: {problem} Fix: {fix}")


def _file_module_name(abs_path: str) -> str:
    # Unique per absolute path, so two `reward.py` files in different folders don't collide.
    digest = hashlib.sha1(abs_path.encode()).hexdigest()[:10]
    stem = os.path.splitext(os.path.basename(abs_path))[0]
    safe = "".join(c if c.isalnum() else "_" for c in stem)
    return f"_reward_file_{safe}_{digest}"


def _import_file(abs_path: str, label: str) -> Any:
    mod_name = _file_module_name(abs_path)
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, abs_path)
    if spec is None or spec.loader is None:
        raise _fail(label, f"{abs_path} cannot be loaded as a Python module.", "point at a .py file.")
    module = importlib.util.module_from_spec(spec)
    # Helpers next to the reward file (`from my_utils import ...`) should import, as they do
    # when the user runs the file directly; appended so the file cannot shadow installed packages.
    folder = os.path.dirname(abs_path)
    if folder not in sys.path:
        sys.path.append(folder)
    sys.modules[mod_name] = module  # before exec: dataclasses and pickle look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[mod_name]
        raise _fail(
            label,
            f"executing {abs_path} raised {type(exc).__name__}: {exc}.",
            "run `python <file>` to see the full traceback and fix the error in the file.",
        ) from exc
    return module


def resolve_path(path: str) -> tuple[str, str, str]:
    """Split a config path into (kind, target, attribute), resolving registry names and files.

    kind is "file" (target is an absolute path) or "module" (target is a module name).
    """
    label = path
    if ":" not in path:
        registered = registry.lookup(path)
        if registered is None:
            raise _fail(
                label,
                f"{path!r} is neither a registered reward name nor a `module:function` / "
                f"`path/to/file.py:function` path.",
                f"use one of the registered names {registry.registered_names()} or a path with ':'.",
            )
        path = registered
    target, _, attr = path.rpartition(":")
    if not target or not attr:
        raise _fail(label, "the path must be `module:function` or `path/to/file.py:function`.",
                    "write both the module (or file) and the function name, separated by ':'.")
    if target.endswith(".py") or "/" in target or os.sep in target:
        abs_path = os.path.abspath(os.path.expanduser(target))
        if not os.path.isfile(abs_path):
            raise _fail(
                label,
                f"file {abs_path} does not exist (relative paths are resolved against the current "
                f"directory {os.getcwd()}).",
                "correct the file path, or give an absolute path.",
            )
        return "file", abs_path, attr
    return "module", target, attr


def import_callable(path: str, label: str | None = None) -> tuple[Callable[..., Any], str]:
    """Import the function named by `path`; return it and its resolved path (for workers)."""
    label = label or path
    kind, target, attr = resolve_path(path)
    if kind == "file":
        module = _import_file(target, label)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise _fail(
                label,
                f"module {target!r} could not be imported ({exc}).",
                "check the spelling, install the package or add its folder to PYTHONPATH, "
                "or give a file instead: `path/to/file.py:function`.",
            ) from exc
        except BaseException as exc:
            raise _fail(
                label,
                f"importing module {target!r} raised {type(exc).__name__}: {exc}.",
                f"run `python -c 'import {target}'` to see the traceback and fix the module.",
            ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise _fail(
                label,
                f"{target} has no attribute {attr!r}.",
                f"use one of the callables it defines: {names[:20]}.",
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise _fail(label, f"{attr!r} in {target} is a {type(obj).__name__}, not a function.",
                    "point the path at a function.")
    return obj, f"{target}:{attr}"


def _is_async(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # callable objects with `async def __call__`
    return call is not None and inspect.iscoroutinefunction(call)


def make_plan(fn: Callable[..., Any], label: str, convention: str | None, kwargs: dict[str, Any]) -> CallPlan:
    """Decide how to call `fn` from its signature; RewardError if no convention fits."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise _fail(label, f"its signature cannot be inspected ({exc}).",
                    "wrap it in a Python function with named parameters.") from exc
    params = sig.parameters
    P = inspect.Parameter
    named = [n for n, p in params.items() if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]
    positional_params = [n for n, p in params.items() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    var_kwargs = any(p.kind == P.VAR_KEYWORD for p in params.values())
    var_args = any(p.kind == P.VAR_POSITIONAL for p in params.values())

    if convention is None:
        if "solution_str" in named:
            convention = "verl"
        elif "completions" in named or "prompts" in named:
            convention = "trl"
        elif "completion" in named:
            convention = "plain"
        elif "completion_ids" in named:
            convention = "trl"  # e.g. trl.rewards.get_soft_overlong_punishment(...)(completion_ids, **kwargs)
        else:
            raise _fail(
                label,
                f"its signature {sig} matches no convention. {_SIGNATURE_HELP}",
                "rename the parameters to one of these shapes, or set `convention:` "
                "(trl, verl or plain) so the first positional parameters receive the inputs.",
            )
    primary = _PRIMARY[convention]
    keyword = tuple(n for n in primary if n in named)
    positional: tuple[str, ...] = ()
    if not keyword:
        if var_kwargs and (convention == "trl" or (not positional_params and not var_args)):
            keyword = primary  # f(**kwargs), f(completion_ids, **kwargs): TRL passes everything by keyword
        elif convention == "trl" and "completion_ids" in named:
            pass  # reads token ids only: the completion_ids column fills it
        else:
            # Explicit convention with other names: inputs go positionally, in order.
            slots = len(positional_params) if not var_args else len(primary)
            positional = primary[: min(len(primary), slots)]
    elif var_kwargs and convention != "plain":
        # TRL and verl call by keyword, so their missing inputs land in **kwargs; a plain
        # function's **columns receives dataset columns only.
        keyword = primary
    reads_ids = convention == "trl" and "completion_ids" in named
    if _NEEDED[convention] not in positional + keyword and not reads_ids:
        raise _fail(
            label,
            f"with convention {convention!r} its signature {sig} has no place for the "
            f"{_NEEDED[convention]!r} input. {_SIGNATURE_HELP}",
            "add that parameter, or choose the convention that matches the function.",
        )
    clash = sorted(set(kwargs) & (set(primary) | _RESERVED))
    if clash:
        raise _fail(label, f"kwargs {clash} collide with inputs the {convention} convention passes itself.",
                    "remove them from `kwargs`.")
    unknown = sorted(k for k in kwargs if k not in named and not var_kwargs)
    if unknown:
        raise _fail(label, f"kwargs {unknown} are not parameters of {sig}.",
                    "remove them from `kwargs` or add them to the function's parameters.")
    try:
        sig.bind_partial(*([None] * len(positional)), **{k: None for k in (*keyword, *kwargs)})
    except TypeError as exc:
        raise _fail(label, f"its signature {sig} cannot take the {convention} inputs ({exc}). "
                    f"{_SIGNATURE_HELP}", "fix the signature or the `convention:` setting.") from exc

    taken = set(positional_params[: len(positional)]) | set(keyword) | set(kwargs)
    column_params = tuple(n for n in named if n not in taken and n not in _RESERVED)
    required = tuple(
        n for n in column_params
        if params[n].default is P.empty and params[n].kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)
    )
    if convention == "verl":
        if required:  # verl calls with its four inputs only: nothing else can fill these
            raise _fail(label, f"parameters {list(required)} have no default and the verl convention "
                        "does not fill them.", "give them defaults or pass them in `kwargs`.")
        column_params = ()
    if convention == "trl":
        column_params += (PROMPT_MESSAGES,)
    return CallPlan(convention, _is_async(fn), positional, keyword, column_params, required, var_kwargs)


def load_reward_function(spec: RewardFunctionConfig) -> LoadedReward:
    """Import and check one function (see `load_reward_functions`)."""
    fn, resolved = import_callable(spec.path)
    plan = make_plan(fn, spec.path, spec.convention, spec.kwargs)
    if spec.name:
        name = spec.name
    elif ":" not in spec.path:
        name = spec.path  # registry short name
    else:
        name = resolved.rpartition(":")[2].rpartition(".")[2]
    return LoadedReward(name, resolved, float(spec.weight), dict(spec.kwargs), plan, fn)


def load_reward_functions(specs: list[RewardFunctionConfig | dict[str, Any]]) -> list[LoadedReward]:
    """Load every configured reward function; RewardError on the first mistake.

    Accepts `reward.functions` entries (RewardFunctionConfig) or plain dicts with the same keys (as YAML gives them).
    """
    if not specs:
        raise RewardError("no reward functions configured. Fix: add at least one entry to `reward.functions`.")
    loaded = []
    for spec in specs:
        if not isinstance(spec, RewardFunctionConfig):
            try:
                spec = RewardFunctionConfig(**dict(spec))
            except TypeError as exc:
                raise RewardError(f"reward function entry {spec!r} is invalid ({exc}). Fix: use the keys "
                                  "path, weight, name, kwargs, convention.") from exc
        loaded.append(load_reward_function(spec))
    seen: dict[str, str] = {}
    for fn in loaded:
        if fn.name in seen:
            raise RewardError(
                f"two reward functions are named {fn.name!r} ({seen[fn.name]} and {fn.path}); metrics "
                "would collide. Fix: give each a distinct `name:`."
            )
        seen[fn.name] = fn.path
    return loaded
