//! wg-quick configurations for external peers (a laptop, a VM) that join the mesh through a
//! gateway.

use std::fmt::Write;
use std::net::SocketAddr;

use ipnet::IpNet;
use trellis_core::wgkey::PublicKey;

/// What an external peer needs to know.
#[derive(Debug, Clone)]
pub struct ExternalPeer {
    /// The external peer's own private key (base64), generated for it.
    pub private_key: String,
    /// Its tunnel address(es), e.g. `10.99.0.2/32`.
    pub addresses: Vec<IpNet>,
    /// The gateway it connects to.
    pub gateway_public_key: PublicKey,
    pub gateway_endpoint: SocketAddr,
    /// What it routes into the mesh (pod and service CIDRs).
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A standard wg-quick file (`wg-quick up ./trellis.conf`; `wg-quick strip` gives `wg setconf`
/// input).
pub fn render_wg_quick(peer: &ExternalPeer) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "[Interface]");
    let _ = writeln!(text, "PrivateKey = {}", peer.private_key);
    if !peer.addresses.is_empty() {
        let _ = writeln!(text, "Address = {}", join(&peer.addresses));
    }
    let _ = writeln!(text);
    let _ = writeln!(text, "[Peer]");
    let _ = writeln!(text, "PublicKey = {}", peer.gateway_public_key);
    let _ = writeln!(text, "Endpoint = {}", peer.gateway_endpoint);
    let _ = writeln!(text, "AllowedIPs = {}", join(&peer.allowed_ips));
    if let Some(keepalive) = peer.persistent_keepalive {
        let _ = writeln!(text, "PersistentKeepalive = {keepalive}");
    }
    text
}

/// The wg-quick file for a new external peer of the gateway whose key lives in `state_dir`
/// (generated if this is its first use), with a fresh key pair for the external machine. The
/// file opens with a comment giving the external peer's public key, which the desired state
/// must list for the gateway to accept it.
pub fn new_external_peer(
    state_dir: &std::path::Path,
    endpoint: SocketAddr,
    addresses: Vec<IpNet>,
    allowed_ips: Vec<IpNet>,
    keepalive: u16,
) -> Result<String, crate::Error> {
    let gateway = crate::keys::KeyPair::load_or_generate(state_dir)?;
    let external = crate::keys::KeyPair::generate();
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# Trellis external peer. Its public key, for the desired state:"
    );
    let _ = writeln!(text, "# {}", external.public_key());
    text.push_str(&render_wg_quick(&ExternalPeer {
        private_key: external.private_key_base64(),
        addresses,
        gateway_public_key: gateway.public_key(),
        gateway_endpoint: endpoint,
        allowed_ips,
        persistent_keepalive: Some(keepalive),
    }));
    Ok(text)
}

/// The command-line face of [`new_external_peer`], shared by `trellis peer config` and
/// `trellis-gateway peer-config`.
#[derive(Debug, clap::Args)]
pub struct PeerConfigArgs {
    /// The gateway's state directory (its key lives there).
    #[arg(long, default_value = "/var/lib/trellis-gateway")]
    pub state_dir: std::path::PathBuf,
    /// The gateway's UDP endpoint as the external machine reaches it.
    #[arg(long)]
    pub endpoint: SocketAddr,
    /// The external machine's tunnel address(es), e.g. 10.99.0.2/32.
    #[arg(long, value_delimiter = ',', required = true)]
    pub address: Vec<IpNet>,
    /// The CIDRs it routes into the mesh (pod and service CIDRs).
    #[arg(long, value_delimiter = ',', required = true)]
    pub allowed_ips: Vec<IpNet>,
    #[arg(long, default_value_t = 25)]
    pub keepalive: u16,
}

impl PeerConfigArgs {
    pub fn render(self) -> Result<String, crate::Error> {
        new_external_peer(
            &self.state_dir,
            self.endpoint,
            self.address,
            self.allowed_ips,
            self.keepalive,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_wg_quick_file() {
        let text = render_wg_quick(&ExternalPeer {
            private_key: "cHJpdmF0ZQ==".into(),
            addresses: vec!["10.99.0.2/32".parse().unwrap()],
            gateway_public_key: PublicKey([1; 32]),
            gateway_endpoint: "198.18.0.1:51820".parse().unwrap(),
            allowed_ips: vec!["10.1.0.0/16".parse().unwrap(), "fd01::/48".parse().unwrap()],
            persistent_keepalive: Some(25),
        });
        assert_eq!(
            text,
            "[Interface]\nPrivateKey = cHJpdmF0ZQ==\nAddress = 10.99.0.2/32\n\n[Peer]\n\
             PublicKey = AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n\
             Endpoint = 198.18.0.1:51820\nAllowedIPs = 10.1.0.0/16, fd01::/48\n\
             PersistentKeepalive = 25\n"
        );
    }
}
