"""Enqueue benchmark (issue #3): how fast can usage be recorded, next to the raw-SQL ceiling?

One run, one machine, one PostgreSQL, its own database (default `outbox_bench`, dropped and
re-created, tables emptied and re-seeded before every scenario), one table with ratios to (a):

  a          raw-SQL ceiling: pgbench, bench/enqueue/pgbench_usage.sql (conditional UPDATE ...
             RETURNING, INSERT outbox_events ... RETURNING id, INSERT ledger_entries, COMMIT),
             -M prepared, many customers picked at random
  a-hot      the same on ONE customer (the ceiling for d)
  a-py-PxT   the same SQL from Python with plain psycopg (no SQLAlchemy, no domain code):
             P processes x T threads (how much of the gap is "Python at all")
  b-PxT      `record_usage` inside `outbox.db.session_scope`, one transaction per usage,
             P processes x T threads (1x16 = one process, threads only: the GIL case)
  c-bare     the floor (issue #13): the same spend statement behind one async Starlette route
             (bench/enqueue/bare_app.py: bearer token by hash, json.loads, psycopg's async pool),
             the same uvicorn workers and load as c
  c          POST /v1/usage over loopback HTTP: uvicorn --factory api.app:create_app with N
             workers, a usage token, a bounded load generator (fixed in-flight requests) in
             separate process(es)
  c-idem     the same with a fresh Idempotency-Key on every request
  c-replay   the same with Idempotency-Keys already used (100 keys, each first used in the
             warm-up): every request in the window is a replay
  *-base     with --base DIR: c, c-idem and c-replay against a server run from another checkout
             (e.g. `git archive <commit> | tar -x -C DIR`), interleaved with this one's rows in
             each round: an A/B of two versions of the code in one run
  d-http     every request on ONE customer (row-lock contention), huge balance
  d-http-402 the same with a balance that runs out half-way: only 201 and 402 may appear
  d-lib      `record_usage` on ONE customer, in-process

Throughput counts transactions that completed inside the measured window (after a warm-up);
latency is per transaction (p50/p99), measured by the client. After each scenario the ledger is
checked: outbox rows == usage entries == 201s seen, balance == sum(delta), no balance < 0.

    python bench/enqueue.py                 # the full run (about 3 minutes)
    python bench/enqueue.py --quick         # a smoke run (about 40 s)
    python bench/enqueue.py --only b,c      # some scenarios (a key or a prefix: a, b, c, d)
    python bench/enqueue.py --only =a,c     # "=a": (a) alone, not a-hot and a-py-*
    python bench/enqueue.py --trace         # the round trips of one usage, by protocol message

(`python -m bench.enqueue` runs the same.) The parts: `config` (what the command line asked
for), `cli` (the flags, the report), `scenarios` (the rows and how each runs), `runner` (rounds,
servers, the checks after each row), `clients` (the client processes), `ceiling` (pgbench),
`report` (the table and the goals), `trace` (--trace), `bare_app` (the c-bare floor).
"""
