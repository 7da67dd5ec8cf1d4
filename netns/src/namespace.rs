use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

use crate::Error;

/// Where iproute2 keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// An open handle on a network namespace. Holding it keeps the namespace alive even when its
/// name is deleted.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    /// Creates the named namespace `/run/netns/<name>`, as `ip netns add` does.
    pub fn create(name: &str) -> Result<Self, Error> {
        validate_name(name).map_err(|source| Error::CreateNamespace {
            name: name.into(),
            source,
        })?;
        let create_err = |source| Error::CreateNamespace {
            name: name.into(),
            source,
        };
        ensure_run_dir_is_shared().map_err(create_err)?;
        let path = path_of(name);
        // The empty file is the mount point of the namespace's bind mount.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o000)
            .open(&path)
            .map_err(create_err)?;
        let target = path.clone();
        let bound = std::thread::spawn(move || -> io::Result<()> {
            // This thread alone moves into the new namespace, binds it to the file, and exits.
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")));
        if let Err(source) = bound {
            let _ = fs::remove_file(&path);
            return Err(create_err(source));
        }
        Self::open_path(&path)
    }

    /// Opens the named namespace `/run/netns/<name>`.
    pub fn open(name: &str) -> Result<Self, Error> {
        Self::open_path(&path_of(name))
    }

    /// Opens a namespace by path: `/run/netns/x`, `/proc/<pid>/ns/net`, or whatever a container
    /// runtime passes as `CNI_NETNS`.
    pub fn open_path(path: &Path) -> Result<Self, Error> {
        let file = File::open(path).map_err(|source| Error::OpenNamespace {
            path: path.to_path_buf(),
            source,
        })?;
        // A plain file at that path (an unmounted leftover, a typo) is not a namespace.
        // fs_type_t is a different integer type on different architectures.
        #[allow(clippy::unnecessary_cast)]
        let on_nsfs = nix::sys::statfs::fstatfs(&file)
            .map(|stat| stat.filesystem_type().0 as i64 == NSFS_MAGIC)
            .unwrap_or(false);
        if !on_nsfs {
            return Err(Error::OpenNamespace {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace"),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Another handle on the same namespace (a duplicated descriptor), for another thread.
    pub fn try_clone(&self) -> Result<Self, Error> {
        let file = self
            .file
            .try_clone()
            .map_err(|source| Error::OpenNamespace {
                path: self.path.clone(),
                source,
            })?;
        Ok(Self {
            path: self.path.clone(),
            file,
        })
    }

    /// The namespace the calling thread is in.
    pub fn current() -> Result<Self, Error> {
        Self::open_path(Path::new("/proc/thread-self/ns/net"))
    }

    /// Removes the named namespace, as `ip netns delete` does. Processes still inside keep it
    /// alive until they exit.
    pub fn delete(name: &str) -> Result<(), Error> {
        let path = path_of(name);
        let delete_err = |source| Error::DeleteNamespace {
            name: name.into(),
            source,
        };
        match umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(nix::errno::Errno::ENOENT) => {
                return Err(delete_err(io::Error::from(io::ErrorKind::NotFound)));
            }
            Err(errno) => return Err(delete_err(errno.into())),
        }
        fs::remove_file(&path).map_err(delete_err)
    }

    /// Whether `/run/netns/<name>` exists.
    pub fn exists(name: &str) -> bool {
        path_of(name).exists()
    }

    /// The names under `/run/netns`, sorted.
    pub fn list() -> io::Result<Vec<String>> {
        let mut names = match fs::read_dir(NETNS_RUN_DIR) {
            Ok(entries) => entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .collect::<Vec<_>>(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        names.sort();
        Ok(names)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a fresh thread that has entered this namespace; the thread exits afterwards,
    /// so no other code ever runs in the wrong namespace. Use it to create sockets, netlink
    /// handles and child processes, which stay bound to the namespace they were made in.
    pub fn run<F, T>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let fd: BorrowedFd<'_> = self.file.as_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(fd, CloneFlags::CLONE_NEWNET).map_err(|errno| Error::EnterNamespace {
                        path: self.path.clone(),
                        source: errno.into(),
                    })?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts `command` inside this namespace (the child inherits the namespace of the thread
    /// that spawns it).
    pub fn spawn(&self, command: &mut Command) -> Result<io::Result<Child>, Error> {
        self.run(|| command.spawn())
    }

    /// The namespace file descriptor, e.g. for moving a link into it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The magic number of nsfs, the filesystem namespace handles live on.
const NSFS_MAGIC: i64 = 0x6e73_6673;

fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn validate_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.len() > 255 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid namespace name"),
        ));
    }
    Ok(())
}

/// iproute2 makes `/run/netns` a shared mount point, so namespaces bound under it propagate to
/// mount namespaces created later (`ip netns exec` relies on that).
fn ensure_run_dir_is_shared() -> io::Result<()> {
    fs::create_dir_all(NETNS_RUN_DIR)?;
    let make_shared = || {
        mount(
            None::<&str>,
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            // Not a mount point yet: bind it onto itself first, then share it.
            mount(
                Some(NETNS_RUN_DIR),
                NETNS_RUN_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            make_shared().map_err(Into::into)
        }
        Err(errno) => Err(errno.into()),
    }
}
