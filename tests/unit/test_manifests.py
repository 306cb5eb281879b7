"""
The manifests source: parsing, merging and diffing (pure), and the source
itself driven by a fake clock and polling over a real temporary directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from contiv.k8s.events import ADDED, DELETED, MODIFIED, Event, EventStream, Synced
from contiv.k8s.manifests import (
    SETTLE_DELAY,
    ManifestError,
    ManifestsSource,
    diff_objects,
    merge_manifests,
    parse_manifest_file,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "manifests"


def pod(name, namespace="default", **labels):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
    }


def identities(objects):
    return [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]


# -- parsing


def test_multi_document_yaml_in_file_order():
    text = """
apiVersion: v1
kind: Namespace
metadata:
  name: prod
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: prod
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny
  namespace: prod
spec:
  podSelector: {}
"""
    objects, errors = parse_manifest_file("/some/dir/cluster.yaml", text)
    assert errors == []
    assert identities(objects) == [
        ("Namespace", None, "prod"),
        ("Pod", "prod", "web-1"),
        ("NetworkPolicy", "prod", "deny"),
    ]
    assert objects[2]["spec"] == {"podSelector": {}}


def test_null_and_empty_documents_are_skipped_but_counted():
    text = "---\n---\n# only a comment\n---\nkind: Pod\nmetadata: {name: a}\n---\nkind: Pod\n"
    objects, errors = parse_manifest_file("p.yaml", text)
    assert identities(objects) == [("Pod", "default", "a")]
    # Documents 0 and 1 are empty (the second holds only a comment).
    assert errors == [ManifestError("p.yaml", 3, "metadata.name is missing")]


def test_empty_file_has_no_objects_and_no_errors():
    assert parse_manifest_file("empty.yaml", "") == ([], [])
    assert parse_manifest_file("empty.json", "  \n") == ([], [])


def test_kind_list_is_flattened():
    text = """
apiVersion: v1
kind: List
items:
  - kind: Pod
    metadata: {name: a}
  - kind: Service
    metadata: {name: s, namespace: prod}
  - kind: ConfigMap
    metadata: {name: ignored}
"""
    objects, errors = parse_manifest_file("list.yaml", text)
    assert errors == []
    assert identities(objects) == [("Pod", "default", "a"), ("Service", "prod", "s")]


def test_list_item_errors_name_the_item():
    text = "kind: List\nitems:\n- kind: Pod\n  metadata: {name: a}\n- metadata: {name: b}\n"
    objects, errors = parse_manifest_file("list.yaml", text)
    assert errors == [ManifestError("list.yaml", 0, "items[1]: kind is missing")]
    assert str(errors[0]) == "list.yaml document 0: items[1]: kind is missing"


def test_empty_list_and_bad_items():
    assert parse_manifest_file("l.yaml", "kind: List\nitems: []\n") == ([], [])
    assert parse_manifest_file("l.yaml", "kind: List\n") == ([], [])
    _, errors = parse_manifest_file("l.yaml", "kind: List\nitems: {a: 1}\n")
    assert [e.reason for e in errors] == ["items must be a list, got dict"]


def test_json_file():
    document = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [pod("web-1", app="web"), {"kind": "Namespace", "metadata": {"name": "prod"}}],
    }
    objects, errors = parse_manifest_file("objects.json", json.dumps(document))
    assert errors == []
    assert identities(objects) == [("Pod", "default", "web-1"), ("Namespace", None, "prod")]
    assert objects[0]["metadata"]["labels"] == {"app": "web"}


def test_bad_json_reports_position():
    objects, errors = parse_manifest_file("bad.json", '{"kind": "Pod",\n "metadata": }')
    assert objects == []
    assert len(errors) == 1
    assert errors[0].file == "bad.json" and errors[0].document == 0
    assert errors[0].reason.startswith("not valid JSON: line 2")


def test_missing_kind():
    _, errors = parse_manifest_file("k.yaml", "apiVersion: v1\nmetadata: {name: a}\n")
    assert errors == [ManifestError("k.yaml", 0, "kind is missing")]


def test_missing_metadata_name_reads_like_the_issue():
    text = "kind: Pod\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {name: b}\n---\nkind: Pod\nmetadata: {labels: {a: b}}\n"
    objects, errors = parse_manifest_file("/etc/contiv/manifests/bad.yaml", text)
    assert [str(e) for e in errors] == ["bad.yaml document 2: metadata.name is missing"]
    # What parsed is returned; the caller decides a file with errors is bad.
    assert identities(objects) == [("Pod", "default", "a"), ("Pod", "default", "b")]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("kind: Pod\n", "metadata.name is missing"),
        ("kind: Pod\nmetadata: {name: ''}\n", "metadata.name is missing"),
        ("kind: Pod\nmetadata: [a]\n", "metadata must be a mapping, got a list"),
        ("kind: Pod\nmetadata: {name: 3}\n", "metadata.name must be a string, got a number"),
        ("kind: Pod\nmetadata: {name: a, namespace: [x]}\n", "metadata.namespace must be a string, got a list"),
        ("kind: [Pod]\nmetadata: {name: a}\n", "kind must be a string, got a list"),
    ],
)
def test_invalid_objects(text, reason):
    objects, errors = parse_manifest_file("x.yaml", text)
    assert objects == []
    assert errors == [ManifestError("x.yaml", 0, reason)]


def test_bad_yaml_names_the_document_and_line():
    text = "kind: Pod\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {name: b\n"
    objects, errors = parse_manifest_file("bad.yaml", text)
    assert identities(objects) == [("Pod", "default", "a")]
    assert len(errors) == 1
    assert errors[0].document == 1
    assert errors[0].reason.startswith("not valid YAML: line ")
    assert str(errors[0]).startswith("bad.yaml document 1: not valid YAML")


@pytest.mark.parametrize(
    "text, got",
    [("- a\n- b\n", "a list"), ("just a string\n", "a string"), ("42\n", "a number")],
)
def test_non_mapping_document(text, got):
    _, errors = parse_manifest_file("x.yml", "kind: Pod\nmetadata: {name: a}\n---\n" + text)
    assert errors == [ManifestError("x.yml", 1, f"expected a mapping, got {got}")]


def test_other_kinds_are_ignored_not_errors():
    text = "kind: ConfigMap\nmetadata: {name: c}\n---\nkind: Deployment\n"
    assert parse_manifest_file("x.yaml", text) == ([], [])


def test_default_namespace_and_cluster_scoped_namespace():
    text = """
kind: Pod
metadata: {name: a}
---
kind: NetworkPolicy
metadata: {name: p, namespace: ''}
---
kind: Service
metadata: {name: s, namespace: prod}
---
kind: Namespace
metadata: {name: prod, namespace: stray}
"""
    objects, errors = parse_manifest_file("x.yaml", text)
    assert errors == []
    assert identities(objects) == [
        ("Pod", "default", "a"),
        ("NetworkPolicy", "default", "p"),
        ("Service", "prod", "s"),
        ("Namespace", None, "prod"),
    ]


def test_timestamps_stay_strings():
    text = "kind: Pod\nmetadata: {name: a, creationTimestamp: 2024-05-01T10:00:00Z}\n"
    objects, _ = parse_manifest_file("x.yaml", text)
    assert objects[0]["metadata"]["creationTimestamp"] == "2024-05-01T10:00:00Z"
    json.dumps(objects)


def test_examples_parse():
    files = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        objects, errors = parse_manifest_file(str(path), path.read_text())
        assert errors == [], path
        files.append((path.name, objects))
    merged, errors = merge_manifests(files)
    assert errors == []
    assert sorted(merged) == sorted(
        [
            ("Namespace", "default"),
            ("Namespace", "prod"),
            ("Pod", "default/web-1"),
            ("Pod", "default/web-2"),
            ("Pod", "default/db-1"),
            ("Pod", "default/client-1"),
            ("Service", "default/web"),
            ("Service", "default/db"),
            ("EndpointSlice", "default/db-abc12"),
            ("NetworkPolicy", "default/default-deny-ingress"),
            ("NetworkPolicy", "default/allow-client-to-web"),
            ("NetworkPolicy", "default/allow-web-to-db"),
        ]
    )


# -- merging


def test_duplicate_across_files_keeps_the_first_by_file_name():
    first = pod("web-1", app="first")
    second = pod("web-1", app="second")
    other = pod("web-2")
    # Given in the "wrong" order: the file name decides, not the order.
    merged, errors = merge_manifests([("b.yaml", [second, other]), ("a.yaml", [first])])
    assert merged[("Pod", "default/web-1")] is first
    assert merged[("Pod", "default/web-2")] is other
    assert len(errors) == 1
    assert errors[0].file == "b.yaml"
    assert "a.yaml" in errors[0].reason and "Pod default/web-1" in errors[0].reason


def test_same_name_in_different_namespaces_or_kinds_is_no_duplicate():
    objects = [
        pod("x"),
        pod("x", namespace="prod"),
        {"kind": "Service", "metadata": {"name": "x", "namespace": "default"}},
    ]
    merged, errors = merge_manifests([("a.yaml", objects)])
    assert errors == [] and len(merged) == 3


# -- diffing


def test_diff_added_modified_deleted_and_unchanged():
    ns = {"kind": "Namespace", "metadata": {"name": "prod"}}
    a, b, c = pod("a"), pod("b"), pod("c")
    b2 = pod("b", app="new")
    old = {("Pod", "default/a"): a, ("Pod", "default/b"): b, ("Pod", "default/c"): c}
    new = {
        ("Pod", "default/a"): dict(a),
        ("Pod", "default/b"): b2,
        ("Namespace", "prod"): ns,
    }
    assert diff_objects(old, new) == [
        Event(ADDED, "Namespace", "prod", ns),
        Event(MODIFIED, "Pod", "default/b", b2),
        Event(DELETED, "Pod", "default/c", c),
    ]


def test_diff_of_equal_maps_is_empty():
    state = {("Pod", "default/a"): pod("a")}
    assert diff_objects(state, {("Pod", "default/a"): pod("a")}) == []
    assert diff_objects({}, {}) == []


def test_diff_orders_namespaces_before_their_pods_and_deletes_after():
    ns = {"kind": "Namespace", "metadata": {"name": "prod"}}
    p = pod("a", namespace="prod")
    added = diff_objects({}, {("Pod", "prod/a"): p, ("Namespace", "prod"): ns})
    assert [(e.type, e.kind) for e in added] == [(ADDED, "Namespace"), (ADDED, "Pod")]
    deleted = diff_objects({("Pod", "prod/a"): p, ("Namespace", "prod"): ns}, {})
    assert [(e.type, e.kind) for e in deleted] == [(DELETED, "Pod"), (DELETED, "Namespace")]


# -- the source on a fake clock (polling)


def write(directory: Path, name: str, text: str) -> None:
    path = directory / name
    path.write_text(text)
    # Move the file's mtime into the past, so that it counts as settled and
    # the poller relies on its stat alone, as it would for an old file.
    stamp = path.stat().st_mtime_ns - 10_000_000_000
    os.utime(path, ns=(stamp, stamp))


def drain(stream: EventStream) -> list:
    items = []
    while len(stream):
        items.append(stream.get().result)
    return items


def started(tmp_path: Path, **kwargs):
    clock = Clock()
    stream = EventStream()
    source = ManifestsSource(clock, str(tmp_path), stream, use_inotify=False, **kwargs)
    source.start()
    return clock, stream, source


def tick(clock: Clock, source: ManifestsSource) -> None:
    clock.advance(source._poll_interval)
    clock.advance(SETTLE_DELAY)


def test_source_initial_sync_then_changes(tmp_path):
    write(tmp_path, "a.yaml", "kind: Pod\nmetadata: {name: a}\n")
    write(tmp_path, "notes.txt", "kind: Pod\nmetadata: {name: ignored}\n")
    write(tmp_path, ".hidden.yaml", "kind: Pod\nmetadata: {name: ignored}\n")
    clock, stream, source = started(tmp_path)
    items = drain(stream)
    assert [(e.type, e.key) for e in items[:-1]] == [(ADDED, "default/a")]
    assert items[-1] == Synced() and source.synced
    assert source.status()["watch"] == "polling"

    write(tmp_path, "a.yaml", "kind: Pod\nmetadata: {name: a, labels: {x: y}}\n")
    write(tmp_path, "b.yaml", "kind: Pod\nmetadata: {name: b}\n")
    tick(clock, source)
    assert [(e.type, e.key) for e in drain(stream)] == [
        (MODIFIED, "default/a"),
        (ADDED, "default/b"),
    ]
    (tmp_path / "a.yaml").unlink()
    tick(clock, source)
    assert [(e.type, e.key) for e in drain(stream)] == [(DELETED, "default/a")]
    # Nothing changed: nothing sent.
    tick(clock, source)
    assert drain(stream) == []
    source.stop()
    assert clock.getDelayedCalls() == []


def test_source_bad_file_keeps_last_good_objects(tmp_path):
    write(tmp_path, "a.yaml", "kind: Pod\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {name: b}\n")
    clock, stream, source = started(tmp_path)
    drain(stream)

    write(tmp_path, "a.yaml", "kind: Pod\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {}\n")
    tick(clock, source)
    assert drain(stream) == []
    status = source.status()
    assert status["objects"] == 2
    assert status["errors"] == {"a.yaml": ["a.yaml document 1: metadata.name is missing"]}

    write(tmp_path, "a.yaml", "kind: Pod\nmetadata: {name: a}\n")
    tick(clock, source)
    assert [(e.type, e.key) for e in drain(stream)] == [(DELETED, "default/b")]
    assert source.status()["errors"] == {}
    source.stop()


def test_source_broken_file_at_start_contributes_nothing(tmp_path):
    write(tmp_path, "a.yaml", "kind: Pod\nmetadata: {name: a}\n")
    write(tmp_path, "b.yaml", "kind: Pod\nmetadata: {name: b\n")
    clock, stream, source = started(tmp_path)
    assert [getattr(e, "key", None) for e in drain(stream)] == ["default/a", None]
    assert list(source.status()["errors"]) == ["b.yaml"]
    assert source.status()["files"] == ["a.yaml", "b.yaml"]
    source.stop()


def test_source_duplicate_reported_and_first_kept(tmp_path):
    write(tmp_path, "b.yaml", "kind: Pod\nmetadata: {name: a, labels: {from: b}}\n")
    write(tmp_path, "a.yaml", "kind: Pod\nmetadata: {name: a, labels: {from: a}}\n")
    clock, stream, source = started(tmp_path)
    first = drain(stream)[0]
    assert first.object["metadata"]["labels"] == {"from": "a"}
    [message] = source.status()["errors"]["b.yaml"]
    assert "a.yaml" in message
    # The first definition goes away: the other takes over.
    (tmp_path / "a.yaml").unlink()
    tick(clock, source)
    [event] = drain(stream)
    assert event.type == MODIFIED and event.object["metadata"]["labels"] == {"from": "b"}
    assert source.status()["errors"] == {}
    source.stop()


def test_source_missing_directory_is_not_synced_until_it_appears(tmp_path):
    directory = tmp_path / "later"
    clock, stream, source = started(directory)
    assert drain(stream) == [] and not source.synced
    assert source.status()["directory_error"]
    directory.mkdir()
    write(directory, "a.yaml", "kind: Pod\nmetadata: {name: a}\n")
    tick(clock, source)
    assert drain(stream)[-1] == Synced()
    assert source.status()["directory_error"] is None
    source.stop()


def test_source_waits_for_the_consumer_and_runs_one_rescan_at_a_time(tmp_path):
    for i in range(3):
        write(tmp_path, f"{i}.yaml", f"kind: Pod\nmetadata: {{name: p{i}}}\n")
    clock = Clock()
    stream = EventStream(maxsize=1)
    source = ManifestsSource(clock, str(tmp_path), stream, use_inotify=False)
    source.start()
    # One event queued, the second put waiting: the rescan is still running.
    assert len(stream) == 1 and not source.synced

    write(tmp_path, "3.yaml", "kind: Pod\nmetadata: {name: p3}\n")
    tick(clock, source)
    tick(clock, source)
    # The poller does not start a second rescan while the first one waits.
    assert len(stream) == 1

    received = [stream.get().result for _ in range(4)]
    assert [e.key for e in received[:3]] == ["default/p0", "default/p1", "default/p2"]
    assert received[3] == Synced()
    tick(clock, source)
    assert stream.get().result.key == "default/p3"
    source.stop()
    assert clock.getDelayedCalls() == []


def test_stop_cancels_a_rescan_blocked_on_the_stream(tmp_path):
    write(tmp_path, "a.yaml", "kind: Pod\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {name: b}\n")
    clock = Clock()
    stream = EventStream(maxsize=1)
    source = ManifestsSource(clock, str(tmp_path), stream, use_inotify=False)
    source.start()
    stopped = source.stop()
    assert isinstance(stopped, Deferred) and stopped.called
    assert not source.synced
    assert clock.getDelayedCalls() == []


def test_inotify_on_a_fake_clock_falls_back_to_polling(tmp_path):
    clock = Clock()
    source = ManifestsSource(clock, str(tmp_path), EventStream())
    source.start()
    assert source.status()["watch"] == "polling"
    source.stop()


def test_bad_manifest_is_logged_once_with_named_fields(tmp_path):
    from twisted.logger import LogLevel, capturedLogs

    write(tmp_path, "bad.yaml", "kind: Pod\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {}\n")
    with capturedLogs() as events:
        clock, stream, source = started(tmp_path)
        tick(clock, source)
        tick(clock, source)
        source.stop()
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    assert (warnings[0]["file"], warnings[0]["document"], warnings[0]["reason"]) == (
        "bad.yaml",
        1,
        "metadata.name is missing",
    )
