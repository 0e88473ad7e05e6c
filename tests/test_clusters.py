"""Clusters: the shipped YAMLs load, bad files are ConfigErrors that say how to fix them, and
`budget-lab clusters list/show` work."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from budget_lab.cli import main
from budget_lab.errors import ConfigError
from budget_lab.launch.cluster import (
    CLUSTERS_DIR,
    ClusterConfig,
    PriceConfig,
    SlurmConfig,
    cluster_from_dict,
    cluster_to_dict,
    list_clusters,
    load_cluster,
)

_SLURM_YAML = """\
executor: slurm
gpu_type: A100-80GB
gpus_per_node: 8
capacity: owned
slurm:
  partition: gpu
price:
  kind: fixed
  usd_per_gpu_hour: 1.5
"""


def _write(tmp_path, text: str, name: str = "mine.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _error(name_or_path, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        load_cluster(str(name_or_path), list(overrides))
    return str(err.value)


# ------------------------------------------------------------------------------------------
# The shipped clusters
# ------------------------------------------------------------------------------------------


def test_shipped_clusters_load_and_round_trip():
    assert {"local", "slurm-local", "aws-p5", "onprem-a100"} <= set(list_clusters())
    for name in list_clusters():
        cluster = load_cluster(name)
        assert cluster.name == name
        assert cluster.time_limit_min >= 2880  # long limits: a preemption is not a timeout
        assert cluster_from_dict(cluster_to_dict(cluster)) == cluster
        assert yaml.safe_load(yaml.safe_dump(cluster_to_dict(cluster))) == cluster_to_dict(cluster)


def test_local_and_slurm_local_match_this_machine_and_the_test_slurm():
    local = load_cluster("local")
    assert (local.executor, local.gpu_type, local.gpus_per_node, local.slurm) == (
        "local",
        "cpu",
        0,
        None,
    )
    assert local.price == PriceConfig(kind="fixed", usd_per_gpu_hour=0.10)
    test_slurm = load_cluster("slurm-local")
    assert test_slurm.executor == "slurm" and test_slurm.slurm.partition == "debug"
    assert (test_slurm.gpu_type, test_slurm.gpus_per_node, test_slurm.capacity) == (
        "fake-gpu",
        8,
        "owned",
    )


def test_aws_p5_is_priced_from_spot_history_with_the_dated_catalog_fallback():
    p5 = load_cluster("aws-p5")
    assert (p5.capacity, p5.region, p5.instance_type, p5.slurm.partition) == (
        "spot",
        "us-east-1",
        "p5.48xlarge",
        "spot",
    )
    assert p5.price.kind == "spot" and p5.price.gpus_per_instance == 8
    assert p5.price.on_demand_usd_per_gpu_hour == pytest.approx(98.32 / 8, abs=0.005)
    assert p5.price.usd_per_gpu_hour <= p5.price.on_demand_usd_per_gpu_hour
    assert p5.price.catalog_date == "2024-06-01"  # an unquoted YAML date stays text


def test_overrides_apply_before_validation():
    spot = load_cluster("slurm-local", ["slurm.partition=spot", "max_requeues=3"])
    assert spot.slurm.partition == "spot" and spot.max_requeues == 3
    extra = load_cluster("onprem-a100", ["slurm.setup=[module load cuda/12.1]"])
    assert extra.slurm.setup == ["module load cuda/12.1"]
    assert "price.kind='reserved'" in _error("slurm-local", ["price.kind=reserved"])
    assert "not key=value" in _error("slurm-local", ["partition"])


def test_a_file_by_path_takes_its_name_from_the_file(tmp_path, monkeypatch):
    cluster = load_cluster(str(_write(tmp_path, _SLURM_YAML, "site-a.yaml")))
    assert cluster.name == "site-a" and cluster.slurm == SlurmConfig(partition="gpu")
    assert cluster.max_nodes == 1 and cluster.time_limit_min == 4320  # documented defaults
    monkeypatch.setenv("BL_TEST_ACCOUNT", "proj-7")
    path = _write(
        tmp_path, _SLURM_YAML.replace("gpu\n", "gpu\n  account: ${oc.env:BL_TEST_ACCOUNT}\n")
    )
    assert load_cluster(str(path)).slurm.account == "proj-7"


def test_spot_gpus_per_instance_defaults_to_the_node():
    p5 = load_cluster("aws-p5", ["price.gpus_per_instance=null"])
    assert p5.price.gpus_per_instance == 8


# ------------------------------------------------------------------------------------------
# Bad files: each error names the bad key or value and lists what is valid
# ------------------------------------------------------------------------------------------


def test_unknown_cluster_name_lists_the_valid_ones_and_how_to_add_one():
    msg = _error("no-such-cluster")
    assert "no-such-cluster" in msg
    for name in list_clusters():
        assert name in msg
    assert "clusters/README.md" in msg and str(CLUSTERS_DIR) in msg


@pytest.mark.parametrize(
    "section,key,valid",
    [
        ("", "partition", "executor, description, gpu_type"),  # a slurm key at the top level
        ("slurm", "gres", "partition, account, qos"),
        ("price", "currency", "kind, usd_per_gpu_hour, catalog_date"),
    ],
)
def test_unknown_key_lists_the_valid_keys(tmp_path, section, key, valid):
    data = yaml.safe_load(_SLURM_YAML)
    (data[section] if section else data)[key] = "x"
    msg = _error(_write(tmp_path, yaml.safe_dump(data)))
    assert f"unknown key '{f'{section}.' if section else ''}{key}'" in msg
    assert valid in msg


def test_slurm_executor_needs_a_partition(tmp_path):
    msg = _error(_write(tmp_path, _SLURM_YAML.replace("  partition: gpu\n", "  account: a\n")))
    assert "slurm.partition" in msg and "missing" in msg
    msg = _error(_write(tmp_path, _SLURM_YAML.replace("slurm:\n  partition: gpu\n", "")))
    assert "needs a slurm section" in msg and "partition" in msg


@pytest.mark.parametrize(
    "override,needle",
    [
        ("capacity=preemptible", "expected one of on-demand, spot, owned"),
        ("price.kind=reserved", "expected one of fixed, on_demand, spot"),
        ("executor=kubernetes", "expected one of local, slurm"),
        ("gpus_per_node=eight", "gpus_per_node='eight' is invalid: expected an integer"),
        ("gpus_per_node=0", "gpu_type 'cpu'"),
        ("price.usd_per_gpu_hour=-2", "expected a price >= 0"),
        ("price.catalog_date=2024-13-01", "expected a date YYYY-MM-DD"),
        ("price.kind=spot", "a spot price needs capacity 'spot'"),
        ("slurm.additional={partition: x}", "set it with slurm.partition instead"),
        ("signal_delay_s=999999", "expected 0 .. time_limit_min * 60"),
    ],
)
def test_bad_values_name_the_key_and_the_valid_choices(tmp_path, override, needle):
    path = _write(tmp_path, _SLURM_YAML)
    assert needle in _error(path, [override])


def test_spot_price_needs_region_and_instance_type(tmp_path):
    text = _SLURM_YAML.replace("capacity: owned", "capacity: spot").replace("fixed", "spot")
    msg = _error(_write(tmp_path, text))
    assert "region" in msg and "instance_type" in msg and "us-east-1" in msg
    ok = load_cluster(
        str(_write(tmp_path, text + "region: us-east-1\ninstance_type: p4d.24xlarge\n"))
    )
    assert ok.price.gpus_per_instance == 8
    az = _error(
        _write(tmp_path, text + "region: us-east-1\ninstance_type: p4d.24xlarge\n"),
        ["price.availability_zone=eu-west-1a"],
    )
    assert "expected a zone of region 'us-east-1'" in az


def test_check_request_refuses_more_than_a_node_or_the_cluster_has():
    cluster = load_cluster("slurm-local")
    cluster.check_request(nodes=1, gpus_per_node=8)
    cluster.check_request(nodes=1, gpus_per_node=0)
    with pytest.raises(ConfigError, match="more GPUs than a node has: .* has 8 x fake-gpu"):
        cluster.check_request(nodes=1, gpus_per_node=9)
    with pytest.raises(ConfigError, match=r"nodes=2 is invalid: expected 1 \.\. 1"):
        cluster.check_request(nodes=2, gpus_per_node=1)
    with pytest.raises(ConfigError, match="has no GPUs"):
        load_cluster("local").check_request(nodes=1, gpus_per_node=1)


def test_dataclasses_validate_on_construction():
    price = PriceConfig(kind="fixed", usd_per_gpu_hour=1.0)
    with pytest.raises(ConfigError, match="slurm"):
        ClusterConfig(
            name="x", executor="slurm", gpu_type="H100", gpus_per_node=8, capacity="owned",
            price=price,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="slurm.partition"):
        SlurmConfig(partition=" ")
    with pytest.raises(ConfigError, match="only a spot price has an availability zone"):
        PriceConfig(kind="fixed", usd_per_gpu_hour=1.0, availability_zone="us-east-1a")


def test_broken_yaml_is_a_config_error(tmp_path):
    assert "not valid YAML" in _error(_write(tmp_path, "executor: [slurm\n"))
    assert "must hold a mapping" in _error(_write(tmp_path, "- a\n- b\n"))
    # ${...} is OmegaConf interpolation: a shell variable in setup must be escaped (or $VAR).
    shell = _SLURM_YAML.replace(
        "  partition: gpu\n", "  partition: gpu\n  setup:\n  - cd ${WORK}\n"
    )
    assert "write \\${...} or $VAR" in _error(_write(tmp_path, shell))
    escaped = load_cluster(str(_write(tmp_path, shell.replace("${WORK}", "\\${WORK}"))))
    assert escaped.slurm.setup == ["cd ${WORK}"]


# ------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------


def test_cli_list_shows_every_cluster_with_its_price(capsys):
    assert main(["clusters", "list"]) == 0
    out = capsys.readouterr().out
    for name in list_clusters():
        assert name in out
    assert "8 x H100" in out and "$0.10/h fixed" in out and "$12.29/GPU-h" in out
    assert main(["clusters", "list", "--json"]) == 0
    import json

    names = [c["name"] for c in json.loads(capsys.readouterr().out)]
    assert names == list_clusters()


def test_cli_show_prints_the_resolved_yaml(capsys, tmp_path):
    assert main(["clusters", "show", "slurm-local", "--set", "slurm.partition=spot"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["slurm"]["partition"] == "spot" and shown["price"]["kind"] == "fixed"
    assert cluster_from_dict(shown) == load_cluster("slurm-local", ["slurm.partition=spot"])
    assert main(["clusters", "show", str(_write(tmp_path, _SLURM_YAML))]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "mine"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["clusters", "show", "no-such-cluster"], "valid clusters: "),
        (["clusters", "show", "local", "--set", "max_nodes=2"], "max_nodes=2 is invalid"),
    ],
)
def test_cli_user_mistakes_exit_2_without_a_traceback(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("budget-lab: error: ") and needle in err
    assert "Traceback" not in err
