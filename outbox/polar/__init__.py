"""Everything that talks to Polar or knows its shapes: the gateway (polar-sdk wrapped, every
failure sorted into transient or permanent), the organization's shared request budget, and
meter matching (is a meter the one that sums our events?). See docs/explanation/pacing.md."""
