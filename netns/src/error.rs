use std::io;
use std::path::PathBuf;

/// What failed, and on what; the cause is the error's `source()`, not part of its message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create network namespace {name}")]
    CreateNamespace { name: String, source: io::Error },
    #[error("open network namespace {path}")]
    OpenNamespace { path: PathBuf, source: io::Error },
    #[error("delete network namespace {name}")]
    DeleteNamespace { name: String, source: io::Error },
    #[error("enter network namespace {path}")]
    EnterNamespace { path: PathBuf, source: io::Error },
    #[error("open a netlink socket")]
    Connect(#[source] io::Error),
    #[error("{operation}")]
    Netlink {
        operation: String,
        source: rtnetlink::Error,
    },
    #[error("link {0} not found")]
    LinkNotFound(String),
    #[error("sysctl {key}")]
    Sysctl { key: String, source: io::Error },
}

impl Error {
    pub(crate) fn netlink(operation: impl Into<String>, source: rtnetlink::Error) -> Self {
        Self::Netlink {
            operation: operation.into(),
            source,
        }
    }

    /// The errno the kernel answered with, for netlink failures.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Netlink {
                source: rtnetlink::Error::NetlinkError(message),
                ..
            } => Some(-message.raw_code()),
            Self::CreateNamespace { source, .. }
            | Self::OpenNamespace { source, .. }
            | Self::DeleteNamespace { source, .. }
            | Self::EnterNamespace { source, .. }
            | Self::Connect(source)
            | Self::Sysctl { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The object already exists (EEXIST).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc_errno::EEXIST)
    }

    /// The object is not there (ENOENT, ENODEV, ESRCH), or a link lookup found nothing.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::LinkNotFound(_))
            || matches!(
                self.errno(),
                Some(libc_errno::ENOENT | libc_errno::ENODEV | libc_errno::ESRCH)
            )
    }
}

/// The few errno values we branch on, without a libc dependency.
mod libc_errno {
    pub const ENOENT: i32 = nix::errno::Errno::ENOENT as i32;
    pub const ESRCH: i32 = nix::errno::Errno::ESRCH as i32;
    pub const EEXIST: i32 = nix::errno::Errno::EEXIST as i32;
    pub const ENODEV: i32 = nix::errno::Errno::ENODEV as i32;
}
