//! Who a person is when they decide on a held record: the owner of the roster whose personal token the
//! request presents (`X-Meshline-Identity`). The roster's `spec.identitySecretRef` names a Secret whose keys
//! are owner ids and whose values are their tokens; the controller mounts it beside the flow's Secrets, and
//! a local run may give `MESHLINE_IDENTITY_<OWNER ID>` variables instead. The flow's token (`Authorization`)
//! proves the caller may use the operations API at all; this proves which person is acting.
//!
//! Owns loading and matching the tokens. It keeps only their SHA-256 digests, compares in constant time, and
//! never logs, returns or formats a token. Deciding what an owner may do with a record is the API's.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use crate::api::{Owner, OwnershipRoster};
use crate::connectors::Credentials;

/// The header carrying the person's token.
pub const IDENTITY_HEADER: &str = "x-meshline-identity";

/// Shorter tokens are refused at load: a personal token is a password to approve records in someone's name.
pub const MIN_TOKEN_BYTES: usize = 16;

/// The owners a worker can recognise, each by the digest of their token.
pub struct Identities {
    /// Why nobody can be recognised, when nobody can (no roster, or no `identitySecretRef`): the message a
    /// refused person reads.
    unavailable: Option<String>,
    owners: Vec<(Owner, [u8; 32])>,
}

impl std::fmt::Debug for Identities {
    // Owner ids only: the digests are not secrets, but nothing about a token needs to reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("unavailable", &self.unavailable)
            .field(
                "owners",
                &self.owners.iter().map(|(o, _)| &o.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equality of two digests in time independent of where they differ. Comparing fixed-length digests rather
/// than the tokens also keeps a token's length from showing in the timing.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Identities {
    /// Nobody can be recognised, for the reason given (shown to whoever is refused).
    pub fn unavailable(why: impl Into<String>) -> Identities {
        Identities {
            unavailable: Some(why.into()),
            owners: Vec::new(),
        }
    }

    /// Why nobody can be recognised, if nobody can.
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// The owner whose token was presented, if any. Every owner's digest is compared, so the time taken
    /// does not tell which owner (or whether any) came close.
    pub fn identify(&self, presented: &str) -> Option<&Owner> {
        if presented.is_empty() {
            return None;
        }
        let given = digest(presented);
        let mut found = None;
        for (owner, expected) in &self.owners {
            if same_digest(&given, expected) && found.is_none() {
                found = Some(owner);
            }
        }
        found
    }

    /// The ids of the owners who have a token, in the roster's order.
    pub fn owner_ids(&self) -> Vec<&str> {
        self.owners.iter().map(|(o, _)| o.id.as_str()).collect()
    }
}

/// Whether `owner` holds the approver role `role` (a hold rule's `approverRole`).
pub fn holds_role(owner: &Owner, role: &str) -> bool {
    owner.approver_roles.iter().any(|r| r == role)
}

fn roster_name(roster: &OwnershipRoster) -> &str {
    roster.metadata.name.as_deref().unwrap_or_default()
}

/// Reads every owner's token through `token_of` (owner id → token, if the owner has one) and checks them.
fn build(
    roster: &OwnershipRoster,
    token_of: impl Fn(&str) -> Result<Option<String>, String>,
) -> Result<Identities, String> {
    let name = roster_name(roster);
    let mut owners: Vec<(Owner, [u8; 32])> = Vec::new();
    for owner in &roster.spec.owners {
        let Some(token) = token_of(&owner.id)? else {
            // An owner without a token simply cannot decide; most owners never approve anything.
            continue;
        };
        let token = token.trim();
        if token.len() < MIN_TOKEN_BYTES {
            return Err(format!(
                "OwnershipRoster {name} spec.identitySecretRef: the token under key {:?} is {} bytes, too weak to \
                 prove who approves (at least {MIN_TOKEN_BYTES}); generate one with e.g. `openssl rand -hex 32`",
                owner.id,
                token.len()
            ));
        }
        let d = digest(token);
        if let Some((other, _)) = owners.iter().find(|(_, e)| same_digest(e, &d)) {
            return Err(format!(
                "OwnershipRoster {name} spec.identitySecretRef: keys {:?} and {:?} hold the same token, so it \
                 cannot tell who acts; give each owner their own",
                other.id, owner.id
            ));
        }
        owners.push((owner.clone(), d));
    }
    Ok(Identities {
        unavailable: None,
        owners,
    })
}

/// The identities of the flow's roster: each owner's token from the mounted identity Secret
/// (`<secrets_dir>/<identitySecretRef.name>/<owner id>`), else from `MESHLINE_IDENTITY_<OWNER ID>`. A roster
/// without `identitySecretRef` (or no roster) loads, but recognises nobody and says why. The error names
/// the roster, the field and the key, never a token.
pub fn load(
    roster: Option<&OwnershipRoster>,
    secrets_dir: Option<&Path>,
) -> Result<Identities, String> {
    let Some(roster) = roster else {
        return Ok(Identities::unavailable(
            "no OwnershipRoster covers this flow, so no owner can approve or reject its held records",
        ));
    };
    let name = roster_name(roster);
    let Some(secret) = &roster.spec.identity_secret_ref else {
        return Ok(Identities::unavailable(format!(
            "OwnershipRoster {name} has no spec.identitySecretRef, so nobody can prove who they are and \
             nobody can approve or reject; set it to a Secret whose keys are owner ids and whose values \
             are their personal tokens"
        )));
    };
    let credentials = Credentials::new(
        secrets_dir.map(|d| d.join(&secret.name)).as_deref(),
        "IDENTITY",
    );
    build(roster, |id| {
        credentials.optional(id).map_err(|e| {
            format!(
                "OwnershipRoster {name} spec.identitySecretRef (Secret {}): {e}",
                secret.name
            )
        })
    })
}

/// One reading of the identity Secret: its fingerprint then, and what it loaded to.
type Reading = (Option<[u8; 32]>, Arc<Result<Identities, String>>);

/// The identities a running worker uses, read again when the mounted identity Secret changes (Kubernetes
/// rewrites a mounted Secret in place), so a revoked token stops working without a restart.
pub struct IdentityBook {
    roster: Option<OwnershipRoster>,
    secrets_dir: Option<PathBuf>,
    /// The Secret's directory as last read, when there is one to watch.
    watched: Option<Credentials>,
    current: RwLock<Reading>,
}

impl std::fmt::Debug for IdentityBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityBook")
            .field("current", &self.read().1)
            .finish()
    }
}

impl IdentityBook {
    /// The roster's identities as [`load`] reads them, followed as the mounted Secret changes.
    pub fn load(roster: Option<&OwnershipRoster>, secrets_dir: Option<&Path>) -> IdentityBook {
        let watched = roster
            .and_then(|r| r.spec.identity_secret_ref.as_ref())
            .and_then(|s| {
                secrets_dir.map(|d| Credentials::new(Some(&d.join(&s.name)), "IDENTITY"))
            });
        let fingerprint = watched.as_ref().and_then(Credentials::fingerprint);
        IdentityBook {
            roster: roster.cloned(),
            secrets_dir: secrets_dir.map(Path::to_path_buf),
            current: RwLock::new((fingerprint, Arc::new(load(roster, secrets_dir)))),
            watched,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Reading> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The identities now: read again first if the mounted Secret changed since the last reading.
    pub fn current(&self) -> Arc<Result<Identities, String>> {
        let Some(watched) = &self.watched else {
            return self.read().1.clone();
        };
        let now = watched.fingerprint();
        if now == self.read().0 {
            return self.read().1.clone();
        }
        let loaded = Arc::new(load(self.roster.as_ref(), self.secrets_dir.as_deref()));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (now, loaded.clone());
        loaded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster(identity_secret: Option<&str>) -> OwnershipRoster {
        let mut yaml = String::from(
            "apiVersion: sync.meshline.io/v1alpha1
kind: OwnershipRoster
metadata: {name: revenue-operations, namespace: revenue-sync}
spec:
  owners:
    - {id: dana, name: Dana Okafor}
    - {id: marcus, name: Marcus Lindqvist, approverRoles: [finance]}
    - {id: priya-r, name: Priya Raman, approverRoles: [sales-ops]}
",
        );
        if let Some(s) = identity_secret {
            yaml.push_str(&format!("  identitySecretRef: {{name: {s}}}\n"));
        }
        serde_yaml::from_str(&yaml).unwrap()
    }

    const MARCUS: &str = "marcus-personal-token-0123456789";
    const DANA: &str = "dana-personal-token-abcdefghijkl";

    fn mounted(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("meshline-identities");
        std::fs::create_dir_all(&secret).unwrap();
        for (k, v) in files {
            std::fs::write(secret.join(k), format!("{v}\n")).unwrap();
        }
        dir
    }

    #[test]
    fn a_mounted_token_identifies_its_owner_and_nobody_else() {
        let dir = mounted(&[("marcus", MARCUS), ("dana", DANA)]);
        let ids = load(Some(&roster(Some("meshline-identities"))), Some(dir.path())).unwrap();
        assert_eq!(ids.identify(MARCUS).map(|o| o.id.as_str()), Some("marcus"));
        assert_eq!(ids.identify(DANA).map(|o| o.id.as_str()), Some("dana"));
        assert_eq!(ids.owner_ids(), ["dana", "marcus"]);
        // An owner without a key (priya-r) has no token; nothing else matches.
        for wrong in [
            "",
            "marcus",
            "marcus-personal-token-012345678",
            "marcus-personal-token-01234567890",
            &MARCUS.to_uppercase(),
        ] {
            assert!(ids.identify(wrong).is_none(), "{wrong:?}");
        }
        assert!(ids.unavailable_reason().is_none());
    }

    #[test]
    fn roles_are_the_owners_approver_roles() {
        let r = roster(None);
        assert!(holds_role(&r.spec.owners[1], "finance"));
        assert!(!holds_role(&r.spec.owners[1], "sales-ops"));
        assert!(!holds_role(&r.spec.owners[0], "finance"));
    }

    #[test]
    fn a_short_token_is_refused_naming_the_roster_field_and_key_but_not_the_token() {
        let dir = mounted(&[("marcus", "short-secret")]);
        let err = load(Some(&roster(Some("meshline-identities"))), Some(dir.path())).unwrap_err();
        assert!(
            err.contains("OwnershipRoster revenue-operations")
                && err.contains("spec.identitySecretRef")
                && err.contains("\"marcus\"")
                && err.contains("too weak"),
            "{err}"
        );
        assert!(!err.contains("short-secret"), "{err}");
    }

    #[test]
    fn one_token_shared_by_two_owners_is_refused() {
        let dir = mounted(&[("marcus", MARCUS), ("dana", MARCUS)]);
        let err = load(Some(&roster(Some("meshline-identities"))), Some(dir.path())).unwrap_err();
        assert!(err.contains("same token") && !err.contains(MARCUS), "{err}");
    }

    #[test]
    fn without_an_identity_secret_nobody_is_recognised_and_the_reason_says_to_set_it() {
        let ids = load(Some(&roster(None)), None).unwrap();
        assert!(ids.identify(MARCUS).is_none());
        let why = ids.unavailable_reason().unwrap();
        assert!(
            why.contains("revenue-operations") && why.contains("spec.identitySecretRef"),
            "{why}"
        );
        let none = load(None, None).unwrap();
        assert!(
            none.unavailable_reason()
                .unwrap()
                .contains("no OwnershipRoster")
        );
    }

    #[test]
    fn a_local_run_takes_tokens_from_the_environment() {
        // Setting a variable in this multi-threaded test process would race the other tests' reads, so the
        // check runs in a child process of this test binary with the variable set from the start.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "worker::identity::tests::tokens_from_the_environment_in_a_child",
                "--ignored",
                "--nocapture",
            ])
            .env(
                "MESHLINE_IDENTITY_PRIYA_R",
                "priya-token-from-the-environment",
            )
            .env(CHILD_MARKER, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && stdout.contains("1 passed")
                && stdout.contains("identities checked from the environment"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Set in the child process only.
    const CHILD_MARKER: &str = "MESHLINE_TEST_IDENTITY_CHILD";

    /// Run by [`a_local_run_takes_tokens_from_the_environment`] with `MESHLINE_IDENTITY_PRIYA_R` set; on
    /// its own (`--ignored`, no marker) it has nothing to check.
    #[test]
    #[ignore = "runs in a child process with its environment set"]
    fn tokens_from_the_environment_in_a_child() {
        if std::env::var_os(CHILD_MARKER).is_none() {
            return;
        }
        // The owner id `priya-r` is spelled `PRIYA_R` in the variable, as every Meshline credential is.
        let ids = load(Some(&roster(Some("not-mounted-here"))), None).unwrap();
        assert_eq!(
            ids.identify("priya-token-from-the-environment")
                .map(|o| o.id.as_str()),
            Some("priya-r")
        );
        assert!(ids.identify(MARCUS).is_none());
        println!("identities checked from the environment");
    }

    #[test]
    fn the_comparison_looks_at_every_byte_of_fixed_length_digests() {
        let a = digest(MARCUS);
        let mut b = a;
        assert!(same_digest(&a, &b));
        for i in [0, 15, 31] {
            b = a;
            b[i] ^= 1;
            assert!(!same_digest(&a, &b), "a difference in byte {i}");
        }
        // Tokens of different lengths become digests of one length, so the comparison's work is the same.
        assert_eq!(digest("x").len(), digest(&"x".repeat(500)).len());
    }

    #[test]
    fn a_token_removed_from_the_mounted_secret_stops_working_without_a_restart() {
        let dir = mounted(&[("marcus", MARCUS), ("dana", DANA)]);
        let r = roster(Some("meshline-identities"));
        let book = IdentityBook::load(Some(&r), Some(dir.path()));
        let who = |book: &IdentityBook, t: &str| {
            book.current()
                .as_ref()
                .as_ref()
                .ok()
                .and_then(|ids| ids.identify(t).map(|o| o.id.clone()))
        };
        assert_eq!(who(&book, MARCUS).as_deref(), Some("marcus"));
        std::fs::remove_file(dir.path().join("meshline-identities/marcus")).unwrap();
        assert_eq!(who(&book, MARCUS), None, "revoked");
        assert_eq!(who(&book, DANA).as_deref(), Some("dana"));
    }
}
