"""The `outbox` command: an adapter beside `api/` and `worker/`. It may import them, the emulator
and the domain; nothing imports it. `main` is the console script's entry point."""
