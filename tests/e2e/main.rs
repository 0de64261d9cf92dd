//! End-to-end tests: the real `rbee-host` binary, real guests (built by `guests/build.sh`),
//! a real (tiny) model, spoken to over HTTP as clients and a queen would.

mod harness;

mod api;
mod cli;
mod conformance;
mod gpu;
mod guest_cache;
mod heartbeat;
mod hostile_guest;
mod hostile_http;
mod hot_swap;
mod lifecycle;
mod openai;
mod sandbox;
