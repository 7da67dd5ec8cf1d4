//! The spec's error result: a code, a message and details, printed as JSON on stdout.

use serde::Serialize;

/// Well-known error codes from the CNI spec, and Trellis's own (100 and above).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const NOT_AVAILABLE_RESOURCES: u32 = 51;
    /// The kernel refused a link, address or route change.
    pub const DATAPLANE: u32 = 100;
    /// `CNI_IFNAME` is already taken inside the pod's namespace.
    pub const INTERFACE_EXISTS: u32 = 101;
    /// No free address is left in the node's pod CIDR.
    pub const POOL_EXHAUSTED: u32 = 102;
    /// The allocation state on disk cannot be read; it is left untouched.
    pub const STATE_CORRUPT: u32 = 103;
    /// CHECK found the pod's network differs from what ADD made.
    pub const CHECK_FAILED: u32 = 104;
}

/// A failed CNI operation, as the runtime will see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON the spec asks for, in the version of the request (the spec allows the plugin's
    /// own version when the request's could not be read).
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| {
            format!(
                "{{\"cniVersion\":\"{cni_version}\",\"code\":{},\"msg\":\"error\"}}",
                self.code
            )
        })
    }
}

impl From<trellis_netns::Error> for CniError {
    fn from(error: trellis_netns::Error) -> Self {
        CniError::new(
            code::DATAPLANE,
            "network setup failed",
            trellis_core::error_chain(&error),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_fields() {
        let error = CniError::new(
            code::POOL_EXHAUSTED,
            "no free address",
            "10.0.0.0/30 is full",
        );
        let json: serde_json::Value = serde_json::from_str(&error.to_json("1.1.0")).unwrap();
        assert_eq!(json["cniVersion"], "1.1.0");
        assert_eq!(json["code"], 102);
        assert_eq!(json["msg"], "no free address");
        assert_eq!(json["details"], "10.0.0.0/30 is full");
    }
}
