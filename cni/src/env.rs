//! The `CNI_*` environment a runtime passes, parsed and validated once.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{CniError, code};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            _ => return None,
        })
    }
}

/// The container a command is about (ADD, DEL and CHECK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// Absent only on DEL, where the namespace may already be gone.
    pub netns: Option<PathBuf>,
    pub args: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    pub command: Command,
    pub attachment: Option<Attachment>,
}

fn invalid(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_ENVIRONMENT, msg, details)
}

impl Environment {
    pub fn from_process() -> Result<Self, CniError> {
        Self::parse(
            &std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        )
    }

    pub fn parse(vars: &HashMap<String, String>) -> Result<Self, CniError> {
        let get = |key: &str| vars.get(key).map(String::as_str).filter(|v| !v.is_empty());
        let command_text =
            get("CNI_COMMAND").ok_or_else(|| invalid("CNI_COMMAND is not set", ""))?;
        let command = Command::parse(command_text).ok_or_else(|| {
            invalid(
                "unknown CNI_COMMAND",
                format!("{command_text:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
            )
        })?;
        let attachment = match command {
            Command::Version | Command::Status | Command::Gc => None,
            Command::Add | Command::Del | Command::Check => {
                let container_id = get("CNI_CONTAINERID")
                    .ok_or_else(|| invalid("CNI_CONTAINERID is not set", ""))?;
                validate_container_id(container_id)?;
                let ifname =
                    get("CNI_IFNAME").ok_or_else(|| invalid("CNI_IFNAME is not set", ""))?;
                validate_ifname(ifname)?;
                let netns = get("CNI_NETNS").map(PathBuf::from);
                if netns.is_none() && command != Command::Del {
                    return Err(invalid(
                        "CNI_NETNS is not set",
                        "ADD and CHECK need the container's network namespace",
                    ));
                }
                Some(Attachment {
                    container_id: container_id.to_string(),
                    ifname: ifname.to_string(),
                    netns,
                    args: parse_args(get("CNI_ARGS").unwrap_or(""))?,
                })
            }
        };
        Ok(Self {
            command,
            attachment,
        })
    }
}

/// The spec: alphanumerics plus underscore, dot and hyphen, starting with an alphanumeric.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let valid_first = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let valid_rest = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid_first && valid_rest {
        Ok(())
    } else {
        Err(invalid(
            "CNI_CONTAINERID is not valid",
            format!("{id:?} must be alphanumeric, '_', '.' or '-'"),
        ))
    }
}

/// Linux's rules for interface names (`dev_valid_name`).
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        Err(invalid(
            "CNI_IFNAME is not a valid interface name",
            format!("{name:?}: at most 15 characters, no '/', ':' or spaces"),
        ))
    } else {
        Ok(())
    }
}

/// `CNI_ARGS`: `K1=V1;K2=V2`.
fn parse_args(text: &str) -> Result<Vec<(String, String)>, CniError> {
    text.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    invalid(
                        "CNI_ARGS is malformed",
                        format!("{pair:?} is not KEY=VALUE"),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_a_containerd_add() {
        let env = Environment::parse(&vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "4f7c1d9e0b"),
            ("CNI_NETNS", "/var/run/netns/cni-1234"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;IgnoreUnknown=1",
            ),
            ("CNI_PATH", "/opt/cni/bin"),
        ]))
        .unwrap();
        assert_eq!(env.command, Command::Add);
        let attachment = env.attachment.unwrap();
        assert_eq!(attachment.ifname, "eth0");
        assert_eq!(
            attachment.args[1],
            ("K8S_POD_NAME".to_string(), "web-0".to_string())
        );
    }

    #[test]
    fn del_may_come_without_a_namespace() {
        let env = Environment::parse(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(env.attachment.unwrap().netns, None);
    }

    #[test]
    fn rejects_bad_environments_with_code_4() {
        let cases: [&[(&str, &str)]; 7] = [
            &[],
            &[("CNI_COMMAND", "FROB")],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "a b"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "abc"),
                ("CNI_IFNAME", "a-very-long-ifname"),
                ("CNI_NETNS", "/x"),
            ],
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", "abc"),
                ("CNI_IFNAME", "eth0"),
            ],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "abc"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
                ("CNI_ARGS", "novalue"),
            ],
        ];
        for case in cases {
            let error = Environment::parse(&vars(case)).unwrap_err();
            assert_eq!(error.code, code::INVALID_ENVIRONMENT, "{case:?}: {error}");
        }
    }

    #[test]
    fn version_needs_nothing_but_the_command() {
        assert_eq!(
            Environment::parse(&vars(&[("CNI_COMMAND", "VERSION")]))
                .unwrap()
                .command,
            Command::Version
        );
    }
}
