#!/usr/bin/env python3
# Fill a store database made by Nix (DB) with N registered paths for the query
# benchmarks (bench/query-vs-nix.sh, bench/all-vs-nix.sh): each path references up to 3
# of the 50 before it, so the closure of the last one is nearly the whole store. The
# rows go straight into the database (content is not needed for queries).
# Prints the last path (whose requisites are queried), then the first (whose
# referrers are).
# Usage: bench/query-db.py DB N
import hashlib, random, sqlite3, sys

db, n = sys.argv[1], int(sys.argv[2])
alphabet = "0123456789abcdfghijklmnpqrsvwxyz"


def b32(i):
    v = int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:20], "little")
    return "".join(alphabet[(v >> (5 * k)) & 31] for k in range(32))


paths = [f"/nix/store/{b32(i)}-pkg-{i}" for i in range(n)]
c = sqlite3.connect(db)
c.execute("pragma journal_mode = wal")
with c:
    c.executemany(
        "insert into ValidPaths (path, hash, registrationTime, narSize) values (?, ?, 1, 120)",
        [(p, "sha256:" + hashlib.sha256(p.encode()).hexdigest()) for p in paths],
    )
    ids = {p: i for p, i in c.execute("select path, id from ValidPaths")}
    rnd = random.Random(42)
    refs = set()
    for i in range(1, n):
        for j in rnd.sample(range(max(0, i - 50), i), min(3, i)):
            refs.add((ids[paths[i]], ids[paths[j]]))
    c.executemany("insert into Refs (referrer, reference) values (?, ?)", sorted(refs))
print(paths[-1])
print(paths[0])
