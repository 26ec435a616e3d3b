//! A nexus daemon for the integration tests: the library's `Nexus` run exactly as
//! `netchannel nexus` runs it, on a socket path and optional config file given as arguments
//! (the config's `[interface]` section makes it serve an interface).
//!
//! Usage: `nexus_daemon SOCKET [CONFIG.toml]`

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(socket) = args.get(1) else {
        eprintln!("usage: nexus_daemon SOCKET [CONFIG.toml]");
        return ExitCode::FAILURE;
    };
    let mut cfg = match args.get(2) {
        Some(path) => match netchannel_nexus::Config::load(std::path::Path::new(path)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("nexus_daemon: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => netchannel_nexus::Config::default(),
    };
    cfg.control.socket = socket.into();
    let result = netchannel_nexus::Nexus::from_config(cfg).and_then(|mut n| n.run());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nexus_daemon: {e}");
            ExitCode::FAILURE
        }
    }
}
