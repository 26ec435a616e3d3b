//! The `netchannel` command as a user runs it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn netchannel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_netchannel"))
}

#[test]
fn status_without_a_nexus_says_so_and_what_to_do() {
    let out = netchannel()
        .args(["status", "--socket", "/tmp/netchannel-no-such-nexus.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no nexus is listening") && err.contains("netchannel nexus"),
        "{err}"
    );
}

#[test]
fn a_nexus_serves_status_and_stops_cleanly_on_sigterm() {
    let socket = format!("/tmp/netchannel-cli-test-{}.sock", std::process::id());
    let mut nexus = netchannel()
        .args(["nexus", "--socket", &socket])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        let out = netchannel()
            .args(["status", "--json", "--socket", &socket])
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the nexus did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["pid"].as_u64(), Some(u64::from(nexus.id())));
    let out = netchannel()
        .args(["channels", "--json", "--socket", &socket])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let out = netchannel()
        .args(["flows", "--json", "--socket", &socket])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    // A second nexus on the same socket refuses to start.
    let second = netchannel()
        .args(["nexus", "--socket", &socket])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already listening"));
    let pid = rustix::process::Pid::from_raw(nexus.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let t0 = Instant::now();
    let code = loop {
        if let Some(st) = nexus.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the nexus ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(code.success());
    assert!(
        !std::path::Path::new(&socket).exists(),
        "the socket is removed"
    );
}

#[test]
fn bad_config_files_are_refused_with_the_reason() {
    let path = format!("/tmp/netchannel-cli-bad-{}.toml", std::process::id());
    std::fs::write(&path, "[channel]\nring_slots = 1000\n").unwrap();
    let out = netchannel()
        .args([
            "nexus",
            "--config",
            &path,
            "--socket",
            "/tmp/netchannel-never.sock",
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
}

#[test]
fn an_interface_that_cannot_be_served_is_refused_with_the_reason() {
    let socket = format!("/tmp/netchannel-cli-if-{}.sock", std::process::id());
    let out = netchannel()
        .args(["nexus", "--socket", &socket, "--interface", "nc-no-such0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no interface named \"nc-no-such0\""), "{err}");
    // A TAP nexus stands behind its device with addresses of its own: it needs one.
    let out = netchannel()
        .args([
            "nexus",
            "--socket",
            &socket,
            "--interface",
            "nctap0",
            "--backend",
            "tap",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no IP address"), "{err}");
    assert!(!std::path::Path::new(&socket).exists());
}
