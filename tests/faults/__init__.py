"""Test-only fault injection, applied from outside the services through `services.parts.Parts`:
`transport` (Mooncake write faults), `rank` (language rank faults) and `launch` (the entry point
that starts a service process with them)."""
