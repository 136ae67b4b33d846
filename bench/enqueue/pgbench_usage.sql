-- The raw-SQL ceiling of one usage (bench/enqueue.py, scenario a): the same transaction as
-- outbox.ledger.record_usage without an idempotency key, with nothing but PostgreSQL in the way.
-- Run with: pgbench -n -M prepared -c 16 -j 2 -T 10 -D customers=10000 -f bench/enqueue/pgbench_usage.sql
\set cid random(1, :customers)
BEGIN;
UPDATE customers SET balance = balance - 1, used = used + 1, updated_at = now() WHERE id = 'bench_' || :cid AND balance >= 1 RETURNING balance \gset
INSERT INTO outbox_events (external_id, customer_id, name, credits, metadata, occurred_at, status, attempts, next_attempt_at, created_at, updated_at) VALUES ('usage_' || replace(gen_random_uuid()::text, '-', ''), 'bench_' || :cid, 'ai_generation', 1, '{}', now(), 'pending', 0, now(), now(), now()) RETURNING id, external_id \gset
INSERT INTO ledger_entries (customer_id, kind, delta, balance_after, event_id, external_id, created_at) VALUES ('bench_' || :cid, 'usage', -1, :balance, :id, :external_id, now());
COMMIT;
