"""The gRPC edge both services share: servers and interceptors (`rpc`), the mapping of domain
errors to status codes (`rpc`), TLS and the token (`security`), Prometheus metrics (`metrics`)
and the listening-socket report (`exposure`)."""
