//! The gateway's WireGuard key pair: generated on first start, the private half stored 0600
//! under the state directory and never sent anywhere.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use boringtun::x25519::{PublicKey, StaticSecret};
use rand_core::OsRng;
use trellis_core::wgkey::{self, decode_key, encode_key};

use crate::Error;

/// The file under the state directory holding the private key, base64, one line.
pub const PRIVATE_KEY_FILE: &str = "private.key";
/// The key a rotation replaced, kept (0600) until the rotation is done: see
/// [`crate::rotation`].
pub const PREVIOUS_KEY_FILE: &str = "previous.key";

/// The public keys that are this gateway's own: the current one and, while a rotation's
/// grace period lasts, the one it replaced. A plan entry with either is not a peer.
#[derive(Debug, Clone)]
pub struct OwnKeys(std::sync::Arc<std::sync::RwLock<(wgkey::PublicKey, Option<wgkey::PublicKey>)>>);

impl OwnKeys {
    pub fn new(current: wgkey::PublicKey) -> Self {
        Self(std::sync::Arc::new(std::sync::RwLock::new((current, None))))
    }

    fn read(&self) -> (wgkey::PublicKey, Option<wgkey::PublicKey>) {
        *self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn current(&self) -> wgkey::PublicKey {
        self.read().0
    }

    pub fn contains(&self, key: &wgkey::PublicKey) -> bool {
        let (current, previous) = self.read();
        current == *key || previous == Some(*key)
    }

    pub fn set(&self, current: wgkey::PublicKey, previous: Option<wgkey::PublicKey>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (current, previous);
    }
}

/// Stores a rotation: the old private key as [`PREVIOUS_KEY_FILE`] first, then the new one
/// over [`PRIVATE_KEY_FILE`]; each 0600 and atomic, so a crash leaves the old key or the new
/// one in place, never neither.
pub fn store_rotation(state_dir: &Path, old: &KeyPair, new: &KeyPair) -> Result<(), Error> {
    old.store(&state_dir.join(PREVIOUS_KEY_FILE))?;
    new.store(&state_dir.join(PRIVATE_KEY_FILE))
}

/// Removes the key a rotation replaced (done, or interrupted by a restart: the process that
/// starts again uses the stored new key only). A failure is logged.
pub fn forget_previous(state_dir: &Path) {
    let path = state_dir.join(PREVIOUS_KEY_FILE);
    match fs::remove_file(&path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed the previous WireGuard key"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), "remove the previous WireGuard key: {e}"),
    }
}

/// The gateway's key pair. `Debug` never shows the private key.
#[derive(Clone)]
pub struct KeyPair {
    private: StaticSecret,
    public: PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    pub fn generate() -> Self {
        Self::from_private(StaticSecret::random_from_rng(OsRng))
    }

    pub fn from_private(private: StaticSecret) -> Self {
        let public = PublicKey::from(&private);
        Self { private, public }
    }

    /// Loads the key under `state_dir`, or generates and stores one (0600 in a 0700 directory)
    /// on first start. A key file readable by group or others is refused, not silently fixed.
    pub fn load_or_generate(state_dir: &Path) -> Result<Self, Error> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| Error::CreateStateDir {
                path: state_dir.to_path_buf(),
                source,
            })?;
        let path = state_dir.join(PRIVATE_KEY_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => Self::parse_stored(&path, &text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let pair = Self::generate();
                pair.store(&path)?;
                Ok(pair)
            }
            Err(source) => Err(Error::ReadKey { path, source }),
        }
    }

    /// Loads the key stored under `state_dir`; never creates one.
    pub fn load(state_dir: &Path) -> Result<Self, Error> {
        let path = state_dir.join(PRIVATE_KEY_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => Self::parse_stored(&path, &text),
            Err(source) => Err(Error::ReadKey { path, source }),
        }
    }

    fn parse_stored(path: &Path, text: &str) -> Result<Self, Error> {
        let mode = fs::metadata(path)
            .map_err(|source| Error::ReadKey {
                path: path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::KeyPermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let bytes = decode_key(text).map_err(|_| Error::ParseKey {
            path: path.to_path_buf(),
        })?;
        Ok(Self::from_private(StaticSecret::from(bytes)))
    }

    /// Stores the private key 0600, atomically: a crash never leaves a half-written or
    /// world-readable key.
    fn store(&self, path: &Path) -> Result<(), Error> {
        let line = format!("{}\n", encode_key(&self.private.to_bytes()));
        trellis_files::write_atomically(path, line.as_bytes(), 0o600).map_err(|source| {
            Error::WriteKey {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    pub fn public_key(&self) -> wgkey::PublicKey {
        wgkey::PublicKey(self.public.to_bytes())
    }

    pub(crate) fn secret(&self) -> &StaticSecret {
        &self.private
    }

    pub(crate) fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The private key in `wg` format, for configs this process prints for *another* machine
    /// (external peers). Never call it on the gateway's own key outside tests.
    pub fn private_key_base64(&self) -> String {
        encode_key(&self.private.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_loads_the_same_key_with_0600() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = KeyPair::load_or_generate(&state).unwrap();
        let path = state.join(PRIVATE_KEY_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let second = KeyPair::load_or_generate(&state).unwrap();
        assert_eq!(first.public_key(), second.public_key());
        assert!(!format!("{first:?}").contains(&first.private_key_base64()));
    }

    #[test]
    fn a_rotation_keeps_the_old_key_0600_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let old = KeyPair::load_or_generate(dir.path()).unwrap();
        let new = KeyPair::generate();
        store_rotation(dir.path(), &old, &new).unwrap();
        assert_eq!(
            KeyPair::load(dir.path()).unwrap().public_key(),
            new.public_key()
        );
        let previous = dir.path().join(PREVIOUS_KEY_FILE);
        let mode = fs::metadata(&previous).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&previous).unwrap();
        assert_eq!(text.trim(), old.private_key_base64());
        forget_previous(dir.path());
        assert!(!previous.exists());
        forget_previous(dir.path());
    }

    #[test]
    fn refuses_a_readable_or_corrupt_key() {
        let dir = tempfile::tempdir().unwrap();
        KeyPair::load_or_generate(dir.path()).unwrap();
        let path = dir.path().join(PRIVATE_KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            KeyPair::load_or_generate(dir.path()),
            Err(Error::KeyPermissions { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            KeyPair::load_or_generate(dir.path()),
            Err(Error::ParseKey { .. })
        ));
    }
}
