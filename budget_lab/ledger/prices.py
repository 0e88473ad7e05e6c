"""Prices: what one GPU-hour cost on a cluster at a given time, from the cluster's price model.

`cluster.price.kind` (budget_lab.launch.cluster.PriceConfig) decides:

- `fixed`: an internal rate (`usd_per_gpu_hour`), also a local machine's $/hour (0 allowed);
- `on_demand`: the catalog rate with its `catalog_date`;
- `spot`: the AWS spot price history of `cluster.instance_type` in `cluster.region` (boto3
  `describe_spot_price_history`), applied interval by interval over a segment: a segment that
  spans a price change pays each price for the time it was in force. Instance prices are turned
  into $/GPU-hour by `gpus_per_instance` (default: the cluster's gpus_per_node). Without an
  `availability_zone` the mean over the region's zones at each instant is charged (a node can be
  in any of them). The history is cached
  under the workspace's `cache/prices/<region>/<instance type>.json`. When AWS cannot be asked
  (no credentials, no network, an error), a warning says so and the catalog `usd_per_gpu_hour`
  is charged, marked as an estimate; a later sync that reaches AWS replaces it.

Credentials come only from boto3's usual places (environment, ~/.aws, an instance role); nothing
here writes them anywhere.

    book = PriceBook(cache_dir=workspace.prices_cache_dir)
    priced = book.price(cluster, start=t0, seconds=3600, gpus=8)
    priced.cost_usd, priced.source, priced.estimate
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from budget_lab.errors import ConfigError
from budget_lab.io import atomic_write_json

__all__ = [
    "PriceModel",
    "ClusterLike",
    "PricePiece",
    "Priced",
    "PriceBook",
    "SpotHistory",
    "price_steps",
    "catalog_time",
]

log = logging.getLogger("budget_lab.ledger")

SOURCE_FIXED = "fixed"
SOURCE_ON_DEMAND = "on-demand catalog"
SOURCE_SPOT = "aws spot history"
SOURCE_SPOT_ESTIMATE = "spot catalog (estimate)"


class PriceModel(Protocol):
    """The fields of `budget_lab.launch.cluster.PriceConfig` the ledger reads."""

    kind: str  # fixed | on_demand | spot
    usd_per_gpu_hour: float  # fixed rate, catalog rate, or the spot catalog fallback
    catalog_date: Any  # when the catalog figure was taken (str / date), or None
    on_demand_usd_per_gpu_hour: float | None  # the on-demand rate, for spot-vs-on-demand figures
    gpus_per_instance: int | None  # instance-hour price / this = $/GPU-hour; None = gpus_per_node
    availability_zone: str | None  # spot: one zone's history; None = the mean over the zones
    product_description: str  # spot: e.g. "Linux/UNIX"


class ClusterLike(Protocol):
    """The fields of `budget_lab.launch.cluster.ClusterConfig` the ledger reads."""

    name: str
    executor: str  # "slurm" or "local"
    gpu_type: str | None
    gpus_per_node: int
    capacity: str | None
    region: str | None
    instance_type: str | None
    price: PriceModel


@dataclass(frozen=True)
class PricePiece:
    """A stretch of time at one price."""

    start: float
    end: float
    usd_per_gpu_hour: float


@dataclass(frozen=True)
class Priced:
    """What a segment cost and where the price came from."""

    cost_usd: float
    usd_per_gpu_hour: float  # effective (time-weighted) price
    source: str
    price_time: float | None  # when the price was observed (history fetch / catalog date)
    estimate: bool  # True: a catalog fallback because the real price could not be had
    pieces: tuple[PricePiece, ...]  # the price in force over the priced span
    gpus: int

    def cost_between(self, t0: float, t1: float) -> float:
        """Dollars of the part of the priced span between t0 and t1 (e.g. work lost)."""
        total = 0.0
        for piece in self.pieces:
            overlap = min(piece.end, t1) - max(piece.start, t0)
            if overlap > 0:
                total += overlap / 3600 * piece.usd_per_gpu_hour * self.gpus
        return total


def catalog_time(value: Any) -> float | None:
    """A catalog date (YAML date, ISO string, epoch number) as epoch seconds at UTC midnight."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp()
    try:
        return catalog_time(date.fromisoformat(str(value)[:10]))
    except ValueError:
        return None


def _flat(
    start: float,
    seconds: float,
    gpus: int,
    rate: float,
    source: str,
    at: float | None,
    estimate: bool,
) -> Priced:
    return Priced(
        cost_usd=gpus * seconds / 3600 * rate,
        usd_per_gpu_hour=rate,
        source=source,
        price_time=at,
        estimate=estimate,
        pieces=(PricePiece(start, start + seconds, rate),),
        gpus=gpus,
    )


def price_steps(records: Sequence[dict[str, Any]], zone: str | None) -> list[tuple[float, float]]:
    """History records [{"az", "time", "usd"}] -> the price step function [(since, usd/instance-h)]
    for `zone`, or the mean over the zones with a price in force at each instant when zone is
    None."""
    by_zone: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if zone is None or r["az"] == zone:
            by_zone.setdefault(r["az"], []).append((float(r["time"]), float(r["usd"])))
    for rows in by_zone.values():
        rows.sort()
    steps: list[tuple[float, float]] = []
    for t in sorted({t for rows in by_zone.values() for t, _ in rows}):
        in_force = []
        for rows in by_zone.values():
            i = bisect.bisect_right(rows, (t, float("inf"))) - 1
            if i >= 0:
                in_force.append(rows[i][1])
        price = sum(in_force) / len(in_force)
        if not steps or steps[-1][1] != price:
            steps.append((t, price))
    return steps


def _piecewise(
    steps: list[tuple[float, float]], start: float, end: float, per_gpu: float
) -> list[PricePiece]:
    """Split [start, end] at the steps' change times; before the first record, its price holds."""
    times = [t for t, _ in steps]
    i = max(bisect.bisect_right(times, start) - 1, 0)
    pieces = []
    t0 = start
    while True:
        nxt = steps[i + 1][0] if i + 1 < len(steps) else None
        t1 = end if nxt is None or nxt >= end else nxt
        pieces.append(PricePiece(t0, t1, steps[i][1] / per_gpu))
        if t1 >= end:
            return pieces
        t0, i = t1, i + 1


class SpotHistory:
    """AWS spot price history for one (region, instance type, product), cached in a JSON file."""

    def __init__(
        self,
        region: str,
        instance_type: str,
        product_description: str = "Linux/UNIX",
        *,
        cache_dir: Path | None = None,
        client: Any = None,
        now: Callable[[], float] = time.time,
    ):
        self.region = region
        self.instance_type = instance_type
        self.product_description = product_description
        self.cache_path = (
            Path(cache_dir) / region / f"{instance_type}.json" if cache_dir is not None else None
        )
        self._client = client
        self._now = now
        self.records: list[dict[str, Any]] = []
        self.covered: list[list[float]] = []  # merged [start, end] intervals already fetched
        self.fetched_at: float | None = None
        self._load()

    def _load(self) -> None:
        if self.cache_path is None or not self.cache_path.is_file():
            return
        try:
            data = json.loads(self.cache_path.read_text())
            if data.get("product_description") != self.product_description:
                return
            self.records = list(data["records"])
            self.covered = [list(iv) for iv in data["covered"]]
            self.fetched_at = data.get("fetched_at")
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring the unreadable spot price cache %s", self.cache_path)

    def _save(self) -> None:
        if self.cache_path is None:
            return
        atomic_write_json(
            self.cache_path,
            {
                "region": self.region,
                "instance_type": self.instance_type,
                "product_description": self.product_description,
                "fetched_at": self.fetched_at,
                "covered": self.covered,
                "records": self.records,
            },
        )

    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "ec2",
                region_name=self.region,
                config=Config(
                    connect_timeout=5,
                    read_timeout=20,
                    retries={"max_attempts": 3, "mode": "standard"},
                ),
            )
        return self._client

    def _is_covered(self, start: float, end: float, slack_s: float = 0.0) -> bool:
        return any(a <= start and end <= b + slack_s for a, b in self.covered)

    def steps(
        self, start: float, end: float, zone: str | None, *, slack_s: float = 0.0
    ) -> list[tuple[float, float]]:
        """The price steps covering [start, end], fetching from AWS what the cache lacks.

        `slack_s`: for a segment still running, a history that stops this short of `end` is
        good enough (the last price is taken to hold), so that a controller syncing every few
        seconds does not ask AWS every time. Raises botocore errors when AWS cannot be asked."""
        if not self._is_covered(start, end, slack_s):
            self._fetch(start, end)
        return price_steps(self.records, zone)

    def _fetch(self, start: float, end: float) -> None:
        now = self._now()
        # AWS answers with the changes inside [start, end] plus the price in force at start.
        kwargs: dict[str, Any] = {
            "InstanceTypes": [self.instance_type],
            "ProductDescriptions": [self.product_description],
            "StartTime": datetime.fromtimestamp(start, tz=timezone.utc),
            "EndTime": datetime.fromtimestamp(max(end, start), tz=timezone.utc),
        }
        paginator = self.client().get_paginator("describe_spot_price_history")
        seen = {(r["az"], r["time"]) for r in self.records}
        for page in paginator.paginate(**kwargs):
            for item in page.get("SpotPriceHistory", []):
                stamp = item["Timestamp"]
                t = stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)
                row = {"az": item["AvailabilityZone"], "time": t, "usd": float(item["SpotPrice"])}
                if (row["az"], row["time"]) not in seen:
                    seen.add((row["az"], row["time"]))
                    self.records.append(row)
        self.records.sort(key=lambda r: (r["time"], r["az"]))
        # What is known now: up to the end asked for, but never past the moment of asking.
        self._cover(start, min(end, now))
        self.fetched_at = now
        self._save()

    def _cover(self, start: float, end: float) -> None:
        intervals = sorted([*self.covered, [start, end]])
        merged: list[list[float]] = []
        for a, b in intervals:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.covered = merged


class PriceBook:
    """Prices segments for clusters; one per sync (it warns once per AWS failure, not per row)."""

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        *,
        client_factory: Callable[[str], Any] | None = None,
        now: Callable[[], float] = time.time,
        refresh_s: float = 600.0,
    ):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.refresh_s = refresh_s  # how stale a spot history may be for a running segment
        self._client_factory = client_factory  # region -> boto3 EC2 client (tests: a stubbed one)
        self._now = now
        self._histories: dict[tuple[str, str, str], SpotHistory] = {}
        self._failed: dict[tuple[str, str, str], str] = {}
        self.warnings: list[str] = []

    def price(
        self, cluster: ClusterLike, start: float, seconds: float, gpus: int, *, live: bool = False
    ) -> Priced:
        """Price `gpus` GPUs held for `seconds` from `start` on `cluster`. `live`: the segment is
        still running (a spot history up to `refresh_s` old is used as is)."""
        p = cluster.price
        kind = getattr(p, "kind", None)
        at = catalog_time(getattr(p, "catalog_date", None))
        if kind == "fixed":
            return _flat(start, seconds, gpus, float(p.usd_per_gpu_hour), SOURCE_FIXED, at, False)
        if kind == "on_demand":
            rate = float(p.usd_per_gpu_hour)
            return _flat(start, seconds, gpus, rate, SOURCE_ON_DEMAND, at, False)
        if kind == "spot":
            return self._spot(cluster, start, seconds, gpus, live)
        raise ConfigError(
            f"cluster {cluster.name!r}: price.kind={kind!r} is invalid; expected fixed, on_demand "
            "or spot"
        )

    def _spot(
        self, cluster: ClusterLike, start: float, seconds: float, gpus: int, live: bool
    ) -> Priced:
        p = cluster.price
        fallback = float(p.usd_per_gpu_hour)
        at = catalog_time(getattr(p, "catalog_date", None))
        region, itype = cluster.region, cluster.instance_type
        product = getattr(p, "product_description", None) or "Linux/UNIX"
        if not region or not itype:
            self._warn_once(
                f"cluster {cluster.name!r} has spot pricing but no region/instance_type: charging "
                f"the catalog ${fallback:.4f}/GPU-hour as an estimate; set region and "
                "instance_type in its clusters/*.yaml",
            )
            return _flat(start, seconds, gpus, fallback, SOURCE_SPOT_ESTIMATE, at, True)
        key = (region, itype, product)
        if key in self._failed:
            return _flat(start, seconds, gpus, fallback, SOURCE_SPOT_ESTIMATE, at, True)
        history = self._histories.get(key)
        if history is None:
            client = self._client_factory(region) if self._client_factory else None
            history = SpotHistory(
                region, itype, product, cache_dir=self.cache_dir, client=client, now=self._now
            )
            self._histories[key] = history
        end = start + seconds
        try:
            slack = self.refresh_s if live else 0.0
            steps = history.steps(start, end, getattr(p, "availability_zone", None), slack_s=slack)
        except Exception as err:  # botocore: no credentials, no network, an AWS error
            if not _is_aws_error(err):
                raise
            self._failed[key] = f"{type(err).__name__}: {err}"
            self._warn_once(
                f"could not read the AWS spot price history of {itype} in {region} "
                f"({type(err).__name__}: {err}); charging the catalog ${fallback:.4f}/GPU-hour of "
                f"cluster {cluster.name!r} instead, marked as an estimate in the ledger. Make AWS "
                "credentials available (aws configure, AWS_PROFILE) and run `budget-lab cost "
                "sync` again to reprice",
            )
            return _flat(start, seconds, gpus, fallback, SOURCE_SPOT_ESTIMATE, at, True)
        if not steps:
            self._failed[key] = "empty history"
            self._warn_once(
                f"AWS has no spot price history for {itype} ({product}) in {region}"
                f"{' zone ' + p.availability_zone if getattr(p, 'availability_zone', None) else ''}"
                f": charging the catalog ${fallback:.4f}/GPU-hour as an estimate; check the "
                "cluster's instance_type, region and availability_zone",
            )
            return _flat(start, seconds, gpus, fallback, SOURCE_SPOT_ESTIMATE, at, True)
        per_instance = getattr(p, "gpus_per_instance", None) or cluster.gpus_per_node or 1
        per_gpu = max(int(per_instance), 1)
        pieces = tuple(_piecewise(steps, start, end, per_gpu))
        cost = sum((pc.end - pc.start) / 3600 * pc.usd_per_gpu_hour for pc in pieces) * gpus
        rate = (
            cost / (gpus * seconds / 3600)
            if seconds > 0 and gpus > 0
            else pieces[0].usd_per_gpu_hour
        )
        return Priced(
            cost_usd=cost,
            usd_per_gpu_hour=rate,
            source=SOURCE_SPOT,
            price_time=history.fetched_at,
            estimate=False,
            pieces=pieces,
            gpus=gpus,
        )

    def _warn_once(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            log.warning(message)


def _is_aws_error(err: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(err, (BotoCoreError, ClientError))
