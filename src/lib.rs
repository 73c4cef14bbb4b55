#![forbid(unsafe_code)]

pub mod config;
pub mod upstream;
pub mod errors;
pub mod route;
