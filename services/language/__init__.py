"""The language service (DESIGN §3): front door, receiver, allocation policy."""
