"""Drain benchmark (issue #4): how fast does the outbox reach Polar, next to the raw-SQL ceiling?

One run, one machine, one PostgreSQL, its own database (default `outbox_bench_drain`, dropped
and re-created; the outbox is emptied, pre-filled with SQL and VACUUMed before every scenario),
the Polar emulator in its own process, one table with ratios to (a):

  a            raw-SQL ceiling: pgbench, N clients, each loop claims 500 due rows (FOR UPDATE
               SKIP LOCKED, -> inflight with a lease, RETURNING what a worker sends) and marks
               them delivered in a second statement: our protocol with no Python and no HTTP
  a-1tx        the same in ONE statement (claim and deliver at once): the floor of the work
  b-celery-K   our delivery: real `celery -A worker worker --concurrency=K` processes, started
               by K `outbox.drain` tasks, against an instant emulator; until the outbox is empty
  b-inproc-T   `outbox.delivery.Deliverer` + `drain` in T threads of one process (no Celery):
               the delivery cost without Celery's
  c            a naive sender (bench/drain/naive_sender.py): one Celery task per event, one HTTP
               request per event, then mark that row delivered (a smaller sample)
  e-10k        10k pending rows alone, drained by b's best K
  e-1m         10k pending rows next to 1M delivered rows (no cliff?)
  lat          commit -> accepted by Polar at about half of b's capacity: a producer calls
               `record_usage` (and nudges a drain after each commit, as the API does) while
               pgbench adds the rest of the rate as outbox rows, 20 per transaction (one
               usage transaction per row could not offer half of b on two cores); workers run
               with beat; latency is delivered_at - created_at of every row committed in the
               window
  d            workers against an emulator limited to 500 requests per fixed 60 s window, our
               POLAR_REQUESTS_PER_MINUTE=500, for whole windows (>= 2 minutes): events/s vs the
               ceiling 500 x batch / 60, and the emulator's 429 count
  pace-L-P     the paced budget (issue 15): an emulator limited to L requests per 60 s window,
               POLAR_REQUESTS_PER_MINUTE=L, usage offered (as in lat) at P% of the capacity
               L x --pace-batch / 60 for --pace-windows whole windows: p50/p99 commit ->
               accepted, mean batch, 429s, how requests spread over each window
  sat-L        the same emulator with a backlog that never runs dry: events/s vs the ceiling
               L x --pace-batch / 60 (>= 97% with zero 429)

Rates come from the rows themselves: `delivered_at` of every delivered row. A drain's rows/s is
the steady rate between the 10th and the 90th percentile of `delivered_at` (start-up and the
last stragglers excluded); the whole-drain figure is in the notes. After each drain the outbox
is checked (every row delivered, none failed) and so is the emulator (it stored each row once).

    python bench/drain.py                     # the full run (~20 minutes: d alone is 3)
    python bench/drain.py --quick             # a smoke run (short windows, few rows)
    python bench/drain.py --only a,b-celery   # some scenarios (a key or a prefix)
    python bench/drain.py --only pace,sat     # the pacing scenarios (~25 minutes)
    python bench/drain.py --py-spy /tmp/prof  # also profile every drainer with py-spy

(`python -m bench.drain` runs the same.) The parts: `config` (constants, what the command line
asked for), `cli` (the flags, the report), `scenarios` (the rows), `runner` (the run, the
emulator, what the rows share), `drains` (a, b, c, e: drain a pre-filled outbox), `offered`
(lat, pace: usage offered at a rate), `limited` (d, sat: a rate-limited Polar), `rows` (the
outbox rows: seeding, waiting, timing), `children` (the spawned drainer and producer),
`profiler` (py-spy), `report` (the table and the goals), `naive_sender` (c's Celery app).
"""
