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
}

impl Credentials {
    /// Keys are files in `dir` (a mounted Secret), falling back to `MESHLINE_<PREFIX>_<KEY>` variables.
    pub fn new(dir: Option<&Path>, env_prefix: &str) -> Credentials {
        Credentials {
            dir: dir.map(Path::to_path_buf),
            env_prefix: env_prefix.to_ascii_uppercase(),
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

    /// The value of `key` if present.
    pub fn optional(&self, key: &str) -> Result<Option<String>, CredentialsError> {
        match self.get(key) {
            Ok(v) => Ok(Some(v)),
            Err(CredentialsError::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
