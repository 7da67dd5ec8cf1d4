//! `trellis peer config` gives an external machine a config that points at this node's gateway.

use std::process::Command;

use trellis_integration::bin_path;

#[test]
fn peer_config_names_this_gateway_and_a_fresh_key_for_the_machine() {
    let state = tempfile::tempdir().unwrap();
    let gateway_key = Command::new(bin_path("trellis-gateway"))
        .arg("public-key")
        .arg("--state-dir")
        .arg(state.path())
        .output()
        .unwrap();
    assert!(gateway_key.status.success());
    let gateway_key = String::from_utf8(gateway_key.stdout)
        .unwrap()
        .trim()
        .to_string();

    let config = |address: &str| {
        let output = Command::new(bin_path("trellis"))
            .args([
                "peer",
                "config",
                "--endpoint",
                "198.18.0.1:51820",
                "--address",
                address,
                "--allowed-ips",
                "10.1.0.0/16,10.96.0.0/12",
            ])
            .arg("--state-dir")
            .arg(state.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let first = config("10.99.0.2/32");
    let value = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")).map(str::to_string))
            .unwrap()
    };
    assert_eq!(
        value(&first, "PublicKey"),
        gateway_key,
        "the config points at this node's gateway"
    );
    assert_eq!(value(&first, "Endpoint"), "198.18.0.1:51820");
    assert_eq!(value(&first, "AllowedIPs"), "10.1.0.0/16, 10.96.0.0/12");
    assert_eq!(value(&first, "Address"), "10.99.0.2/32");
    // Each machine gets its own key; the gateway's private key never appears.
    let second = config("10.99.0.3/32");
    assert_ne!(value(&first, "PrivateKey"), value(&second, "PrivateKey"));
    let gateway_private = std::fs::read_to_string(state.path().join("private.key")).unwrap();
    assert!(!first.contains(gateway_private.trim()));
}
