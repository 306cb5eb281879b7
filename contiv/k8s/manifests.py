"""
The embedded cluster source: a directory of Kubernetes manifests, watched.

Every C{*.yaml}, C{*.yml} and C{*.json} file in the directory (multi-document
YAML and C{kind: List} included) is one part of the cluster's state. The
source feeds the same L{EventStream} as the API source: C{ADDED} for every
object, one L{Synced}, then the differences as files are created, edited,
renamed over and removed.

A file that does not parse, or that holds an object without C{kind} or
C{metadata.name}, is reported (file, document index, reason) and the objects
it held the last time it was good stay in force, so that a typo in one file
cannot drop the cluster's policies; other files are unaffected. A removed
file deletes its objects.

The parsing, merging and diffing are pure functions; L{ManifestsSource} only
reads the directory and turns what it finds into events.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from contiv.k8s.events import (
    ADDED,
    DELETED,
    KINDS,
    MODIFIED,
    Event,
    EventStream,
    Synced,
    object_key,
)

SUFFIXES = (".yaml", ".yml", ".json")

# Cluster-scoped kinds among KINDS; every other kind we follow is namespaced.
CLUSTER_SCOPED = frozenset({"Namespace"})

DEFAULT_NAMESPACE = "default"

# How long a burst of notifications may go on before the one rescan for it.
SETTLE_DELAY = 0.05

# A file modified this recently may change again without its stat changing
# (timestamps are only as fine as the kernel's clock tick), so it is re-read
# on every rescan until it is older than this.
_RACY_NS = 2_000_000_000

ObjectMap = Mapping[Tuple[str, str], Mapping[str, Any]]


@dataclass(frozen=True)
class ManifestError:
    """
    Why (part of) a manifest file was not used. C{document} is the 0-based
    index of the YAML document in the file, or C{None} when the whole file is
    at fault (unreadable, not UTF-8).
    """

    file: str
    document: Optional[int]
    reason: str

    def __str__(self) -> str:
        if self.document is None:
            return f"{self.file}: {self.reason}"
        return f"{self.file} document {self.document}: {self.reason}"


# -- parsing


def _manifest_loader() -> type:
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    # Kubernetes reads YAML as JSON: a creationTimestamp stays a string. The
    # safe loader would make it a datetime, which no JSON consumer can take.
    class ManifestLoader(base):  # type: ignore[misc, valid-type]
        yaml_implicit_resolvers = {
            first: [
                (tag, regexp)
                for tag, regexp in resolvers
                if tag != "tag:yaml.org,2002:timestamp"
            ]
            for first, resolvers in base.yaml_implicit_resolvers.items()
        }

    return ManifestLoader


_Loader = _manifest_loader()


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _mark(error: Exception) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is None:
        return ""
    return f"line {mark.line + 1}, column {mark.column + 1}: "


def _yaml_reason(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None)
    context = getattr(error, "context", None)
    if problem:
        what = f"{context}; {problem}" if context else problem
    else:
        what = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"not valid YAML: {_mark(error)}{what}"


def _documents(name: str, text: str) -> Tuple[List[Tuple[int, Any]], List[ManifestError]]:
    """The file's documents with their index, and the error that ended reading."""
    if name.endswith(".json"):
        if not text.strip():
            return [], []
        try:
            return [(0, json.loads(text))], []
        except ValueError as e:
            where = ""
            if isinstance(e, json.JSONDecodeError):
                where = f"line {e.lineno}, column {e.colno}: "
                reason = e.msg
            else:
                reason = str(e)
            return [], [ManifestError(name, 0, f"not valid JSON: {where}{reason}")]

    documents: List[Tuple[int, Any]] = []
    try:
        for index, document in enumerate(yaml.load_all(text, Loader=_Loader)):
            documents.append((index, document))
        return documents, []
    except yaml.YAMLError as e:
        # The parser stops at the first broken document: the index of the one
        # it was reading is the count of those it finished.
        return documents, [ManifestError(name, len(documents), _yaml_reason(e))]
    except (ValueError, TypeError, RecursionError) as e:
        return documents, [ManifestError(name, len(documents), f"not valid YAML: {e}")]


def _objects(
    name: str, index: int, document: Any, where: str, errors: List[ManifestError]
) -> List[Dict[str, Any]]:
    prefix = f"{where}: " if where else ""
    if not isinstance(document, dict):
        errors.append(
            ManifestError(name, index, f"{prefix}expected a mapping, got {_type_name(document)}")
        )
        return []
    kind = document.get("kind")
    if kind is None or kind == "":
        errors.append(ManifestError(name, index, f"{prefix}kind is missing"))
        return []
    if not isinstance(kind, str):
        errors.append(
            ManifestError(name, index, f"{prefix}kind must be a string, got {_type_name(kind)}")
        )
        return []

    if kind == "List":
        items = document.get("items")
        if items is None:
            return []
        if not isinstance(items, list):
            errors.append(
                ManifestError(name, index, f"{prefix}items must be a list, got {_type_name(items)}")
            )
            return []
        found: List[Dict[str, Any]] = []
        for position, item in enumerate(items):
            found.extend(_objects(name, index, item, f"{where}items[{position}]", errors))
        return found

    if kind not in KINDS:
        return []

    metadata = document.get("metadata")
    if metadata is None:
        errors.append(ManifestError(name, index, f"{prefix}metadata.name is missing"))
        return []
    if not isinstance(metadata, dict):
        errors.append(
            ManifestError(
                name, index, f"{prefix}metadata must be a mapping, got {_type_name(metadata)}"
            )
        )
        return []
    object_name = metadata.get("name")
    if object_name is None or object_name == "":
        errors.append(ManifestError(name, index, f"{prefix}metadata.name is missing"))
        return []
    if not isinstance(object_name, str):
        errors.append(
            ManifestError(
                name,
                index,
                f"{prefix}metadata.name must be a string, got {_type_name(object_name)}",
            )
        )
        return []
    namespace = metadata.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        errors.append(
            ManifestError(
                name,
                index,
                f"{prefix}metadata.namespace must be a string, got {_type_name(namespace)}",
            )
        )
        return []

    metadata = dict(metadata)
    if kind in CLUSTER_SCOPED:
        # The API server drops a namespace given to a cluster-scoped object;
        # keeping it would give the object a key nobody looks up.
        metadata.pop("namespace", None)
    elif not namespace:
        metadata["namespace"] = DEFAULT_NAMESPACE
    obj = dict(document)
    obj["metadata"] = metadata
    return [obj]


def parse_manifest_file(
    path: str, text: str
) -> Tuple[List[Dict[str, Any]], List[ManifestError]]:
    """
    The objects of the kinds in L{KINDS} that one manifest file holds, in file
    order, and the errors found in it.

    C{kind: List} is flattened through its C{items}; null and empty documents
    are skipped (they still count for the document index); objects of other
    kinds are ignored. A namespaced object without C{metadata.namespace} gets
    C{default}. A file is C{.json} (one JSON document) or else YAML. Errors
    name the file by its base name. A caller should treat a file with any
    error as bad as a whole: the objects returned beside errors are those
    that were readable, not a state to apply.
    """
    name = os.path.basename(path)
    documents, errors = _documents(name, text)
    objects: List[Dict[str, Any]] = []
    document_errors: List[ManifestError] = []
    for index, document in documents:
        if document is None:
            continue
        objects.extend(_objects(name, index, document, "", document_errors))
    return objects, document_errors + errors


def merge_manifests(
    files: Sequence[Tuple[str, Sequence[Mapping[str, Any]]]],
) -> Tuple[Dict[Tuple[str, str], Mapping[str, Any]], List[ManifestError]]:
    """
    One C{{(kind, key): object}} from the objects of every file, given as
    C{(file name, objects)} pairs.

    Files are taken in file-name order whatever order they come in, so that
    when two files define the same object the one kept does not depend on
    which file was written last; the other definition is an error naming
    both files.
    """
    merged: Dict[Tuple[str, str], Mapping[str, Any]] = {}
    defined_in: Dict[Tuple[str, str], str] = {}
    errors: List[ManifestError] = []
    for name, objects in sorted(files, key=lambda pair: pair[0]):
        for obj in objects:
            identity = (obj["kind"], object_key(obj))
            if identity in merged:
                errors.append(
                    ManifestError(
                        name,
                        None,
                        f"{identity[0]} {identity[1]} is already defined in"
                        f" {defined_in[identity]}; this definition is ignored",
                    )
                )
                continue
            merged[identity] = obj
            defined_in[identity] = name
    return merged, errors


def _kind_rank(identity: Tuple[str, str]) -> Tuple[int, str, str]:
    kind, key = identity
    rank = KINDS.index(kind) if kind in KINDS else len(KINDS)
    return (rank, kind, key)


def diff_objects(old: ObjectMap, new: ObjectMap) -> List[Event]:
    """
    The events that turn C{old} into C{new}, both C{{(kind, key): object}}.

    Additions and modifications come first, in the order of L{KINDS}
    (a Namespace before the Pods in it), then deletions in the reverse order:
    a consumer that applies them one by one never sees a pod without its
    namespace, and a policy replaced by one of another name leaves no gap.
    """
    events: List[Event] = []
    for identity in sorted(new, key=_kind_rank):
        kind, key = identity
        if identity not in old:
            events.append(Event(ADDED, kind, key, new[identity]))
        elif old[identity] != new[identity]:
            events.append(Event(MODIFIED, kind, key, new[identity]))
    for identity in sorted(old, key=_kind_rank, reverse=True):
        if identity not in new:
            kind, key = identity
            events.append(Event(DELETED, kind, key, old[identity]))
    return events


# -- the source


Signature = Tuple[int, int, int, int]


def _signature(st: os.stat_result) -> Signature:
    # ctime as well as mtime: a chmod that makes a file unreadable changes
    # only ctime, and the error should show.
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


@dataclass(frozen=True)
class _FileState:
    """What the source knows of one file."""

    signature: Optional[Signature]
    # Whether the file may change again without its signature changing.
    racy: bool
    # The objects in force: the file's content the last time it was good.
    objects: Tuple[Mapping[str, Any], ...]
    errors: Tuple[ManifestError, ...]


_NEVER_READ = _FileState(None, True, (), ())


class ManifestsSource:
    """
    Feeds C{stream} from a directory of manifests, and keeps watching it.

    The directory is watched with inotify where the reactor supports it and
    by polling every C{poll_interval} seconds otherwise (or when
    C{use_inotify} is false). Notifications are coalesced into one rescan
    L{SETTLE_DELAY} seconds after the first, so that a file still being
    written is read once it is complete. At most one rescan runs at a time;
    changes seen during it cause one more after it. Each event is awaited on
    the stream, so a slow consumer slows the rescans and not the memory.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        directory: str,
        stream: EventStream,
        *,
        poll_interval: float = 0.5,
        use_inotify: bool = True,
    ):
        self.stream = stream
        self.synced = False
        self._reactor = reactor
        self._directory = os.fspath(directory)
        self._poll_interval = poll_interval
        self._use_inotify = use_inotify
        self._files: Dict[str, _FileState] = {}
        self._conflicts: Tuple[ManifestError, ...] = ()
        self._directory_error: Optional[str] = None
        # What the consumer has been told: updated one event at a time, so it
        # stays true even if a rescan is cancelled half way.
        self._emitted: Dict[Tuple[str, str], Mapping[str, Any]] = {}
        self._reported: frozenset = frozenset()
        self._watching: Optional[str] = None
        self._notifier: Any = None
        self._inotify_lost = False
        self._poller: Optional[LoopingCall] = None
        self._pending: Any = None
        self._scan: Optional[Deferred] = None
        self._busy = False
        self._again = False
        self._started = False
        self._stopped = False

    # -- public interface

    def start(self) -> None:
        if self._started:
            raise RuntimeError("ManifestsSource.start() called twice")
        self._started = True
        # Watch before the first read, so that no change slips in between.
        self._watch()
        self._begin_rescan()

    def stop(self) -> Deferred:
        """Stop watching; fires once the rescan in progress (if any) is over."""
        self._stopped = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self._unwatch()
        if self._scan is None:
            return succeed(None)
        done: Deferred = Deferred()
        self._scan.addBoth(lambda result: done.callback(None) or result)
        # A rescan waiting on a full stream would wait for the consumer for
        # ever; what it had not put yet is simply not sent.
        self._scan.cancel()
        return done

    def status(self) -> Dict[str, Any]:
        errors: Dict[str, List[str]] = {}
        for error in self._current_errors():
            errors.setdefault(error.file, []).append(str(error))
        return {
            "directory": self._directory,
            "watch": self._watching,
            "synced": self.synced,
            "files": sorted(self._files),
            "objects": len(self._emitted),
            "errors": errors,
            "directory_error": self._directory_error,
        }

    # -- watching

    def _watch(self) -> None:
        if self._use_inotify and self._start_inotify():
            return
        self._start_polling()

    def _start_inotify(self) -> bool:
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            notifier = inotify.INotify(reactor=self._reactor)
            try:
                notifier.startReading()
                notifier.watch(
                    FilePath(self._directory),
                    mask=(
                        inotify.IN_CREATE
                        | inotify.IN_CLOSE_WRITE
                        | inotify.IN_MOVED_TO
                        | inotify.IN_MOVED_FROM
                        | inotify.IN_DELETE
                        | inotify.IN_MODIFY
                        | inotify.IN_ATTRIB
                        | inotify.IN_MOVE_SELF
                    ),
                    callbacks=[self._notified],
                )
            except BaseException:
                notifier.loseConnection()
                raise
        except Exception as e:
            self.log.info(
                "inotify unavailable for {directory} ({reason}); polling every {interval} s",
                directory=self._directory,
                reason=str(e) or type(e).__name__,
                interval=self._poll_interval,
            )
            return False
        self._notifier = notifier
        self._watching = "inotify"
        return True

    def _notified(self, _ignored: Any, _path: Any, mask: int) -> None:
        from twisted.internet import inotify

        lost = mask & (inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF | inotify.IN_IGNORED)
        if lost and self._notifier is not None and not self._inotify_lost:
            self._inotify_lost = True
            # The watched directory itself is gone or was replaced: inotify
            # cannot follow a path, polling can. Not from inside this callback:
            # INotify still uses its descriptor after calling us.
            self.log.warn(
                "{directory} was removed or moved; polling it from now on",
                directory=self._directory,
            )
            self._reactor.callLater(0, self._switch_to_polling)
        self._request_rescan()

    def _switch_to_polling(self) -> None:
        if self._stopped or self._watching != "inotify":
            return
        self._unwatch()
        self._start_polling()

    def _start_polling(self) -> None:
        self._poller = LoopingCall(self._poll)
        self._poller.clock = self._reactor
        self._poller.start(self._poll_interval, now=False)
        self._watching = "polling"

    def _unwatch(self) -> None:
        if self._notifier is not None:
            notifier, self._notifier = self._notifier, None
            notifier.loseConnection()
        if self._poller is not None:
            poller, self._poller = self._poller, None
            if poller.running:
                poller.stop()
        self._watching = None

    def _poll(self) -> None:
        if self._busy or self._pending is not None:
            return
        if self._looks_changed():
            self._request_rescan()

    def _looks_changed(self) -> bool:
        if self._directory_error is not None:
            return True
        try:
            names = self._list()
        except OSError:
            return True
        if set(names) != set(self._files):
            return True
        for name in names:
            known = self._files[name]
            if known.racy:
                return True
            try:
                st = os.stat(os.path.join(self._directory, name))
            except OSError:
                return True
            if _signature(st) != known.signature:
                return True
        return False

    # -- rescanning

    def _request_rescan(self) -> None:
        if self._stopped or not self._started:
            return
        if self._busy:
            self._again = True
        elif self._pending is None:
            self._pending = self._reactor.callLater(SETTLE_DELAY, self._begin_rescan)

    def _begin_rescan(self) -> None:
        self._pending = None
        self._again = False
        self._busy = True
        scan = Deferred.fromCoroutine(self._rescan())
        if not scan.called:
            self._scan = scan
        scan.addBoth(self._rescan_over)

    def _rescan_over(self, result: Any) -> None:
        self._busy = False
        self._scan = None
        if isinstance(result, Failure) and not result.check(CancelledError):
            self.log.failure(
                "rescan of {directory} failed", failure=result, directory=self._directory
            )
        if self._again:
            self._again = False
            self._request_rescan()

    async def _rescan(self) -> None:
        try:
            names = self._list()
        except OSError as e:
            reason = e.strerror or str(e)
            if reason != self._directory_error:
                self.log.warn(
                    "cannot list {directory}: {reason}; its objects stay in force",
                    directory=self._directory,
                    reason=reason,
                )
            self._directory_error = reason
            return
        if self._directory_error is not None:
            self.log.info("{directory} is readable again", directory=self._directory)
            self._directory_error = None

        files: Dict[str, _FileState] = {}
        for name in names:
            state = self._read(name, self._files.get(name, _NEVER_READ))
            if state is not None:
                files[name] = state
        self._files = files

        desired, conflicts = merge_manifests(
            [(name, state.objects) for name, state in files.items()]
        )
        self._conflicts = tuple(conflicts)
        self._report_errors()

        for event in diff_objects(self._emitted, desired):
            if self._stopped:
                return
            await self.stream.put(event)
            identity = (event.kind, event.key)
            if event.type == DELETED:
                del self._emitted[identity]
            else:
                self._emitted[identity] = event.object
        if not self.synced and not self._stopped:
            await self.stream.put(Synced())
            self.synced = True
            self.log.info(
                "{directory}: {objects} objects from {files} files, synced",
                directory=self._directory,
                objects=len(self._emitted),
                files=len(files),
            )

    def _list(self) -> List[str]:
        names = []
        with os.scandir(self._directory) as entries:
            for entry in entries:
                # Hidden files are editors' and tools' scratch files, and
                # the ..data links of a mounted ConfigMap (kubelet skips
                # them too).
                if entry.name.startswith(".") or not entry.name.endswith(SUFFIXES):
                    continue
                names.append(entry.name)
        return sorted(names)

    def _read(self, name: str, known: _FileState) -> Optional[_FileState]:
        """The file's new state, or C{None} if it is gone."""
        path = os.path.join(self._directory, name)
        # Stat before reading: if the file changes in between, the next scan
        # sees a newer signature than the content read and reads it again.
        started_ns = time.time_ns()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if not os.path.lexists(path):
                return None
            return self._bad(known, None, ManifestError(name, None, "broken symbolic link"))
        except OSError as e:
            return self._bad(known, None, ManifestError(name, None, f"cannot stat: {e.strerror}"))
        signature = _signature(st)
        if signature == known.signature and not known.racy:
            return known
        # File timestamps are wall-clock time, so the wall clock (not the
        # reactor's) says whether this one is still fresh.
        racy = st.st_mtime_ns >= started_ns - _RACY_NS
        if not stat.S_ISREG(st.st_mode):
            return self._bad(known, signature, ManifestError(name, None, "not a regular file"))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            return self._bad(
                known, signature, ManifestError(name, None, f"cannot read: {e.strerror}")
            )
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            return self._bad(
                known, signature, ManifestError(name, None, f"not UTF-8 text: {e.reason} at byte {e.start}")
            )
        objects, errors = parse_manifest_file(name, text)
        if errors:
            return _FileState(signature, racy, known.objects, tuple(errors))
        return _FileState(signature, racy, tuple(objects), ())

    @staticmethod
    def _bad(
        known: _FileState, signature: Optional[Signature], error: ManifestError
    ) -> _FileState:
        # Racy, so that the file is tried again on the next scan: an error
        # of the file system may go away without the file changing.
        return _FileState(signature, True, known.objects, (error,))

    def _current_errors(self) -> List[ManifestError]:
        errors = [error for name in sorted(self._files) for error in self._files[name].errors]
        return errors + list(self._conflicts)

    def _report_errors(self) -> None:
        current = self._current_errors()
        for error in current:
            if error not in self._reported:
                self.log.warn(
                    "bad manifest {error}; the file's last good objects stay in force",
                    error=str(error),
                    file=error.file,
                    document=error.document,
                    reason=error.reason,
                )
        fixed = {error.file for error in self._reported} - {error.file for error in current}
        for name in sorted(fixed):
            if name in self._files:
                self.log.info("manifest {file} is good again", file=name)
        self._reported = frozenset(current)
