"""W&B sweeps over our CLI: ``experiments/sweeps/<name>.yaml``.

A sweep file is in W&B's own format (``method``, ``metric``, ``parameters``, ``command``). Its parameters
are LightningCLI keys (``model.lambda_u``, ``data.val_size``) and its ``command`` runs
``python -m ssl_lightning fit --config experiments/<experiment>.yaml ${args}``, so an agent passes each
sampled value as ``--model.lambda_u=2`` exactly as a user would on the command line.

Without a W&B server this module does what the server and the agent do between them: it validates a
sweep file, samples parameter sets (``grid``: every combination; ``random``/``bayes``: independent draws,
which is also how a Bayesian search starts) and builds the command line the agent would execute.

``python -m ssl_lightning.sweeps check [NAME ...]`` validates sweep files (``make sweep`` runs it before
creating anything on the server); ``python -m ssl_lightning.sweeps preview NAME [-n N]`` prints the commands
an agent would run.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ssl_lightning.runs import REPO_ROOT

SWEEP_DIR = REPO_ROOT / "experiments" / "sweeps"
METHODS = ("grid", "random", "bayes")
TOP_LEVEL_KEYS = {
    "program", "method", "metric", "parameters", "command", "name", "description", "project", "entity",
    "early_terminate", "run_cap",
}
# The agent's command macros (wandb_agent.Agent._command_run); ${args} is the one our commands use.
AGENT_MACROS = {"${env}": ["/usr/bin/env"], "${interpreter}": ["python"]}
# Parameter specifications W&B accepts, by the keys that define them.
DISTRIBUTIONS = {
    "constant": ("value",),
    "categorical": ("values",),
    "int_uniform": ("min", "max"),
    "uniform": ("min", "max"),
    "q_uniform": ("min", "max", "q"),
    "log_uniform_values": ("min", "max"),
    "log_uniform": ("min", "max"),  # min and max are exponents: exp(U(min, max))
    "inv_log_uniform": ("min", "max"),
    "q_log_uniform_values": ("min", "max", "q"),
    "inv_log_uniform_values": ("min", "max"),
    "normal": ("mu", "sigma"),
    "q_normal": ("mu", "sigma", "q"),
    "log_normal": ("mu", "sigma"),
    "q_log_normal": ("mu", "sigma", "q"),
}


class SweepConfigError(ValueError):
    """A sweep file that W&B or our CLI would reject; the message says which key and why."""


def sweep_path(name: str) -> Path:
    path = SWEEP_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
        raise SweepConfigError(f"no sweep '{name}' ({path} does not exist); available: {available}")
    return path


def sweep_names() -> list[str]:
    return sorted(path.stem for path in SWEEP_DIR.glob("*.yaml"))


def _distribution(name: str, spec: dict[str, Any]) -> str:
    """The distribution of one parameter, inferred as W&B infers it when ``distribution`` is absent."""
    if "distribution" in spec:
        distribution = spec["distribution"]
    elif "value" in spec:
        distribution = "constant"
    elif "values" in spec:
        distribution = "categorical"
    elif "min" in spec and "max" in spec:
        both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        distribution = "int_uniform" if both_int else "uniform"
    else:
        raise SweepConfigError(f"parameter '{name}' needs value, values, min/max or a distribution: {spec}")
    if distribution not in DISTRIBUTIONS:
        raise SweepConfigError(f"parameter '{name}': unknown distribution '{distribution}' "
                               f"(known: {', '.join(DISTRIBUTIONS)})")
    missing = [key for key in DISTRIBUTIONS[distribution] if key not in spec]
    if missing:
        raise SweepConfigError(f"parameter '{name}' ({distribution}) is missing {missing}")
    return distribution


def validate(sweep: dict[str, Any], source: str = "sweep") -> None:
    """Reject what W&B would reject, and what would make an agent's runs diverge from our CLI."""
    unknown = set(sweep) - TOP_LEVEL_KEYS
    if unknown:
        raise SweepConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}")
    if sweep.get("method") not in METHODS:
        raise SweepConfigError(f"{source}: method must be one of {METHODS}, not {sweep.get('method')!r}")
    metric = sweep.get("metric")
    if sweep["method"] == "bayes" and not metric:
        raise SweepConfigError(f"{source}: a bayes sweep needs a metric to optimise")
    if metric and (not metric.get("name") or metric.get("goal", "minimize") not in ("minimize", "maximize")):
        raise SweepConfigError(f"{source}: metric needs a name and goal minimize|maximize: {metric}")
    parameters = sweep.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SweepConfigError(f"{source}: parameters must be a non-empty mapping")
    for name, spec in parameters.items():
        if not isinstance(spec, dict):
            raise SweepConfigError(f"{source}: parameter '{name}' must be a mapping, not {spec!r}")
        distribution = _distribution(name, spec)
        if sweep["method"] == "grid" and distribution not in ("constant", "categorical"):
            raise SweepConfigError(f"{source}: a grid sweep needs value/values for '{name}', not {distribution}")
        values = spec.get("values", [spec.get("value")]) if distribution in ("constant", "categorical") else []
        if any(value is None for value in values):
            # The agent writes None as the string "None", which our CLI would read as text.
            raise SweepConfigError(f"{source}: parameter '{name}' has a null value")
    command = sweep.get("command")
    if not isinstance(command, list) or "${args}" not in command:
        raise SweepConfigError(f"{source}: command must be a list that passes the parameters with ${{args}}")
    if "--config" not in command or command.index("--config") + 1 >= len(command):
        raise SweepConfigError(f"{source}: command must name an experiment with --config experiments/<name>.yaml")
    config = REPO_ROOT / command[command.index("--config") + 1]
    if not config.is_file():
        raise SweepConfigError(f"{source}: the command's experiment {config} does not exist")


def load(name_or_path: str | Path) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.is_file():
        path = sweep_path(str(name_or_path))
    sweep = yaml.safe_load(path.read_text())
    if not isinstance(sweep, dict):
        raise SweepConfigError(f"{path}: not a YAML mapping")
    validate(sweep, source=str(path))
    return sweep


def _draw(spec: dict[str, Any], distribution: str, rng: np.random.Generator) -> Any:
    def quantize(value: float) -> float:
        q = spec["q"]
        rounded = round(value / q) * q
        return int(rounded) if isinstance(q, int) else rounded

    if distribution == "constant":
        return spec["value"]
    if distribution == "categorical":
        values = spec["values"]
        return values[int(rng.choice(len(values), p=spec.get("probabilities")))]
    low, high = spec.get("min"), spec.get("max")
    if distribution == "int_uniform":
        return int(rng.integers(low, high + 1))
    if distribution == "uniform":
        return float(rng.uniform(low, high))
    if distribution == "q_uniform":
        return quantize(float(rng.uniform(low, high)))
    if distribution in ("log_uniform_values", "q_log_uniform_values"):
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
        return quantize(value) if distribution.startswith("q_") else value
    if distribution == "log_uniform":
        return math.exp(rng.uniform(low, high))
    if distribution == "inv_log_uniform":
        return math.exp(-rng.uniform(low, high))
    if distribution == "inv_log_uniform_values":
        return 1.0 / math.exp(rng.uniform(math.log(1.0 / high), math.log(1.0 / low)))
    value = float(rng.normal(spec["mu"], spec["sigma"]))
    if "log" in distribution:
        value = math.exp(value)
    return quantize(value) if distribution.startswith("q_") else value


def sample(sweep: dict[str, Any], count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Parameter sets as the sweep server hands them to agents: for ``grid`` the first ``count`` of the
    Cartesian product (in the file's order); otherwise ``count`` independent draws."""
    parameters = sweep["parameters"]
    if sweep["method"] == "grid":
        names = list(parameters)
        choices = [parameters[n].get("values", [parameters[n].get("value")]) for n in names]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.islice(itertools.product(*choices), count)]
    rng = np.random.default_rng(seed)
    return [{name: _draw(spec, _distribution(name, spec), rng) for name, spec in parameters.items()}
            for _ in range(count)]


def grid_size(sweep: dict[str, Any]) -> int | None:
    if sweep["method"] != "grid":
        return None
    return math.prod(len(spec.get("values", [None])) for spec in sweep["parameters"].values())


def agent_arguments(parameters: dict[str, Any]) -> list[str]:
    """``${args}``: one ``--name=value`` per parameter, formatted as the agent formats it (Python ``str``)."""
    return [f"--{name}={value}" for name, value in parameters.items()]


def agent_command(sweep: dict[str, Any], parameters: dict[str, Any]) -> list[str]:
    """The command line an agent executes for one parameter set: the sweep's ``command`` with its macros
    replaced (``${env}`` → /usr/bin/env, ``${interpreter}`` → python, ``${args}`` → the arguments)."""
    command: list[str] = []
    for token in sweep["command"]:
        token = str(token)
        if token == "${args}":
            command += agent_arguments(parameters)
        elif token == "${program}":
            command.append(str(sweep["program"]))
        else:
            command += AGENT_MACROS.get(token, [token])
    return command


def cli_arguments(command: list[str]) -> list[str]:
    """The part of an agent's command that our CLI parses (after ``-m ssl_lightning``)."""
    if "ssl_lightning" not in command:
        raise SweepConfigError(f"the command does not run our CLI (python -m ssl_lightning ...): {command}")
    return command[command.index("ssl_lightning") + 1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate W&B sweep files or preview an agent's commands.")
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="validate sweep files (default: all)")
    check.add_argument("names", nargs="*")
    preview = sub.add_parser("preview", help="print the commands an agent would run")
    preview.add_argument("name")
    preview.add_argument("-n", type=int, default=5, help="number of parameter sets")
    args = parser.parse_args(argv)
    try:
        if args.action == "check":
            for name in args.names or sweep_names():
                sweep = load(name)
                size = grid_size(sweep)
                print(f"{name}: {sweep['method']}" + (f", {size} runs" if size else "") + ", ok")
        else:
            sweep = load(args.name)
            for parameters in sample(sweep, args.n):
                print(" ".join(agent_command(sweep, parameters)))
    except SweepConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
