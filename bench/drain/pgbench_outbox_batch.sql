-- bench/drain.py scenario lat: :rows outbox rows committed in one transaction, as `record_usage`
-- would write them (pending, due now, unique external ids), without the deduction and the ledger
-- entry, which the drain never reads. Cheap enough that pgbench can offer half of the drain's
-- capacity on the same two cores (run throttled: -R rows_per_second / :rows).
\set cid random(1, :customers)
INSERT INTO outbox_events (external_id, customer_id, name, credits, metadata, occurred_at, status, attempts, next_attempt_at, created_at, updated_at) SELECT 'usage_' || replace(gen_random_uuid()::text, '-', ''), 'bench_' || ((:cid + g) % :customers + 1), 'ai_generation', 1, '{}', now(), 'pending', 0, now(), now(), now() FROM generate_series(1, :rows) g;
