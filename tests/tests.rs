//! rolld's integration tests: the real binary, real processes, real sockets.

mod support;

mod buffering;
mod config;
mod containment;
mod control;
mod exact;
mod hardening;
mod hold;
mod lifecycle;
mod nginx;
mod original;
mod proxying;
mod retries;
mod rolling;
mod rollout;
mod slow_clients;
mod tls;
