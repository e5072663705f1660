"""Test helper process: commits to a ZODB storage on command.

Run as ``python zwriter.py KIND TARGET`` with KIND one of ``fs`` (TARGET: a
Data.fs path; this process holds the FileStorage lock), ``zeo`` (TARGET:
``host:port`` or a unix socket path) or ``pg`` (TARGET: a zodburi
``postgres://`` URL).  It reads one JSON command per line on stdin and
answers each with one JSON line on stdout; tids and oids travel as 16 hex digits.  After each commit it reports
the oids the transaction really wrote, read back through the storage's own
iterator -- an oracle independent of the code under test.

Commands (``op``):
  new/set  {key, size|hex, fill}  root[key] = PersistentMapping(data=…) / change its data
  btree    {key, n, start}        insert n int keys into OOBTree root[key] (splits buckets)
  del      {key}                  del root[key] (the object stays, unreachable)
  undo     {tid}                  undo that transaction
  empty                           a transaction that stores nothing
  loop     {n, key, delay}        n quick commits of root[key]; answers {"started"} at once,
                                  then {"commits": [...]} when done
  pack                            pack to now (FileStorage / ZEO)
  oid      {key}                  oid of root[key]
  quit
"""
from __future__ import annotations

import base64
import json
import sys
import time

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData


def open_db(kind: str, target: str) -> ZODB.DB:
    if kind == "fs":
        from ZODB.FileStorage import FileStorage
        return ZODB.DB(FileStorage(target))
    if kind == "zeo":
        from ZEO.ClientStorage import ClientStorage
        addr = target                     # a unix socket path, or host:port
        if ":" in target:
            host, port = target.rsplit(":", 1)
            addr = (host, int(port))
        return ZODB.DB(ClientStorage(addr, wait_timeout=30))
    if kind == "pg":
        from zodburi import resolve_uri
        factory, _ = resolve_uri(target)
        return ZODB.DB(factory())
    raise SystemExit(f"unknown storage kind {kind!r}")


def payload(cmd: dict) -> bytes:
    if "hex" in cmd:
        return bytes.fromhex(cmd["hex"])
    return bytes([cmd.get("fill", 1) % 256]) * cmd.get("size", 16)


def written(db: ZODB.DB, tid: bytes) -> list[str]:
    for txn in db.storage.iterator(tid, tid):
        if txn.tid == tid:
            return sorted(rec.oid.hex() for rec in txn)
    raise RuntimeError(f"transaction {tid.hex()} not found by the iterator")


def main() -> None:
    kind, target = sys.argv[1], sys.argv[2]
    db = open_db(kind, target)
    conn = db.open()
    root = conn.root()

    def last_tid() -> bytes:
        # The connection's storage after a sync: for RelStorage the root
        # storage's view would be stale (commits go through other instances).
        conn.sync()
        return conn._storage.lastTransaction()

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def commit(note: str) -> dict:
        t0 = time.time()
        transaction.get().note(note)
        transaction.commit()
        t1 = time.time()
        tid = last_tid()
        return {"tid": tid.hex(), "oids": written(db, tid), "t0": t0, "t1": t1}

    reply({"ready": True, "head": last_tid().hex()})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if kind == "zeo":                 # after a server restart: wait for the reconnect
            deadline = time.monotonic() + 30
            while not db.storage.is_connected() and time.monotonic() < deadline:
                time.sleep(0.02)
        conn.sync()
        if op == "new":
            root[cmd["key"]] = PersistentMapping(data=payload(cmd))
            reply(commit(f"new {cmd['key']}"))
        elif op == "set":
            root[cmd["key"]]["data"] = payload(cmd)
            reply(commit(f"set {cmd['key']}"))
        elif op == "btree":
            key = cmd["key"]
            if key not in root:
                root[key] = OOBTree()
            tree = root[key]
            start = cmd.get("start", 0)
            for i in range(start, start + cmd["n"]):
                tree[i] = f"v{i}"
            reply(commit(f"btree {key}"))
        elif op == "del":
            del root[cmd["key"]]
            reply(commit(f"del {cmd['key']}"))
        elif op == "undo":
            # undo ids are base64-encoded tids for FileStorage, ZEO and RelStorage
            db.undo(base64.encodebytes(bytes.fromhex(cmd["tid"])).rstrip(b"\n"))
            reply(commit("undo"))
        elif op == "empty":
            st = db.storage
            txn = TransactionMetaData()
            st.tpc_begin(txn)
            st.tpc_vote(txn)
            tid = st.tpc_finish(txn)
            reply({"tid": tid.hex(), "oids": written(db, tid)})
        elif op == "loop":
            key = cmd.get("key", "loop")
            reply({"started": True})
            commits = []
            for i in range(cmd["n"]):
                if key not in root:
                    root[key] = PersistentMapping(n=0)
                else:
                    root[key]["n"] = i
                commits.append(commit(f"loop {i}"))
                time.sleep(cmd.get("delay", 0))
            reply({"commits": commits})
        elif op == "pack":
            db.pack(time.time() + 1)
            reply({"packed": True, "head": last_tid().hex()})
        elif op == "oid":
            reply({"oid": root[cmd["key"]]._p_oid.hex()})
        else:
            reply({"error": f"unknown op {op!r}"})
    conn.close()
    db.close()


if __name__ == "__main__":
    main()
