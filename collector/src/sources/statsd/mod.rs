//! statsd, as DC/OS 1.12 and later took it from every task (see
//! `docs/statsd.md`): [`parse`] reads a packet's lines as Telegraf's statsd
//! input reads them, [`aggregate`] keeps each series' cumulative value,
//! [`listener`] takes packets on a UDP socket and flushes into the
//! pipeline; [`control`] is the registration API through which DC/OS
//! 1.12+'s mesos module gives each container a listener of its own, which
//! [`registry`] keeps.

pub mod aggregate;
pub mod control;
pub mod listener;
pub mod pace;
pub mod parse;
pub mod registry;
