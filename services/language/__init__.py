"""The language service: front door, receiver, allocation policy."""
