"""The `epd` command and its tools: `cli` (entry point and service start-up), `demo`, `bench`,
`status` (`epd status` / `epd health`), `supervise` (service processes started and stopped as a
group) and `reference_payload` (the independent numpy checker of synthetic payloads)."""
