//! The configuration loader on arbitrary file text and environment variables, as a deployment
//! could hand them over (a mistyped ConfigMap, a stray variable).
//!
//! The input is the file's text, then after a line `%%` one `NAME=value` per line (the prefix
//! `GRIDTALK__` is added). Loading must give a configuration or every problem, never a panic, and
//! a configuration it gives must pass its own validation.
#![no_main]

use gridtalk_config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (file, env) = text.split_once("\n%%\n").unwrap_or((&text, ""));
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (format!("GRIDTALK__{k}"), v.to_string()))
        .collect();
    if let Ok(config) = Config::load_text(Some(("fuzz.toml", file)), env) {
        assert!(config.validate().is_empty(), "a loaded configuration is valid");
    }
});
