"""One lock per stage key in the store, so that two runs of the same stage never write the same artifact at once.

Why a lock and not only content addressing: a stage's artifact and checkpoints live at fixed paths
(`<kind>/<key>/`, `ckpt-<stage>/<key>.step-N/`), an upload first removes what an unfinished upload left there, and
two runs of one key do not write identical bytes (TensorBoard event files carry times and pids). Two writers of one
key therefore delete and overwrite each other's files before the manifest goes in. With the lock, the second run
waits while the first trains, then finds the artifact committed and uses it; nothing is computed twice.

- Local stores: `fcntl.flock` on `<root>/_locks/<kind>-<key>.lock`. The kernel drops the lock when its holder dies,
  so a killed run can never leave a lock behind.
- Remote stores (S3): a lease object `<root>/_locks/<kind>-<key>/<generation>.json`, created with an exclusive
  (If-None-Match) PUT and renewed by a heartbeat thread. The newest generation holds the lock while it is alive: its
  process still runs (same machine: pid and start time) or its heartbeat is younger than `ttl_s` (another machine).
  Releasing marks the lease released instead of deleting it; the next holder creates the next generation
  exclusively. Generation numbers are never reused, so two waiters cannot both win (a deleted and re-created
  generation would let one waiter see the old holder gone while another already holds the new one).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from typing import Callable, Iterator

LOCK_PREFIX = "_locks"
LEASE_TTL_S = 300.0  # a lease from another machine counts as dead after this long without a heartbeat
POLL_S = 1.0


def _boot_and_pidns() -> str:
    """Identifies this machine and pid namespace: a pid means the same process only when both match."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{socket.gethostname()}:{boot}:{ns}"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None if there is no such process): tells a reused pid
    from the process that wrote a lease."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # state, ..., starttime (field 22 of stat)


def owner_info(run: str = "") -> dict:
    pid = os.getpid()
    return {"run": run, "pid": pid, "host": socket.gethostname(), "machine": _boot_and_pidns(),
            "started": _start_time(pid), "acquired": time.time(), "heartbeat": time.time()}


def describe(owner: dict) -> str:
    if not owner.get("pid"):  # the holder is writing its note right now, or just let go
        return "another run"
    run = f"run {owner['run']} " if owner.get("run") else ""
    return f"{run}(pid {owner.get('pid')} on {owner.get('host')})"


def lease_alive(owner: dict, ttl_s: float, now: float | None = None) -> bool:
    """Whether the process that wrote this lease may still hold it."""
    if owner.get("released"):
        return False
    if owner.get("machine") and owner["machine"] == _boot_and_pidns():
        return _start_time(int(owner.get("pid", -1))) == owner.get("started")
    return (now or time.time()) - float(owner.get("heartbeat", 0)) < ttl_s


@contextlib.contextmanager
def stage_lock(store, kind: str, key: str, *, done: Callable[[], bool], log: Callable[[str], None] = print,
               run: str = "", ttl_s: float = LEASE_TTL_S, poll_s: float = POLL_S) -> Iterator[bool]:
    """Hold the lock of `<kind>/<key>` for the body. While another live run holds it, wait (saying who holds it);
    if `done()` becomes true meanwhile (the other run committed the artifact), yield False without the lock."""
    from .store import check_name

    check_name(kind, key)
    lock = _LocalLock(store, kind, key) if store.is_local else _Lease(store, kind, key, ttl_s)
    owner = owner_info(run)
    announced = False
    while True:
        holder = lock.try_acquire(owner)
        if holder is None:
            break
        if done():
            yield False
            return
        if not announced:
            log(f"{kind}: {store.uri(kind, key)} is being made by {describe(holder)}; waiting for it")
            announced = True
        time.sleep(poll_s)
    try:
        yield True
    finally:
        lock.release()


class _LocalLock:
    def __init__(self, store, kind: str, key: str):
        folder = os.path.join(store.root, LOCK_PREFIX)
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"{kind}-{key}.lock")
        self.fd: int | None = None

    def try_acquire(self, owner: dict) -> dict | None:
        """None when acquired, else what the holder wrote about itself. The file is never deleted: removing a
        flock'ed file lets a third process lock a new file of the same name while the first still holds the old."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:  # the holder is writing it right now
                holder = {}
            os.close(fd)
            return holder
        with contextlib.suppress(OSError):  # who holds it is a courtesy for waiters; a full disk is no reason to fail
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


class _Lease:
    def __init__(self, store, kind: str, key: str, ttl_s: float):
        self.fs = store.fs
        self.folder = f"{store.root}/{LOCK_PREFIX}/{kind}-{key}"
        self.ttl_s = ttl_s
        self.path: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _generations(self) -> list[tuple[int, str]]:
        try:
            names = self.fs.ls(self.folder, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for p in names:
            stem = p.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
            if stem.isdigit():
                out.append((int(stem), p))
        return sorted(out)

    def _read(self, path: str) -> dict | None:
        try:  # one GET (cat_file): an open file would pin the ETag and fail when the holder renews the lease
            return json.loads(self.fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            return None

    def try_acquire(self, owner: dict) -> dict | None:
        gens = self._generations()
        nxt = 0
        if gens:
            gen, path = gens[-1]
            holder = self._read(path)
            if holder is None:  # removed by whoever took the next generation meanwhile: look again
                return {}
            if lease_alive(holder, self.ttl_s):
                return holder
            nxt = gen + 1
        path = f"{self.folder}/{nxt:08d}.json"
        try:  # If-None-Match: * on S3 (s3fs raises FileExistsError on 412)
            self.fs.pipe_file(path, json.dumps(owner).encode(), mode="create")
        except FileExistsError:  # another waiter created this generation first
            return self._read(path) or {}
        self.path = path
        for _, old in gens:  # released or dead generations; never the one just created
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.rm(old)
        self._owner = owner
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=f"lease-{nxt}")
        self._beat.start()
        return None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 6):
            self._owner["heartbeat"] = time.time()
            with contextlib.suppress(OSError):  # an unreachable store: try again at the next beat
                self.fs.pipe_file(self.path, json.dumps(self._owner).encode())

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self.path is not None:
            with contextlib.suppress(OSError):  # unreachable: the lease dies by its heartbeat age instead
                self.fs.pipe_file(self.path, json.dumps(self._owner | {"released": True}).encode())
            self.path = None
