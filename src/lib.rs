#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod callers;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod echoes;
pub mod egress;
pub mod errors;
pub mod hygiene;
pub mod keytool;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod secrets;
pub mod server;
pub mod state;
pub mod throttle;
pub mod tls;
pub mod unix_listener;
pub mod upstream;
