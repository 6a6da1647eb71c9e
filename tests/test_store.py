"""The job-state Store contract, run against MemoryStore and against EtcdStore on a real etcd started
on loopback (ports picked by binding port 0), plus what only etcd gives: state that outlives the
coordinator's process, and a store that carries on after etcd itself restarts."""

from __future__ import annotations

import itertools
import json
import re
import time

import pytest

from conftest import free_port, needs_etcd
from hyrun.runtime.coordinator.server import open_store
from hyrun.runtime.coordinator.store import MemoryStore

_prefixes = itertools.count()


@pytest.fixture(params=["memory", "etcd"])
def store(request):
    if request.param == "memory":
        store = MemoryStore()
    else:
        from hyrun.runtime.coordinator.etcd_store import EtcdStore

        server = request.getfixturevalue("etcd_server")
        # A prefix of its own per test: the module shares one etcd, tests must not see each other.
        store = EtcdStore("127.0.0.1", server.client_port, prefix=f"/hyrun-test/{next(_prefixes)}/", timeout_s=5)
    yield store
    store.close()


# ---------------------------------------------------------------------------------------- contract


@pytest.mark.timeout(30)
def test_get_of_a_missing_key_is_none(store):
    assert store.get("jobs/none") is None


@pytest.mark.timeout(30)
def test_put_then_get_returns_an_equal_value(store):
    value = {"state": "RUNNING", "step": 7, "loss": 2.5, "ok": True, "none": None,
             "ranks": [{"rank": 0, "node": "nöde-a"}], "nested": {"a": {"b": [1, 2.0, "x"]}}}  # fmt: skip
    store.put("jobs/j1", value)
    assert store.get("jobs/j1") == value


@pytest.mark.timeout(30)
def test_put_overwrites(store):
    store.put("jobs/j1", {"step": 1})
    store.put("jobs/j1", {"step": 2})
    assert store.get("jobs/j1") == {"step": 2}


@pytest.mark.timeout(30)
def test_values_are_copies_not_live_objects(store):
    value = {"ranks": [0, 1]}
    store.put("jobs/j1", value)
    value["ranks"].append(2)
    read = store.get("jobs/j1")
    read["ranks"].append(3)
    assert store.get("jobs/j1") == {"ranks": [0, 1]}


@pytest.mark.timeout(30)
def test_a_value_that_is_not_json_is_refused_and_nothing_is_written(store):
    with pytest.raises(TypeError):
        store.put("jobs/j1", {"nodes": {"a", "b"}})
    assert store.get("jobs/j1") is None


@pytest.mark.timeout(30)
def test_delete_removes_and_deleting_a_missing_key_is_a_no_op(store):
    store.put("jobs/j1", {"step": 1})
    store.delete("jobs/j1")
    store.delete("jobs/j1")
    assert store.get("jobs/j1") is None
    assert store.list("jobs/") == {}


@pytest.mark.timeout(30)
def test_list_returns_the_keys_under_a_prefix_in_key_order(store):
    store.put("jobs/j2", {"n": 2})
    store.put("jobs/j1/generations/1", {"g": 1})
    store.put("jobs/j1", {"n": 1})
    store.put("jobs/j1/generations/0", {"g": 0})
    store.put("nodes/a", {"alive": True})

    assert list(store.list("jobs/j1/generations/").items()) == [
        ("jobs/j1/generations/0", {"g": 0}),
        ("jobs/j1/generations/1", {"g": 1}),
    ]
    assert list(store.list("jobs/")) == ["jobs/j1", "jobs/j1/generations/0", "jobs/j1/generations/1", "jobs/j2"]
    # A prefix is a plain string prefix, not a path: "jobs/j" matches j1 and j2 alike.
    assert set(store.list("jobs/j")) == {"jobs/j1", "jobs/j1/generations/0", "jobs/j1/generations/1", "jobs/j2"}
    assert store.list("racks/") == {}
    assert set(store.list("")) == {"jobs/j1", "jobs/j1/generations/0", "jobs/j1/generations/1", "jobs/j2", "nodes/a"}


@pytest.mark.timeout(30)
def test_list_returns_every_key_when_there_are_more_than_one_response_holds(store):
    # 600 keys: more than two of EtcdStore's list pages, so paging must neither lose nor repeat a key.
    for i in range(600):
        store.put(f"jobs/j1/generations/{i:04d}", {"g": i})
    listed = store.list("jobs/j1/generations/")
    assert list(listed) == [f"jobs/j1/generations/{i:04d}" for i in range(600)]
    assert [v["g"] for v in listed.values()] == list(range(600))


# ------------------------------------------------------------------------------------- etcd only


@needs_etcd
@pytest.mark.timeout(30)
def test_a_fresh_etcd_store_reads_what_another_instance_wrote(etcd_server):
    """What a restarted coordinator relies on: its new Store finds the job the old one saved."""
    import pyetcd

    first = open_store(etcd_server.url)
    first.put("jobs/restart", {"state": "RUNNING", "generation": 3, "step": 41})
    first.put("jobs/restart/generations/3", {"rendezvous_port": 29400})
    first.close()

    second = open_store(etcd_server.url)
    try:
        assert second.get("jobs/restart") == {"state": "RUNNING", "generation": 3, "step": 41}
        assert second.list("jobs/restart/") == {"jobs/restart/generations/3": {"rendezvous_port": 29400}}
    finally:
        second.close()

    # Under the documented prefix, as JSON text: what an operator sees with `etcdctl get --prefix /hyrun/`.
    raw = pyetcd.client(host="127.0.0.1", port=etcd_server.client_port, timeout=5)
    try:
        text, _meta = raw.get("/hyrun/jobs/restart")
    finally:
        raw.close()
    assert json.loads(text) == {"state": "RUNNING", "generation": 3, "step": 41}


@needs_etcd
@pytest.mark.timeout(30)
def test_the_store_carries_on_after_etcd_restarts(own_etcd):
    from hyrun.runtime.coordinator.etcd_store import EtcdStore, EtcdUnavailable

    store = EtcdStore("127.0.0.1", own_etcd.client_port, timeout_s=3)
    try:
        store.put("jobs/j1", {"step": 5})
        own_etcd.kill()
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable, match=f"127.0.0.1:{own_etcd.client_port}"):
            store.get("jobs/j1")
        waited_s = time.monotonic() - started
        assert 2.5 < waited_s < 6, f"a dead etcd must fail the call at its 3 s deadline, took {waited_s:.1f} s"
        time.sleep(2)  # down long enough for gRPC's reconnect backoff to grow past its first steps

        own_etcd.start()  # same data dir and ports: what systemd or a StatefulSet does
        # The first call on the same instance gets through: the store waits out gRPC's reconnect
        # backoff, capped at 1 s (uncapped it grows to minutes), and pyetcd's 300 s ban on a failed
        # endpoint is off.
        started = time.monotonic()
        assert store.get("jobs/j1") == {"step": 5}
        assert time.monotonic() - started < 2.5, "the store should be back about a second after etcd"
        store.put("jobs/j1", {"step": 6})
        assert store.get("jobs/j1") == {"step": 6}
    finally:
        store.close()


@needs_etcd
@pytest.mark.timeout(30)
def test_a_value_over_etcds_request_limit_is_refused_with_the_key(etcd_server):
    store = open_store(etcd_server.url)
    try:
        with pytest.raises(ValueError, match="put jobs/huge"):
            store.put("jobs/huge", {"blob": "x" * (2 * 1024 * 1024)})
        assert store.get("jobs/huge") is None
    finally:
        store.close()


@pytest.mark.timeout(30)
def test_an_unreachable_etcd_fails_at_open_with_its_address():
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"etcd at 127.0.0.1:{port}"):
        open_store(f"etcd://127.0.0.1:{port}")
    assert time.monotonic() - started < 10


def test_a_missing_etcd_client_is_a_message_with_the_pip_line(monkeypatch):
    from hyrun.runtime.coordinator import etcd_store

    monkeypatch.setattr(etcd_store, "pyetcd", None)
    with pytest.raises(ValueError, match=re.escape(f"pip install '{etcd_store.PIP_REQUIREMENT}'")):
        open_store("etcd://127.0.0.1:2379")


@pytest.mark.parametrize(
    "url", ["etcd://host-without-port", "etcd://:2379", "etcd://h:2379/path", "redis://h:1", "memory2"]
)
def test_a_malformed_store_url_is_a_value_error(url):
    with pytest.raises(ValueError, match="store"):
        open_store(url)
