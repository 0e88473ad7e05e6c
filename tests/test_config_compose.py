"""Configs composed by Hydra: recipes that extend recipes, the user's config folder, Hydra's
override grammar with today's clear errors, and a command line that starts without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from budget_lab.cli import main
from budget_lab.config import RecipeBase, compose_run, list_recipes, recipe_path
from budget_lab.config_files import ENV_VAR, find_config
from budget_lab.errors import ConfigError
from budget_lab.launch.cluster import cluster_path, load_cluster
from budget_lab.sweep.spec import load_sweep, sweep_path

_CHILD = """\
defaults: [nano, _self_]
name: nano-dense
model: {num_experts: 0}
optim: {ema_decay: 0.9}
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A user config folder holding recipes/nano-dense.yaml, which extends the shipped nano."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "nano-dense.yaml").write_text(_CHILD)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    return tmp_path


def test_a_recipe_extends_another_through_its_defaults_list(user_dir):
    nano, dense = compose_run("nano"), compose_run("nano-dense")
    assert "nano-dense" in list_recipes() and "nano" in list_recipes()
    assert dense.name == "nano-dense" and dense.model == {"preset": "nano", "num_experts": 0}
    assert dense.optim.ema_decay == 0.9  # the recipe's own keys win (_self_ last)
    assert dense.phases == nano.phases and dense.edm == nano.edm  # the rest is nano's
    # Overrides come last, on top of both; a path outside the folders extends by name too.
    assert compose_run("nano-dense", ["model.num_experts=2"]).model["num_experts"] == 2
    copy = user_dir / "elsewhere.yaml"
    copy.write_text(_CHILD.replace("nano-dense", "copy"))
    assert compose_run(copy).model == dense.model and compose_run(copy).name == "copy"
    # An unknown parent lists the recipes there are.
    (user_dir / "recipes" / "orphan.yaml").write_text("defaults: [nanoo, _self_]\n")
    with pytest.raises(ConfigError, match="Could not load 'recipes/nanoo'.*: microdit-xl, nano"):
        compose_run("orphan")


def test_the_user_folder_is_searched_first_for_recipes_clusters_and_sweeps(user_dir):
    (user_dir / "recipes" / "nano.yaml").write_text("defaults: []\nname: mine\n")
    assert recipe_path("nano") == user_dir / "recipes" / "nano.yaml"
    assert compose_run("nano").name == "mine"
    (user_dir / "clusters").mkdir()
    (user_dir / "clusters" / "local.yaml").write_text("executor: local\n")
    assert cluster_path("local") == user_dir / "clusters" / "local.yaml"
    assert sweep_path("mask_ratio").parent.name == "sweeps"  # no user sweeps: the project's
    with pytest.raises(ConfigError, match=r"unknown sweep 'nope'; valid sweeps: .*mask_ratio"):
        find_config("sweeps", "nope")


def test_hydra_override_grammar_with_clear_errors():
    cfg = compose_run(
        "nano", ["model.mixer_depth=2", "phases.0.lr=1e-4", "model.attn_ratio=[0.25,1.0]"]
    )
    assert cfg.model == {"preset": "nano", "mixer_depth": 2, "attn_ratio": [0.25, 1.0]}
    assert cfg.phases[0].lr == 1e-4
    assert compose_run("nano", ["++seed=5"]).seed == 5
    base = RecipeBase("nano", ["model.num_experts=0"])
    assert base.compose(["~model.num_experts"]).model == {"preset": "nano"}  # back to the preset
    mistakes = {
        "+model.mixer_depth=2": "model.mixer_depth is already a config key .* write "
        "model.mixer_depth=2",
        "optim.lrr=1": "unknown config key 'optim.lrr'; valid keys under optim: weight_decay",
        "~model.dim": "does not set model.dim",
        "phases.2.steps=5": "the recipe has 2 phase.s., numbered 0..1",
        "seed=abc": "invalid config at 'seed'.*could not be converted to Integer",
        "name=a,b": "sweeps over several values",
        "phases.0.steps": "is not key=value",
        "phases.0.steps=0": r"phases\[masked-pretrain\].steps=0 is invalid: expected >= 1",
    }
    for override, message in mistakes.items():
        with pytest.raises(ConfigError, match=message):
            compose_run("nano", [override])


def test_clusters_and_sweeps_extend_others_and_take_hydra_overrides(user_dir):
    """Clusters and sweeps are Hydra config groups too: a file extends another of its group by
    its defaults list (its own keys win, its name is its own), and overrides use Hydra's
    grammar with the group's keys checked first."""
    (user_dir / "clusters").mkdir()
    (user_dir / "clusters" / "slurm-spot.yaml").write_text(
        "defaults: [slurm-local, _self_]\ncapacity: spot\nslurm: {partition: spot}\n"
    )
    base, spot = load_cluster("slurm-local"), load_cluster("slurm-spot")
    assert spot.name == "slurm-spot" and (spot.capacity, spot.slurm.partition) == ("spot", "spot")
    assert spot.price == base.price and spot.gpus_per_node == base.gpus_per_node  # inherited
    (user_dir / "clusters" / "slurm-few.yaml").write_text(
        "defaults: [slurm-local, _self_]\nmax_requeues: 2\n"
    )
    assert load_cluster("slurm-few").max_requeues == 2
    assert load_cluster("slurm-few", ["~max_requeues"]).max_requeues == 10  # the default
    assert load_cluster("slurm-spot", ["max_nodes=1"]).max_nodes == 1
    for override, message in {
        "+max_nodes=2": "max_nodes is already a config key .* write max_nodes=2",
        "slurm.partitio=x": "unknown key 'slurm.partitio' under slurm; valid keys: partition",
        "max_nodes=abc": "max_nodes='abc' is invalid: expected an integer",
        "~region": "does not set region",
    }.items():
        with pytest.raises(ConfigError, match=message):
            load_cluster("slurm-spot", [override])

    (user_dir / "sweeps").mkdir()
    (user_dir / "sweeps" / "mask_wide.yaml").write_text(
        "defaults: [mask_ratio, _self_]\nn_trials: 2\n"
    )
    parent, child = load_sweep("mask_ratio"), load_sweep("mask_wide")
    assert child.name == "mask_wide" and child.n_trials == 2
    assert load_sweep("mask_wide", ["repeats=2", "~n_trials"]).repeats == 2
    assert child.params == parent.params and child.base_overrides == parent.base_overrides
    with pytest.raises(ConfigError, match="already a config key"):
        load_sweep("mask_wide", ["+n_trials=3"])


def test_train_dry_run_plus_on_an_existing_key_fails_clearly(capsys):
    assert main(["train", "--recipe", "nano", "model.mixer_depth=2", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"] == {"preset": "nano", "mixer_depth": 2}
    assert main(["train", "--recipe", "nano", "+model.mixer_depth=2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.mixer_depth is already a config key" in err and "Traceback" not in err
    assert "write model.mixer_depth=2" in err


def test_help_does_not_import_torch():
    """`budget-lab --help` and `clusters list` start without torch (1.3 s of a 2.2 s start)."""
    code = (
        "import sys\n"
        "from budget_lab.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'hydra', 'sqlalchemy') if m in sys.modules]\n"
        "print('IMPORTED', heavy)\n"
    )
    for argv in (["--help"], ["clusters", "list", "--json"]):
        out = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True
        ).stdout
        assert "IMPORTED []" in out, (argv, out[-500:])
