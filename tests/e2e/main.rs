//! In-process end-to-end tests: the real collector against the simulator's
//! producers and librdkafka's mock cluster (3 brokers). No Docker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent;
mod api;
mod discovery;
mod faults;
mod hostile;
mod ingest_to_kafka;
mod refused;
mod secured;
mod served;
mod up;
