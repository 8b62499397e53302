//! Credentials read from a mounted Secret: one file per key in a directory (the way Kubernetes mounts a
//! Secret volume), or environment variables `MESHLINE_<PREFIX>_<KEY>` for local runs. Never from a spec.

use std::path::{Path, PathBuf};

/// A missing or unreadable credential, naming the key and where it was looked for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialsError {
    #[error(
        "credential {key:?} is missing: expected the file {path} (from the Secret) or the variable {env}"
    )]
    Missing {
        key: String,
        path: String,
        env: String,
    },
    /// Missing from a Secret the controller read itself (it mounts nothing).
    #[error("credential {key:?} is missing: Secret {secret} has no such key")]
    NotInSecret { key: String, secret: String },
    #[error("credential {key:?} could not be read from {path}: {reason}")]
    Unreadable {
        key: String,
        path: String,
        reason: String,
    },
    /// Present but unusable (a private key that is not PEM, say). The reason never quotes the value.
    #[error("credential {key:?} is malformed: {reason}")]
    Malformed { key: String, reason: String },
}

/// The keys of one Secret.
#[derive(Debug, Clone)]
pub struct Credentials {
    dir: Option<PathBuf>,
    env_prefix: String,
    /// The Secret's values when the process read the Secret through the API (the controller's ticket
    /// sinks) rather than from a mount.
    read: Option<ReadSecret>,
}

/// A Secret's values as read through the API. Its `Debug` shows the key names only: a credential is never
/// printed, not even by a `{:?}` in an error path.
#[derive(Clone)]
struct ReadSecret {
    name: String,
    values: std::collections::BTreeMap<String, String>,
}

impl std::fmt::Debug for ReadSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadSecret")
            .field("name", &self.name)
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Credentials {
    /// Keys are files in `dir` (a mounted Secret), falling back to `MESHLINE_<PREFIX>_<KEY>` variables.
    pub fn new(dir: Option<&Path>, env_prefix: &str) -> Credentials {
        Credentials {
            dir: dir.map(Path::to_path_buf),
            env_prefix: env_prefix.to_ascii_uppercase(),
            read: None,
        }
    }

    /// The keys of the Secret `name` as the API served them (already decoded), for a process that reads a
    /// Secret instead of mounting it. No fallback to files or variables: the Secret is the only source.
    pub fn from_secret(
        name: &str,
        values: std::collections::BTreeMap<String, String>,
    ) -> Credentials {
        Credentials {
            dir: None,
            env_prefix: String::new(),
            read: Some(ReadSecret {
                name: name.to_string(),
                values,
            }),
        }
    }

    fn env_name(&self, key: &str) -> String {
        let key: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("MESHLINE_{}_{key}", self.env_prefix)
    }

    /// The value of `key`, trimmed of a trailing newline (as `kubectl create secret --from-file` leaves it).
    pub fn get(&self, key: &str) -> Result<String, CredentialsError> {
        if let Some(read) = &self.read {
            return read
                .values
                .get(key)
                .map(|v| v.trim_end_matches(['\n', '\r']).to_string())
                .ok_or_else(|| CredentialsError::NotInSecret {
                    key: key.to_string(),
                    secret: read.name.clone(),
                });
        }
        let env = self.env_name(key);
        let path = self.dir.as_ref().map(|d| d.join(key));
        if let Some(path) = &path {
            match std::fs::read_to_string(path) {
                Ok(value) => return Ok(value.trim_end_matches(['\n', '\r']).to_string()),
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(CredentialsError::Unreadable {
                        key: key.to_string(),
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    });
                }
                Err(_) => {}
            }
        }
        std::env::var(&env).map_err(|_| CredentialsError::Missing {
            key: key.to_string(),
            path: path
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(no Secret directory)".into()),
            env,
        })
    }

    /// A digest of every key file of the Secret (names and contents), to notice a rotation cheaply: Kubernetes
    /// updates a mounted Secret in place by swapping the `..data` symlink, so the files change under a
    /// running process. `None` without a Secret directory (environment variables do not change at runtime).
    /// Kubernetes' own entries (`..data`, `..2024_…`) are skipped; the key files are read through them.
    pub fn fingerprint(&self) -> Option<[u8; 32]> {
        use sha2::{Digest, Sha256};
        let dir = self.dir.as_ref()?;
        let mut names: Vec<std::ffi::OsString> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .filter(|n| !n.to_string_lossy().starts_with(".."))
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        let mut digest = Sha256::new();
        for name in names {
            let path = dir.join(&name);
            if !path.is_file() {
                continue;
            }
            digest.update(name.to_string_lossy().as_bytes());
            digest.update([0]);
            digest.update(std::fs::read(&path).unwrap_or_default());
            digest.update([0]);
        }
        Some(digest.finalize().into())
    }

    /// The value of `key` if present.
    pub fn optional(&self, key: &str) -> Result<Option<String>, CredentialsError> {
        match self.get(key) {
            Ok(v) => Ok(Some(v)),
            Err(CredentialsError::Missing { .. } | CredentialsError::NotInSecret { .. }) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_read_through_the_api_is_the_only_source_and_never_printed() {
        let c = Credentials::from_secret(
            "ns/alert-webhook-signing",
            [("signingSecret".to_string(), "s3cr3t-value\n".to_string())].into(),
        );
        assert_eq!(c.get("signingSecret").unwrap(), "s3cr3t-value");
        assert_eq!(c.optional("token").unwrap(), None);
        let missing = c.get("token").unwrap_err().to_string();
        assert!(
            missing.contains("ns/alert-webhook-signing") && missing.contains("token"),
            "{missing}"
        );
        let printed = format!("{c:?}");
        assert!(
            printed.contains("signingSecret") && !printed.contains("s3cr3t"),
            "{printed}"
        );
    }

    #[test]
    fn a_rotation_through_the_data_symlink_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let write = |version: &str, token: &str| {
            let data = dir.path().join(format!("..{version}"));
            std::fs::create_dir_all(&data).unwrap();
            std::fs::write(data.join("token"), token).unwrap();
            let tmp = dir.path().join("..data_tmp");
            std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
            std::fs::rename(&tmp, dir.path().join("..data")).unwrap();
        };
        write("v1", "old");
        std::os::unix::fs::symlink("..data/token", dir.path().join("token")).unwrap();
        let creds = Credentials::new(Some(dir.path()), "sink");
        let before = creds.fingerprint().unwrap();
        assert_eq!(
            creds.fingerprint().unwrap(),
            before,
            "stable while unchanged"
        );
        write("v2", "new");
        assert_ne!(creds.fingerprint().unwrap(), before);
        assert_eq!(creds.get("token").unwrap(), "new");
        assert!(Credentials::new(None, "sink").fingerprint().is_none());
    }

    #[test]
    fn files_win_over_environment_and_newlines_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("clientSecret"), "s3cret\n").unwrap();
        let creds = Credentials::new(Some(dir.path()), "sink");
        assert_eq!(creds.get("clientSecret").unwrap(), "s3cret");
        let err = creds.get("token").unwrap_err();
        assert!(err.to_string().contains("MESHLINE_SINK_TOKEN"), "{err}");
        assert_eq!(creds.optional("token").unwrap(), None);
    }
}
