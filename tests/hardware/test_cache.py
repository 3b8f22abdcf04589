"""The result cache on a real sqlite file: round trips, keys, upserts, failures, concurrent writers."""

import dataclasses
import multiprocessing

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from nas.errors import UserError
from nas.hardware.cache import CACHE_FILE, Measurement, ResultCache
from nas.hardware.fingerprint import Fingerprint
from nas.hardware.measure import Latency, MeasureResult
from nas.hardware.target import Target

FINGERPRINT = Fingerprint(
    cpu_model="Test CPU", cores=2, machine="x86_64", system="Linux", torch_version="2.14.1", threads=1
)
TARGET = Target.parse("cpu:threads=1,batch=1")
FAILED = MeasureResult(ok=False, error="out of memory: tried to allocate 9 GiB")


def ok(median_ms: float = 12.5) -> MeasureResult:
    latency = Latency(
        median_ms=median_ms, p10_ms=median_ms - 0.5, p90_ms=median_ms + 1.0, mean_ms=median_ms + 0.1,
        std_ms=0.4, cv=0.4 / (median_ms + 0.1), repeats=57, warmup=8, ci_rel=0.009, backend="eager",
    )  # fmt: skip
    return MeasureResult(ok=True, latency=latency)


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'cache.sqlite'}"


@pytest.fixture
def cache(url):
    cache = ResultCache(url)
    yield cache
    cache.close()


def test_put_get_round_trip_survives_reopening(cache, url):
    cache.put("arch-a", FINGERPRINT, TARGET, ok())
    assert cache.get("arch-a", FINGERPRINT, TARGET) == ok()
    reopened = ResultCache(url)
    assert reopened.get("arch-a", FINGERPRINT, TARGET) == ok()
    reopened.close()


def test_latency_fields_are_columns_and_the_record_is_complete(cache, url):
    cache.put("arch-a", FINGERPRINT, TARGET, ok(7.0))
    with Session(create_engine(url)) as session:
        row = session.scalars(select(Measurement)).one()
    assert (row.fingerprint, row.target_key, row.status, row.error) == (
        FINGERPRINT.digest(), TARGET.key(), "ok", None,
    )  # fmt: skip
    assert (row.median_ms, row.p10_ms, row.p90_ms, row.repeats) == (7.0, 6.5, 8.0, 57)
    assert row.record["fingerprint"] == FINGERPRINT.to_dict()
    assert row.record["target"] == str(TARGET)
    assert row.created_at is not None


@pytest.mark.parametrize(
    "other",
    [
        {"arch_hash": "arch-b"},
        {"fingerprint": dataclasses.replace(FINGERPRINT, threads=2)},
        {"fingerprint": dataclasses.replace(FINGERPRINT, cpu_model="Other CPU")},
        {"target": Target.parse("cpu:threads=1,batch=8")},
        {"target": Target.parse("cpu:threads=1,batch=1,backend=compile")},
    ],
)
def test_each_key_part_separates_results(cache, other):
    key = {"arch_hash": "arch-a", "fingerprint": FINGERPRINT, "target": TARGET}
    cache.put(**key, result=ok(10.0))
    assert cache.get(**{**key, **other}) is None
    cache.put(**{**key, **other}, result=ok(20.0))
    assert cache.get(**key).latency.median_ms == 10.0
    assert cache.get(**{**key, **other}).latency.median_ms == 20.0
    assert cache.stats()["total"] == 2


def test_put_is_an_idempotent_upsert(cache):
    cache.put("arch-a", FINGERPRINT, TARGET, ok(10.0))
    cache.put("arch-a", FINGERPRINT, TARGET, ok(10.0))
    assert cache.stats()["total"] == 1
    cache.put("arch-a", FINGERPRINT, TARGET, ok(11.0))
    assert cache.stats()["total"] == 1
    assert cache.get("arch-a", FINGERPRINT, TARGET) == ok(11.0)


def test_failures_are_stored_and_can_be_skipped(cache):
    cache.put("arch-oom", FINGERPRINT, TARGET, FAILED)
    assert cache.get("arch-oom", FINGERPRINT, TARGET) == FAILED
    assert cache.get("arch-oom", FINGERPRINT, TARGET, include_failed=False) is None
    cache.put("arch-ok", FINGERPRINT, TARGET, ok())
    assert cache.stats() == {
        "total": 2, "ok": 1, "failed": 1, "architectures": 2, "fingerprints": 1, "targets": 1,
    }  # fmt: skip


def test_a_failure_never_replaces_a_success_but_a_success_replaces_a_failure(cache):
    cache.put("arch-a", FINGERPRINT, TARGET, ok())
    cache.put("arch-a", FINGERPRINT, TARGET, FAILED)
    assert cache.get("arch-a", FINGERPRINT, TARGET) == ok()
    cache.put("arch-b", FINGERPRINT, TARGET, FAILED)
    cache.put("arch-b", FINGERPRINT, TARGET, ok())
    assert cache.get("arch-b", FINGERPRINT, TARGET) == ok()


def test_default_cache_is_a_sqlite_file_in_the_workspace(tmp_path):
    cache = ResultCache(workspace=tmp_path / "runs")
    cache.put("arch-a", FINGERPRINT, TARGET, ok())
    cache.close()
    assert (tmp_path / "runs" / CACHE_FILE).is_file()


def test_a_bad_url_is_a_user_error():
    with pytest.raises(UserError, match="bad cache URL 'not a url'"):
        ResultCache("not a url")


KEYS = 25  # each writer puts KEYS shared keys and KEYS keys of its own


def _writer(url: str, name: str, start) -> None:
    start.wait()  # both processes create the table and write at the same time
    cache = ResultCache(url)
    for i in range(KEYS):
        cache.put(f"shared-{i}", FINGERPRINT, TARGET, ok(float(i + 1)))
        cache.put(f"{name}-{i}", FINGERPRINT, TARGET, FAILED if i % 5 == 0 else ok())
    cache.close()


def test_concurrent_writers_in_two_processes(url):
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    writers = [context.Process(target=_writer, args=(url, name, start)) for name in ("p0", "p1")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    cache = ResultCache(url)
    stats = cache.stats()
    assert stats["total"] == 3 * KEYS
    assert stats["failed"] == 2 * (KEYS // 5)
    assert all(cache.get(f"shared-{i}", FINGERPRINT, TARGET) == ok(float(i + 1)) for i in range(KEYS))
    cache.close()
