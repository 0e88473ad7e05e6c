"""Prices: fixed and on-demand rates, AWS spot history charged piecewise (botocore Stubber on a
real boto3 client for exact figures; moto for the path that really calls AWS), the price cache,
the catalog fallback when AWS cannot be asked, and no secret leaking anywhere."""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from budget_lab.launch.cluster import load_cluster
from budget_lab.ledger.prices import PriceBook, catalog_time, price_steps
from budget_lab.ledger.sacct import SacctRecord
from budget_lab.ledger.store import Ledger
from budget_lab.ledger.sync import sync_run, sync_workspace
from budget_lab.workspace import Workspace

T0 = 1_795_000_000.0
HOUR = 3600.0


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def spot_cluster(zone: str | None = "us-east-1a") -> SimpleNamespace:
    """A stand-in with ClusterConfig's fields: p5.48xlarge spot, 8 GPUs per instance."""
    return SimpleNamespace(
        name="p5-spot",
        executor="slurm",
        gpu_type="H100",
        gpus_per_node=8,
        capacity="spot",
        region="us-east-1",
        instance_type="p5.48xlarge",
        slurm=SimpleNamespace(partition="spot"),
        price=SimpleNamespace(
            kind="spot",
            usd_per_gpu_hour=12.29,  # the catalog fallback
            catalog_date="2024-06-01",
            on_demand_usd_per_gpu_hour=12.29,
            gpus_per_instance=8,
            availability_zone=zone,
            product_description="Linux/UNIX",
        ),
    )


def history(*rows: tuple[str, float, str]) -> dict:
    """DescribeSpotPriceHistory response from (zone, time, $/instance-hour) rows."""
    return {
        "SpotPriceHistory": [
            {
                "AvailabilityZone": az,
                "InstanceType": "p5.48xlarge",
                "ProductDescription": "Linux/UNIX",
                "SpotPrice": price,
                "Timestamp": _utc(t),
            }
            for az, t, price in rows
        ]
    }


def stubbed_client() -> tuple[object, Stubber]:
    client = boto3.client(
        "ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    return client, Stubber(client)


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """No credentials anywhere boto3 looks (and no instance-metadata lookup)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def fake_aws_credentials(monkeypatch, no_aws_credentials):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKE1234")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-Zq9WvX3kLm8Pn2Rt6Yb4Hc7Jd1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_fixed_and_on_demand_prices_are_flat():
    book = PriceBook()
    local = SimpleNamespace(
        name="local",
        gpus_per_node=0,
        price=SimpleNamespace(kind="fixed", usd_per_gpu_hour=0.10, catalog_date=None),
    )
    priced = book.price(local, T0, seconds=1800, gpus=1)
    assert priced.cost_usd == pytest.approx(0.05) and priced.source == "fixed"
    assert not priced.estimate and priced.price_time is None
    od = SimpleNamespace(
        name="od",
        gpus_per_node=8,
        price=SimpleNamespace(kind="on_demand", usd_per_gpu_hour=6.88, catalog_date="2025-06-01"),
    )
    priced = book.price(od, T0, seconds=HOUR, gpus=8)
    assert priced.cost_usd == pytest.approx(55.04) and priced.source == "on-demand catalog"
    assert (
        priced.price_time
        == catalog_time("2025-06-01")
        == datetime(2025, 6, 1, tzinfo=timezone.utc).timestamp()
    )
    # A share of a segment (work lost since a checkpoint) is priced over that share only.
    assert priced.cost_between(T0 + 0.75 * HOUR, T0 + 2 * HOUR) == pytest.approx(55.04 / 4)


def test_a_segment_spanning_a_spot_price_change_is_charged_piecewise(tmp_path):
    # p5.48xlarge in us-east-1a: $40/instance-hour since an hour before the segment, $48 from
    # half an hour into it. The segment: 8 GPUs (one instance) for one hour from T0.
    client, stub = stubbed_client()
    stub.add_response(
        "describe_spot_price_history",
        history(
            ("us-east-1a", T0 - HOUR, "40.000000"),
            ("us-east-1a", T0 + 1800, "48.000000"),
            ("us-east-1b", T0 - HOUR, "99.000000"),
        ),  # fmt: skip
        expected_params={
            "InstanceTypes": ["p5.48xlarge"],
            "ProductDescriptions": ["Linux/UNIX"],
            "StartTime": _utc(T0),
            "EndTime": _utc(T0 + HOUR),
        },
    )
    with stub:
        book = PriceBook(
            tmp_path / "prices", client_factory=lambda region: client, now=lambda: T0 + 2 * HOUR
        )
        priced = book.price(spot_cluster("us-east-1a"), T0, seconds=HOUR, gpus=8)
        stub.assert_no_pending_responses()
    # Half an hour at $40/8 and half an hour at $48/8 per GPU, 8 GPUs: $20 + $24.
    assert priced.cost_usd == pytest.approx(44.0, abs=1e-9)
    assert priced.usd_per_gpu_hour == pytest.approx(5.5, abs=1e-12)
    assert [(p.start - T0, p.end - T0, p.usd_per_gpu_hour) for p in priced.pieces] == [
        (0.0, 1800.0, 5.0),
        (1800.0, 3600.0, 6.0),
    ]
    assert priced.source == "aws spot history" and not priced.estimate
    assert priced.price_time == T0 + 2 * HOUR
    # The last quarter hour (e.g. work lost at a preemption) is priced at $6/GPU-hour.
    assert priced.cost_between(T0 + 2700, T0 + HOUR) == pytest.approx(12.0)

    # The history is cached: a second price book asks AWS nothing for the same span.
    cache = tmp_path / "prices" / "us-east-1" / "p5.48xlarge.json"
    assert cache.is_file() and len(json.loads(cache.read_text())["records"]) == 3
    client2, stub2 = stubbed_client()  # no responses queued: any call would fail
    with stub2:
        again = PriceBook(tmp_path / "prices", client_factory=lambda region: client2)
        assert again.price(
            spot_cluster("us-east-1a"), T0 + 600, seconds=2400, gpus=4
        ).cost_usd == pytest.approx(4 * (1200 / HOUR * 5.0 + 1200 / HOUR * 6.0))


def test_a_running_segment_reuses_a_recent_history_instead_of_asking_aws_each_sync(tmp_path):
    client, stub = stubbed_client()
    rows = history(("us-east-1a", T0 - HOUR, "40.0"))
    stub.add_response("describe_spot_price_history", rows)  # the first sync
    clock = {"now": T0 + 600}
    with stub:
        book = PriceBook(tmp_path, client_factory=lambda r: client, now=lambda: clock["now"])
        book.price(spot_cluster(), T0, seconds=600, gpus=8, live=True)
        stub.assert_no_pending_responses()
        clock["now"] = T0 + 900  # 5 minutes later, still running: no new request (one would
        live = book.price(spot_cluster(), T0, seconds=900, gpus=8, live=True)  # fail: unstubbed)
        assert not live.estimate and live.cost_usd == pytest.approx(900 / HOUR * 40.0)
        stub.add_response("describe_spot_price_history", rows)
        clock["now"] = T0 + 1000  # it ended at +950: the final figure asks AWS again
        final = book.price(spot_cluster(), T0, seconds=950, gpus=8)
        stub.assert_no_pending_responses()
        assert not final.estimate


def test_without_a_zone_the_mean_over_zones_is_charged():
    records = [
        {"az": "a", "time": T0 - 10, "usd": 40.0},
        {"az": "b", "time": T0 - 5, "usd": 60.0},
        {"az": "a", "time": T0 + 100, "usd": 20.0},
    ]
    assert price_steps(records, None) == [(T0 - 10, 40.0), (T0 - 5, 50.0), (T0 + 100, 40.0)]
    assert price_steps(records, "a") == [(T0 - 10, 40.0), (T0 + 100, 20.0)]


def test_the_moto_path_calls_aws_through_boto3(fake_aws_credentials, tmp_path):
    with mock_aws():
        book = PriceBook(tmp_path / "prices")  # a real boto3 client, answered by moto
        priced = book.price(spot_cluster(None), T0, seconds=2 * HOUR, gpus=8)
    # moto's spot history: $0.00001 per instance-hour in every zone.
    assert priced.source == "aws spot history" and not priced.estimate
    assert priced.cost_usd == pytest.approx(2 * 8 * 0.00001 / 8)
    assert book.warnings == []


def test_no_credentials_falls_back_to_the_catalog_with_a_warning(
    no_aws_credentials, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="budget_lab.ledger")
    book = PriceBook(tmp_path / "prices")
    priced = book.price(spot_cluster(), T0, seconds=HOUR, gpus=8)
    assert priced.estimate and priced.source == "spot catalog (estimate)"
    assert priced.cost_usd == pytest.approx(8 * 12.29)
    book.price(spot_cluster(), T0 + HOUR, seconds=HOUR, gpus=8)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, "one warning per sync, not one per segment"
    assert "NoCredentialsError" in warnings[0] and "p5.48xlarge in us-east-1" in warnings[0]
    assert "estimate" in warnings[0] and "budget-lab cost sync" in warnings[0]


def test_aws_unreachable_falls_back_to_the_catalog(fake_aws_credentials, monkeypatch, tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    book = PriceBook(tmp_path / "prices")
    priced = book.price(spot_cluster(), T0, seconds=HOUR, gpus=8)
    assert priced.estimate and priced.cost_usd == pytest.approx(8 * 12.29)
    assert "EndpointConnectionError" in book.warnings[0]


# -- sync with spot prices, and the secrets scan ---------------------------------------------------


def _spot_run(ws: Workspace, name: str, job_id: str) -> Path:
    run = ws.run_dir(name)
    run.mkdir(parents=True)
    (run / "launch.json").write_text(
        json.dumps(
            {"run": name, "run_dir": str(run), "cluster": "aws-p5", "executor": "slurm",
             "launch_id": "20261118-000000-ab12", "job_ids": [job_id], "nodes": 1,
             "gpus_per_node": 8, "sweep": None, "trial": None, "created_at": T0}
        )
    )  # fmt: skip
    (run / "result.json").write_text(json.dumps({"status": "completed"}))
    (run / "checkpoints.jsonl").write_text(
        json.dumps({"step": 100, "phase": "pretrain", "segment": 0, "time": T0 + 1500, "path": "c"})
        + "\n"
    )
    return run


def _fake_sacct(job_ids):
    """A preempted then requeued p5 job: 30 min, then 1 h, on 8 GPUs."""
    return [
        SacctRecord("4242", "PREEMPTED", T0, T0 + 1800, 1800, 8, "spot", 1),
        SacctRecord("4242", "COMPLETED", T0 + 2000, T0 + 5600, 3600, 8, "spot", 1),
    ]


def test_spot_estimates_are_replaced_by_real_prices_and_never_the_reverse(
    no_aws_credentials, monkeypatch, tmp_path
):
    ws = Workspace(tmp_path / "ws").ensure()
    run = _spot_run(ws, "spot-run", "4242")
    cluster = load_cluster("aws-p5")
    with Ledger.for_workspace(ws) as ledger:
        first = sync_run(
            ledger, run, cluster, price_cache_dir=ws.prices_cache_dir, sacct_query=_fake_sacct
        )
        assert all(s.price_estimate for s in first)
        assert ledger.spent() == pytest.approx(1.5 * 8 * 12.29)

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKE1234")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-Zq9WvX3kLm8Pn2Rt6Yb4Hc7Jd1")
        with mock_aws():
            second = sync_run(
                ledger, run, cluster, price_cache_dir=ws.prices_cache_dir, sacct_query=_fake_sacct
            )
        assert [s.key for s in second] == [s.key for s in first]
        assert not any(s.price_estimate for s in second)
        real = ledger.spent()
        assert real == pytest.approx(1.5 * 8 * 0.00001 / 8)
        # The preempted segment lost the 5 minutes since its checkpoint at T0 + 1500 s.
        assert ledger.wasted() == pytest.approx(300 / 3600 * 8 * 0.00001 / 8)

        # AWS unreachable again, and the cache is gone: the real price in the ledger is kept.
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        for f in ws.prices_cache_dir.rglob("*.json"):
            f.unlink()
        third = sync_run(
            ledger, run, cluster, price_cache_dir=ws.prices_cache_dir, sacct_query=_fake_sacct
        )
        assert not any(s.price_estimate for s in third)
        assert ledger.spent() == pytest.approx(real)
        assert len(ledger.segments()) == 2


def test_no_secret_reaches_the_ledger_run_folders_or_logs(
    fake_aws_credentials, monkeypatch, tmp_path, capsys
):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("WANDB_API_KEY", "wandb-fake-key-0123456789abcdef0123456789abcdef")
    secrets = [secret, os.environ["WANDB_API_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    ws = Workspace(tmp_path / "ws").ensure()
    _spot_run(ws, "spot-run", "4242")
    logs = ws.root / "logs"
    logs.mkdir()
    handler = logging.FileHandler(logs / "sync.log")
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # botocore's own debug logging too
    try:
        with mock_aws(), Ledger.for_workspace(ws) as ledger:
            report = sync_workspace(ledger, ws, sacct_query=_fake_sacct)
            assert report.runs == 1 and report.inserted == 2 and not report.errors
            from budget_lab.cli import main

            assert main(["cost", "report", "--workspace", str(ws.root), "--format", "json"]) == 0
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    out = capsys.readouterr()
    (logs / "cli.log").write_text(out.out + out.err)
    assert json.loads(out.out)["total"]["segments"] == 2
    assert (ws.prices_cache_dir / "us-east-1" / "p5.48xlarge.json").is_file()

    scanned = 0
    for path in ws.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            scanned += 1
            for s in secrets:
                assert s.encode() not in data, f"a secret leaked into {path}"
    assert scanned >= 6  # ledger (+ WAL), launch.json, result.json, checkpoints, cache, logs
    assert b"DescribeSpotPriceHistory" in (logs / "sync.log").read_bytes()  # AWS was really asked
