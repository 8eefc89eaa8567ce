"""Ingest spread over a Ray cluster (`memtx ingest --ray local|auto|ADDRESS`, the `ray` extra).

Ray actors, not Ray Data: a document's memories depend on that document alone, and a worker
must load the model once and stream whole documents exactly as a local ingest does (segment
after segment, its own state between them), which is an actor holding a model, not a dataset
transform over independent rows. Each worker writes the documents it is given into its own
shard bank (`.<bank>.shards/shard-<i>` beside the output), committed per document as any
ingest is. The driver copies each document into the output bank as soon as a worker returns
it, and commits.

Failures: a worker that dies is restarted by Ray and its task retried (`max_restarts`,
`max_task_retries`); its shard lost at most the uncommitted document, which the retry ingests
again. A killed driver leaves the output bank at its last commit and the shards with what
workers committed: a rerun skips documents already in the output, and a worker asked again for
a document its shard holds returns it without streaming it again. The shards are removed once
every document is in the output."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memtx_cli.errors import MemtxError, UsageError

MAX_RESTARTS = 3
IN_FLIGHT = 2  # documents queued per worker


def shard_root(out: Path) -> Path:
    return out.parent / f".{out.name}.shards"


class ShardWorker:
    """One Ray actor: the model loaded once, documents ingested into shard `index`."""

    def __init__(self, flags: dict[str, Any], sets: list[str] | None, config_file: str | None, shard: str) -> None:
        from memtx_cli.engine.session import load_for, resolve_settings

        self.cfg, _ = resolve_settings(flags, sets, config_file)
        self.lm = load_for(self.cfg)
        self.shard = Path(shard)

    def pid(self) -> int:
        return os.getpid()

    def ingest(self, path: str, precision: str | None, max_tokens: int) -> dict[str, Any]:
        """Ingest one document into this worker's shard (a no-op when the shard holds it
        unchanged); what the driver needs to copy it."""
        from memtx_cli.bank.ingest import ingest, open_or_create_bank

        bank = open_or_create_bank(self.shard, self.lm, self.cfg, 0, "fifo", precision=precision)
        try:
            rep = ingest(self.lm, bank, [Path(path)], self.cfg, max_tokens=max_tokens)
        finally:
            bank.close()
        return {
            "path": path,
            "shard": str(self.shard),
            "tokens": rep.tokens,
            "seconds": rep.seconds,
            "pid": os.getpid(),
            "skipped": rep.skipped,
            "warnings": rep.warnings,
        }


def connect(address: str, cpus: int) -> Any:
    """Ray, initialised: `local` starts a cluster of `cpus` CPUs on the local host, `auto` joins
    the one `ray start` made here, anything else is a cluster address."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'memtx[ray]'") from None
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(num_cpus=max(cpus, 1), include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise MemtxError(f"cannot reach the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
    return ray


def adopt(out: Any, shard: Any, key: str, sha: str) -> bool:
    """Copy document `key` (content `sha`) from a shard bank into the output and commit, with
    ingest's rules: unchanged is kept, changed is replaced, identical content elsewhere becomes an
    alias. Returns whether entries were added."""
    from dataclasses import replace

    from memtx_cli.bank.ops import copy_document

    existing = out.find_doc(key)
    if existing is not None and existing.sha256 == sha:
        return False
    if existing is not None:
        if existing.path == key:
            out.remove_document(existing.id)
        else:
            existing.aliases.remove(key)
        out.commit()
    same = next((d for d in out.docs.values() if d.sha256 == sha), None)
    if same is not None:
        same.aliases.append(key)
        out.commit()
        return False
    rec = shard.find_doc(key)
    if rec is None or rec.sha256 != sha:
        raise MemtxError(f"shard {shard.path} does not hold {key} as ingested")
    copy_document(shard, replace(rec, path=key, aliases=[]), out)
    if out.evict_to_capacity(protect=set(out.docs[max(out.docs)].blocks)):
        out.commit()
    return True


def take(res: dict[str, Any], out_bank: Any, sha: str, done: dict[str, Any]) -> None:
    """A worker's result: its document copied from the shard into the output (or counted as
    skipped or unchanged), the time that took, and the worker's busy time."""
    from memtx_cli.bank.store import Bank

    done["warnings"] += res["warnings"]
    done.setdefault("worker_seconds", {}).setdefault(res["pid"], 0.0)
    done["worker_seconds"][res["pid"]] += res["seconds"]
    if res["skipped"]:
        done["skipped"] += [tuple(s) for s in res["skipped"]]
        return
    t1 = time.perf_counter()
    with Bank.open(res["shard"], writer=False, verify=False) as shard:
        if adopt(out_bank, shard, res["path"], sha):
            done["added"].append(res["path"])
            done["tokens"] += out_bank.docs[max(out_bank.docs)].tokens
        else:
            done["unchanged"].append(res["path"])
    done["copy_seconds"] = done.get("copy_seconds", 0.0) + time.perf_counter() - t1


def ingest_on_ray(
    address: str,
    files: list[Path],
    out: Path,
    flags: dict[str, Any],
    sets: list[str] | None,
    config_file: str | None,
    workers: int,
    open_out: Callable[[], Any],
    precision: str | None = None,
    max_tokens: int = 0,
    progress: Callable[[dict[str, Any]], None] = lambda e: None,
) -> dict[str, Any]:
    """Every file ingested by `workers` Ray actors into shard banks and copied into the bank
    `open_out()` opens for writing. Returns counts and the files skipped (with why)."""
    from memtx_cli.bank.reader import read_bytes

    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    out_bank = open_out()
    todo, shas, done = [], {}, {"added": [], "unchanged": [], "skipped": [], "warnings": [], "tokens": 0}
    try:
        for f in files:
            try:
                shas[str(f)] = hashlib.sha256(read_bytes(f)).hexdigest()
            except MemtxError as e:
                done["skipped"].append((str(f), str(e)))
                continue
            rec = out_bank.find_doc(str(f))
            (done["unchanged"] if rec is not None and rec.sha256 == shas[str(f)] else todo).append(str(f))
        if todo:
            # each worker takes --threads CPUs (1 when not given: Ray then sets OMP_NUM_THREADS=1)
            cpus = max(1, int(flags.get("threads") or 1))
            ray = connect(address, workers * cpus)
            actor_cls = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)(ShardWorker)
            root = shard_root(out)
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            actors = [
                actor_cls.options(num_cpus=cpus).remote(flags, sets, config_file, str(root / f"shard-{i}"))
                for i in range(min(workers, len(todo)))
            ]
            progress({"event": "workers", "pids": ray.get([a.pid.remote() for a in actors])})
            done["ready_seconds"] = time.perf_counter() - t0  # actors started, models loaded
            pending = {}
            queue = sorted(todo, key=lambda f: -os.path.getsize(f))  # largest first: workers finish together
            for _ in range(IN_FLIGHT):  # a worker never waits for the driver's copy of its last document
                for a in actors:
                    if queue:
                        pending[a.ingest.remote(queue.pop(0), precision, max_tokens)] = a
            n_done = 0
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                a = pending.pop(ready[0])
                res = ray.get(ready[0])
                n_done += 1
                if queue:
                    pending[a.ingest.remote(queue.pop(0), precision, max_tokens)] = a
                take(res, out_bank, shas[res["path"]], done)
                progress({"event": "document", "path": res["path"], "done": n_done})
            for a in actors:
                ray.kill(a)
            from memtx_cli.bank import fs as bankfs

            bankfs.remove_dir(root)
        info = out_bank.info()
    finally:
        out_bank.close()
    return {**done, "seconds": time.perf_counter() - t0, "workers": workers, "info": info}
