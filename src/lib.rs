//! derpd: a high-performance DERP relay and headscale companion.
//!
//! Layers, top to bottom: the top level ([`server`], [`config`] and the
//! binary) turns flags and TOML into each part's settings and starts the
//! parts; [`http`] accepts connections and routes requests; [`relay`] runs
//! connected clients and forwards packets; [`proto`] is the pure DERP
//! protocol. Beside the relay: [`mesh`] (links to region peers, plugged into
//! the relay's [`relay::RemoteKeys`] seam), [`companion`] (headscale sync and
//! admission) and [`stun`]. Imports only flow downwards; `tests/import_graph.rs`
//! checks it. [`client`] is a small DERP client used by the probe, the
//! benchmark, the tests, [`tunnel`] (plain WireGuard over DERP) and
//! [`prober`] (a region watched from outside): clients of the protocol
//! beside everything else.

pub mod bench;
pub mod client;
pub mod companion;
pub mod config;
pub mod http;
pub mod keyfile;
pub mod map_source;
pub mod memory;
pub mod mesh;
pub mod metrics;
pub mod prober;
pub mod proto;
pub mod relay;
pub mod rlimit;
pub mod server;
pub mod sockopt;
pub mod stun;
pub mod tls;
pub mod trust;
pub mod tunnel;
