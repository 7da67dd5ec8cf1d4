//! The `CNI_*` environment a runtime passes (cni/src/env.rs). The input is `KEY=VALUE` lines,
//! so the fuzzer can find the variable names from the seeds and mutate their values.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use trellis_cni::env::{Command, Environment, validate_ifname};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // from_process drops variables that are not UTF-8
    };
    let vars: HashMap<String, String> = text
        .split('\n')
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let Ok(env) = Environment::parse(&vars) else {
        return;
    };
    let expected = match vars.get("CNI_COMMAND").map(String::as_str) {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => Command::Version,
        Some("STATUS") => Command::Status,
        Some("GC") => Command::Gc,
        other => panic!("accepted CNI_COMMAND {other:?}"),
    };
    assert_eq!(env.command, expected);
    let needs_attachment = matches!(env.command, Command::Add | Command::Del | Command::Check);
    assert_eq!(env.attachment.is_some(), needs_attachment);
    let Some(attachment) = env.attachment else {
        return;
    };
    // The container ID names files and interfaces: a plain token.
    let id = &attachment.container_id;
    assert!(id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()));
    assert!(
        id.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    );
    // The interface name is one Linux accepts.
    let ifname = &attachment.ifname;
    assert!(validate_ifname(ifname).is_ok());
    assert!(!ifname.is_empty() && ifname.len() <= 15);
    assert!(!ifname.contains(['/', ':']) && !ifname.chars().any(char::is_whitespace));
    assert!(ifname != "." && ifname != "..");
    assert!(attachment.netns.is_some() || env.command == Command::Del);
    for (key, value) in &attachment.args {
        assert!(!key.contains(';') && !value.contains(';'));
        let pair = format!("{key}={value}");
        assert!(
            vars["CNI_ARGS"].split(';').any(|p| p == pair),
            "{pair} is in CNI_ARGS"
        );
    }
});
