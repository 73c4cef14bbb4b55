#![forbid(unsafe_code)]

pub mod config;
pub mod upstream;
pub mod errors;
pub mod route;
pub mod audit;
pub mod metrics;
pub mod proxy;
pub mod state;
pub mod admin;
pub mod server;
pub mod cli;
pub mod demo;
pub mod logging;
