//! statsd, as DC/OS 1.12 and later took it from every task (see
//! `docs/statsd.md`): [`parse`] reads a packet's lines as Telegraf's statsd
//! input reads them, [`aggregate`] keeps each series' cumulative value,
//! [`listener`] takes packets on a UDP socket and flushes into the
//! pipeline.

pub mod aggregate;
pub mod listener;
pub mod parse;
