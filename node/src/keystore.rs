//! Secret and trust files on disk: identities, the network key and rosters.
//!
//! Secrets are written atomically (temp file, fsync, rename) with mode 0600 and refused on
//! load when group or others can read them, the way `ssh` treats private keys.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use medmesh_crypto::{Identity, KeyFileError, NetworkKey, NetworkKeyError, SignedRoster};

/// Why a key or roster file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A secret file that group or others may read.
    #[error("{path}: permissions {mode:04o} are too open for a secret key; run `chmod 600 {path}`")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Refusing to replace an existing key.
    #[error("{0} already exists; refusing to overwrite a key (pass --force to replace it)")]
    Exists(PathBuf),
    /// Not an identity file, or a damaged one.
    #[error("{path}: {problem}")]
    Identity {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: KeyFileError,
    },
    /// Not a network key file, or a damaged one.
    #[error("{path}: {problem}")]
    NetworkKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: NetworkKeyError,
    },
    /// Not a roster file.
    #[error("{path}: not a valid roster file: {reason}")]
    Roster {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeystoreError + '_ {
    move |source| KeystoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `contents` to `path` atomically with permission bits `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeystoreError> {
    medmesh_training::atomic_file::write(path, contents, mode).map_err(io_err(path))
}

/// Reads a secret file, refusing one that group or others can access.
fn read_secret(path: &Path) -> Result<String, KeystoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path)
            .map_err(io_err(path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeystoreError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
    }
    let bytes = fs::read(path).map_err(io_err(path))?;
    // A binary file is "another format", not an I/O problem: let the parser say so.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn refuse_overwrite(path: &Path, force: bool) -> Result<(), KeystoreError> {
    if !force && path.exists() {
        return Err(KeystoreError::Exists(path.to_owned()));
    }
    Ok(())
}

/// Saves an identity with mode 0600.
pub fn save_identity(path: &Path, identity: &Identity, force: bool) -> Result<(), KeystoreError> {
    refuse_overwrite(path, force)?;
    write_atomic(path, identity.to_key_file().as_bytes(), 0o600)
}

/// Loads an identity, checking permissions and format.
pub fn load_identity(path: &Path) -> Result<Identity, KeystoreError> {
    let text = zeroize::Zeroizing::new(read_secret(path)?);
    Identity::from_key_file(&text).map_err(|problem| KeystoreError::Identity {
        path: path.to_owned(),
        problem,
    })
}

/// Saves the network key with mode 0600.
pub fn save_network_key(path: &Path, key: &NetworkKey, force: bool) -> Result<(), KeystoreError> {
    refuse_overwrite(path, force)?;
    write_atomic(path, key.to_key_file().as_bytes(), 0o600)
}

/// Loads the network key, checking permissions and format.
pub fn load_network_key(path: &Path) -> Result<NetworkKey, KeystoreError> {
    let text = zeroize::Zeroizing::new(read_secret(path)?);
    text.parse().map_err(|problem| KeystoreError::NetworkKey {
        path: path.to_owned(),
        problem,
    })
}

/// Saves a roster as TOML (public, mode 0644).
pub fn save_roster(path: &Path, roster: &SignedRoster) -> Result<(), KeystoreError> {
    let text = toml::to_string(roster).map_err(|e| KeystoreError::Roster {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let header = "# medmesh consortium roster. Edit with `medmesh roster`; hand-editing voids endorsements.\n";
    write_atomic(path, format!("{header}{text}").as_bytes(), 0o644)
}

/// Loads a roster from TOML. Trust is decided by the caller (genesis or update rules).
pub fn load_roster(path: &Path) -> Result<SignedRoster, KeystoreError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    toml::from_str(&text).map_err(|e| KeystoreError::Roster {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_files_are_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let id = Identity::from_seed(&[4; 32]);
        save_identity(&path, &id, false).unwrap();
        assert_eq!(load_identity(&path).unwrap().public_key(), id.public_key());
        assert!(matches!(
            save_identity(&path, &id, false),
            Err(KeystoreError::Exists(_))
        ));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            let err = load_identity(&path).unwrap_err();
            assert!(
                matches!(err, KeystoreError::TooOpen { mode: 0o644, .. }),
                "{err}"
            );
            assert!(err.to_string().contains("chmod 600"));
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        }

        let text = fs::read_to_string(&path).unwrap();
        fs::remove_file(&path).unwrap();
        write_atomic(&path, &text.as_bytes()[..text.len() / 2], 0o600).unwrap();
        let err = load_identity(&path).unwrap_err();
        assert!(
            matches!(
                err,
                KeystoreError::Identity {
                    problem: KeyFileError::Truncated(_),
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("node.key"),
            "error names the file: {err}"
        );

        fs::remove_file(&path).unwrap();
        write_atomic(&path, &[0x89, b'P', b'N', b'G', 0, 1, 2], 0o600).unwrap();
        assert!(matches!(
            load_identity(&path),
            Err(KeystoreError::Identity {
                problem: KeyFileError::UnknownFormat { .. },
                ..
            })
        ));
    }

    #[test]
    fn network_key_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swarm.key");
        let key = NetworkKey::from_bytes([3; 32]);
        save_network_key(&path, &key, false).unwrap();
        assert_eq!(load_network_key(&path).unwrap(), key);
    }
}
