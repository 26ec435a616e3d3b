//! Shared bits of the example apps: argument parsing without a framework (the examples are
//! meant to be read), and hex output.

use std::net::SocketAddr;

/// The value after `--name` in `args`, if any.
pub fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The nexus's control socket: `--socket PATH`, else the default.
pub fn socket(args: &[String]) -> String {
    arg(args, "--socket")
        .unwrap_or(netchannel::nexus::DEFAULT_SOCKET)
        .to_owned()
}

/// Parses `--name ADDR` (or the default).
pub fn addr(args: &[String], name: &str, default: &str) -> Result<SocketAddr, String> {
    let text = arg(args, name).unwrap_or(default);
    text.parse()
        .map_err(|_| format!("{name}: {text:?} is not an address like 0.0.0.0:8080"))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
