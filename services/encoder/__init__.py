"""The encoder service: servicer, transfer state machine, models."""
