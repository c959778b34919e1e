"""Every W&B sweep file runs through our CLI exactly as an agent would run it, without a W&B server: its
parameter sets are sampled as the sweep server samples them, turned into the agent's command line, parsed by
our CLI (an unknown key or a value of the wrong type fails) and one of them trains a fast_dev_run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ssl_lightning.cli import SSLCLI
from ssl_lightning.sweeps import (
    SweepConfigError,
    agent_arguments,
    agent_command,
    cli_arguments,
    grid_size,
    load,
    sample,
    sweep_names,
    validate,
)
from tests.helpers import REPO, read_results, run_cli, tiny_overrides

# Data sizes a sweep sets for the real datasets, shrunk to what the generated files hold.
_TINY_DATA_SIZES = {"data.val_size": "--data.val_size=10", "data.val_per_class": "--data.val_per_class=1"}
RANDOM_SETS = 4


class _ParseOnlyCLI(SSLCLI):
    """Our CLI up to and including parsing: what an agent's command line is checked against."""

    def instantiate_classes(self) -> None:
        pass


def _experiment(sweep: dict[str, Any]) -> str:
    command = sweep["command"]
    return Path(command[command.index("--config") + 1]).stem


def _config_key(parameter: str) -> str:
    """Where a sweep parameter lands in the parsed config (model and data arguments sit under init_args)."""
    group, _, rest = parameter.partition(".")
    return f"{group}.init_args.{rest}" if group in ("model", "data") and rest else parameter


def _parsed_value(config: Any, key: str) -> Any:
    """The parsed value at a dotted key; the tail of the key may index into a dict argument
    (``model.backbone_args.adl_drop_rate``)."""
    parts = _config_key(key).split(".")
    for split in range(len(parts), 0, -1):
        head = ".".join(parts[:split])
        if head in config:
            value = config[head]
            for part in parts[split:]:
                value = value[part]
            return value.as_dict() if hasattr(value, "as_dict") else value
    raise KeyError(key)


def _test_arguments(sweep: dict[str, Any], parameters: dict[str, Any], data_root: Path) -> list[str]:
    """The agent's arguments for our CLI, with the generated datasets in place of the real ones: the sweep's
    own values come after the shrinking overrides (so they are what is parsed), except data sizes."""
    subcommand, config_flag, config, *swept = cli_arguments(agent_command(sweep, parameters))
    assert (subcommand, config_flag) == ("fit", "--config")
    tiny = tiny_overrides(_experiment(sweep), data_root)
    sizes = [_TINY_DATA_SIZES[name] for name in parameters if name in _TINY_DATA_SIZES]
    return ["--config", str(REPO / config), *tiny, *swept, *sizes]


def test_every_method_has_a_sweep_and_the_specs_sweeps_exist() -> None:
    methods = set()
    for name in sweep_names():
        config = yaml.safe_load((REPO / "experiments" / f"{_experiment(load(name))}.yaml").read_text())
        methods.add(config["model"]["class_path"].rsplit(".", 1)[1])
    assert methods >= {"FixMatch", "InfoMatch", "SimMatch", "UWBSSL", "Collision", "InfoCAM"}
    # Named by the specs: collision §5.4, bhattacharyya §6, infomatch §3.4.
    assert {"collision_calibration", "uwbssl_cifar10_250_tau_T", "infomatch_cifar10_40_w_mi"} <= set(sweep_names())


def test_agent_arguments_are_formatted_as_the_wandb_agent_formats_them() -> None:
    utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    parameters = {"model.lr": 1e-05, "model.lr_multipliers": {"backbone.head": 10.0}, "model.w_strong": [0.25, 0.5],
                  "model.fairness_scale": "mean", "model.em_iters": 5, "data.hflip": False}
    expected = utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in parameters.items()}})["args"]
    assert agent_arguments(parameters) == expected


def test_grid_sampling_is_the_cartesian_product_and_random_draws_respect_their_ranges() -> None:
    grid = {"method": "grid", "parameters": {"a": {"values": [1, 2]}, "b": {"values": ["x", "y", "z"]},
                                             "c": {"value": 0.5}}}
    sets = sample(grid, count=100)
    assert grid_size(grid) == len(sets) == 6 and len({(s["a"], s["b"]) for s in sets}) == 6
    assert all(s["c"] == 0.5 for s in sets)
    random = {"method": "random", "parameters": {
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
        "steps": {"min": 3, "max": 5},
        "tau": {"distribution": "q_uniform", "min": 0.5, "max": 1.0, "q": 0.05},
        "name": {"values": ["a", "b"], "probabilities": [1.0, 0.0]},
    }}
    draws = sample(random, count=500, seed=1)
    lrs = [d["lr"] for d in draws]
    assert min(lrs) >= 1e-4 and max(lrs) <= 1e-1
    # Log-uniform: as many draws below the geometric midpoint (1e-2.5) as above it.
    assert 0.4 < sum(lr < 10 ** -2.5 for lr in lrs) / len(lrs) < 0.6
    assert {d["steps"] for d in draws} == {3, 4, 5} and all(isinstance(d["steps"], int) for d in draws)
    assert all(abs(d["tau"] / 0.05 - round(d["tau"] / 0.05)) < 1e-9 for d in draws)
    assert {d["name"] for d in draws} == {"a"}


@pytest.mark.parametrize("broken, message", [
    ({"method": "annealing"}, "method"),
    ({"parameters": {}}, "parameters"),
    ({"parameters": {"model.lr": {"distribution": "log_uniform_values", "min": 0.01, "max": 0.1}}}, "grid sweep needs"),
    ({"parameters": {"model.lr": {"values": [0.1, None]}}}, "null"),
    ({"command": ["python", "-m", "ssl_lightning", "fit"]}, "${args}"),
    ({"command": ["python", "-m", "ssl_lightning", "fit", "--config", "experiments/nope.yaml", "${args}"]},
     "does not exist"),
    ({"early_stop": True}, "unknown top-level"),
])
def test_invalid_sweep_files_are_refused_with_the_reason(broken: dict[str, Any], message: str) -> None:
    sweep = {**load("uwbssl_cifar10_250_tau_T"), **broken}
    with pytest.raises(SweepConfigError, match=message.replace("$", r"\$").replace("{", r"\{").replace("}", r"\}")):
        validate(sweep)


@pytest.mark.parametrize("name", sweep_names())
def test_sweep_runs_through_our_cli(name: str, fixture_data: Path, tmp_path: Path) -> None:
    sweep = load(name)
    parameter_sets = sample(sweep, count=grid_size(sweep) or RANDOM_SETS, seed=0)
    first = parameter_sets[0]
    # The first set is parsed, instantiated and trained for one step, as an agent's run would be.
    code, results = run_cli([*_test_arguments(sweep, first, fixture_data), "--trainer.fast_dev_run=1"], tmp_path)
    assert code == 0 and results is not None
    assert read_results(results)["experiment"] == _experiment(sweep)
    # Every other set must parse (unknown keys and wrong types fail) to the values the agent passed.
    parser = _ParseOnlyCLI(args=_test_arguments(sweep, first, fixture_data), run=False).parser
    for parameters in parameter_sets:
        config = parser.parse_args(_test_arguments(sweep, parameters, fixture_data))
        for key, value in parameters.items():
            if key not in ("data.val_size", "data.val_per_class"):
                parsed = _parsed_value(config, key)
                assert parsed == value, f"{name}: --{key}={value} parsed as {parsed!r}"
