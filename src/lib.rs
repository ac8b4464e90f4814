//! # consentry
//!
//! An MQTT broker whose embedded interceptor enforces ITU-T X.1363 PII
//! preferences on every publish, subscription and delivery.
//!
//! # Layout
//! | module | holds | X.1363 component |
//! | --- | --- | --- |
//! | [`model`] | users, devices, providers' T&C, kinds, preferences | PII preferences (10.1) |
//! | [`topic`] | topic templates: which topics carry whose data | — |
//! | [`act`] | the compiled access control table and its decisions | ACT (10.1, 11.2.2) |
//! | [`acl`] | plain ACL for non-personal topics | — |
//! | [`mask`] | data minimization and masking views | 9.1.4, 9.1.6 |
//! | [`auth`] | identity at CONNECT | access control/authentication (9.1.2) |
//! | [`codec`] | MQTT 3.1.1/5 framing over rumqttc's codecs | — |
//! | [`session`] | one client's relay through the ACT to the broker | enforcement at collection and sharing |
//! | [`receipt`] | Kantara consent receipts: build, sign, verify | consent record (9.2.2) |
//! | [`ledger`] | encrypted, hash-chained share history | history log (9.2.3), logging (9.1.3) |
//! | [`broker`] | the embedded rumqttd, or an external upstream | data service provider's broker |
//! | [`broker_link`] | sessions' in-memory connections to the embedded rumqttd | — |
//! | [`link_packets`] | packets between sessions' model and rumqttd's router | — |
//! | [`upstream_conn`] | a session's broker connection, bytes or packets | — |
//! | [`server`] | listeners, wiring, reload, shutdown | — |
//! | [`config`] | `config/consentry.toml` | — |
//! | [`admin`] | operator commands: ledger verify/show, key rotation | history log access (9.2.3) |
//! | [`metrics`] | Prometheus names and the exporter | — |
//! | [`logging`] | the process's log, without the embedded broker's noise | — |
//! | [`secrets`] | keys generated on first run, owner-only | encryption (9.1.1) |
#![forbid(unsafe_code)]

pub mod accept;
pub mod acl;
pub mod act;
pub mod admin;
pub mod api;
pub mod auth;
pub mod backpressure;
pub mod broker;
pub mod broker_link;
pub mod client_ids;
pub mod codec;
pub mod config;
pub mod grant_rules;
pub mod ledger;
pub mod link_packets;
pub mod logging;
pub mod mask;
pub mod metrics;
pub mod model;
pub mod notice;
pub mod own_flow;
pub mod password_work;
pub mod prefs;
pub mod receipt;
pub mod secrets;
pub mod server;
pub mod session;
pub mod short_eq;
pub mod store;
pub mod topic;
pub mod upstream_conn;
pub mod will;
