"""Delivery: draining the outbox to Polar. `deliverer` claims a batch, sends it through the
Polar gateway and settles each row by what Polar answered; `runner` wires one deliverer per
process (Celery tasks, `outbox dev`) and runs the periodic jobs. The statements on the
outbox table they use live in `outbox.events`; the pure rules (backoff, leases, 422 reading) in
`outbox.policy`. How it works: docs/explanation/guarantees.md."""
