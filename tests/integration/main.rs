//! Tally's one integration-test binary: every module here talks to real servers over real
//! sockets (an in-process `Tally` on port 0, or the `tally` binary as a child process).

mod support;

mod access;
mod cached;
mod cli;
mod crash;
mod differential;
mod enrich;
mod ingest_http;
mod kafka;
mod python_client;
mod queries;
mod sql;
mod ui;
