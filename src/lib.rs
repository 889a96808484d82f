//! derpd: a high-performance DERP relay and headscale companion.
//!
//! Layers, top to bottom: [`http`] accepts connections and routes requests,
//! [`relay`] runs connected clients and forwards packets, [`proto`] is the
//! pure DERP protocol. [`client`] is a small DERP client used by the probe,
//! the benchmark, the tests and [`tunnel`] (plain WireGuard over DERP).

pub mod bench;
pub mod client;
pub mod companion;
pub mod config;
pub mod http;
pub mod keyfile;
pub mod mesh;
pub mod metrics;
pub mod proto;
pub mod relay;
pub mod server;
pub mod stun;
pub mod tls;
pub mod tunnel;
