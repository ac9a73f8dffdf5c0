"""The encoder service (DESIGN §3): servicer, transfer state machine, models."""
