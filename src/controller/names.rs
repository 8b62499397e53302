//! Names and label values the controller derives from its users' object names. A real API server refuses an
//! object whose name breaks its kind's rule, and the reconcile that makes it then fails forever, so every
//! derived name goes through exactly one function per rule here, and nothing else formats a name.
//!
//! Each function returns its input unchanged when that is already valid and short enough (so the names of
//! existing objects never move), and otherwise a repaired, truncated form followed by `-` and a short hex hash
//! of the whole input, so that two different inputs still give two different names. The output is valid for
//! every input, including empty ones and ones made only of invalid characters.
//!
//! The rules (apimachinery's `IsDNS1123Subdomain`, `IsDNS1035Label`, `IsValidLabelValue`, and the extra length
//! limits of the batch API):
//! - [`subdomain`]: ConfigMaps, Secrets, Deployments, PVCs, PodDisruptionBudgets, Leases, NetworkPolicies:
//!   `[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*`, at most 253 characters.
//! - [`dns_label`]: Services (their name is a DNS label under the namespace): `[a-z]([-a-z0-9]*[a-z0-9])?`, at
//!   most 63 characters.
//! - [`job`]: a subdomain of at most 63 characters, because a Job's name becomes its pods' `job-name` label.
//! - [`cron_job`]: a subdomain of at most 52 characters, because the Jobs it creates append 11 characters.
//! - [`label_value`]: `(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?`, at most 63 characters.

use sha2::{Digest, Sha256};

/// Hex digits of the hash appended to a repaired name: 40 bits, so distinct inputs practically never meet.
pub const HASH_LEN: usize = 10;

/// The naming rule of an object kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRule {
    /// RFC 1123 subdomain, at most 253 characters.
    Subdomain,
    /// RFC 1035 label, at most 63 characters.
    Dns1035Label,
    /// RFC 1123 subdomain, at most 63 characters.
    Job,
    /// RFC 1123 subdomain, at most 52 characters.
    CronJob,
}

impl NameRule {
    pub fn max_len(self) -> usize {
        match self {
            NameRule::Subdomain => 253,
            NameRule::Dns1035Label | NameRule::Job => 63,
            NameRule::CronJob => 52,
        }
    }

    fn dots(self) -> bool {
        self != NameRule::Dns1035Label
    }

    /// Whether `name` is valid under this rule, and if not, why (in the API server's words).
    pub fn check(self, name: &str) -> Result<(), String> {
        if name.len() > self.max_len() {
            return Err(format!(
                "must be no more than {} characters",
                self.max_len()
            ));
        }
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let label_ok = |l: &str| {
            let b = l.as_bytes();
            !b.is_empty()
                && alnum(b[0])
                && alnum(b[b.len() - 1])
                && b.iter().all(|&c| alnum(c) || c == b'-')
        };
        let ok = if self.dots() {
            name.split('.').all(label_ok)
        } else {
            label_ok(name) && name.as_bytes()[0].is_ascii_lowercase()
        };
        if ok {
            Ok(())
        } else if self.dots() {
            Err("must be a lowercase RFC 1123 subdomain: lower case alphanumeric characters, '-' or '.', \
                 starting and ending with an alphanumeric character"
                .into())
        } else {
            Err("must be a DNS-1035 label: lower case alphanumeric characters or '-', starting with a \
                 letter and ending with an alphanumeric character"
                .into())
        }
    }
}

/// A ConfigMap's, Secret's, Deployment's, PVC's, PodDisruptionBudget's, Lease's or NetworkPolicy's name.
pub fn subdomain(raw: &str) -> String {
    fit(raw, NameRule::Subdomain)
}

/// A Service's name.
pub fn dns_label(raw: &str) -> String {
    fit(raw, NameRule::Dns1035Label)
}

/// A Job's name.
pub fn job(raw: &str) -> String {
    fit(raw, NameRule::Job)
}

/// A CronJob's name.
pub fn cron_job(raw: &str) -> String {
    fit(raw, NameRule::CronJob)
}

/// A label value: kept as it is when valid, else repaired and hashed like a name.
pub fn label_value(raw: &str) -> String {
    if check_label_value(raw).is_ok() {
        return raw.to_string();
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let cleaned: String = raw.chars().map(|c| if ok(c) { c } else { '-' }).collect();
    let budget = 63 - 1 - HASH_LEN;
    let mut head: String = cleaned
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .chars()
        .take(budget)
        .collect();
    while head.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        head.pop();
    }
    join(&head, &hash(raw))
}

/// Whether `value` is a valid label value, and if not, why.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    let b = value.as_bytes();
    let ends = |c: u8| c.is_ascii_alphanumeric();
    if b.is_empty()
        || (ends(b[0])
            && ends(b[b.len() - 1])
            && b.iter()
                .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')))
    {
        Ok(())
    } else {
        Err(
            "a label value must be empty or consist of alphanumeric characters, '-', '_' or '.', \
             starting and ending with an alphanumeric character"
                .into(),
        )
    }
}

/// Whether `key` is a valid label or annotation key (apimachinery's `IsQualifiedName`): an optional prefix that is
/// a DNS subdomain of at most 253 characters, then `/`, then a name of at most 63 characters of alphanumerics,
/// '-', '_' or '.', starting and ending with an alphanumeric.
pub fn check_qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() {
            return Err("the prefix before '/' must not be empty".into());
        }
        NameRule::Subdomain
            .check(p)
            .map_err(|e| format!("the prefix before '/' {e}"))?;
    }
    let b = name.as_bytes();
    if b.is_empty() {
        return Err("the name part must not be empty".into());
    }
    if b.len() > 63 {
        return Err("the name part must be no more than 63 characters".into());
    }
    let ok = b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("the name part must consist of alphanumeric characters, '-', '_' or '.', starting and ending \
             with an alphanumeric character"
            .into())
    }
}

/// The hex of a content hash, without an algorithm prefix such as `sha256:` (which no name may contain).
pub fn hex_of(hash: &str) -> &str {
    hash.rsplit(':').next().unwrap_or(hash)
}

fn hash(raw: &str) -> String {
    hex::encode(Sha256::digest(raw.as_bytes()))[..HASH_LEN].to_string()
}

fn join(head: &str, hash: &str) -> String {
    if head.is_empty() {
        // A hash may start with a digit, which a DNS-1035 label may not; `h` keeps every rule satisfied.
        format!("h{hash}")
    } else {
        format!("{head}-{hash}")
    }
}

fn fit(raw: &str, rule: NameRule) -> String {
    if rule.check(raw).is_ok() {
        return raw.to_string();
    }
    // Lowercase, every other character to '-', then each dot-separated label trimmed of '-' at both ends and
    // empty labels dropped, so what is left is valid except perhaps for its length.
    let lowered: String = raw
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            match c {
                'a'..='z' | '0'..='9' | '-' => c,
                '.' if rule.dots() => '.',
                _ => '-',
            }
        })
        .collect();
    let mut cleaned = lowered
        .split('.')
        .map(|l| l.trim_matches('-'))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(".");
    if !rule.dots() {
        cleaned = cleaned
            .trim_start_matches(|c: char| !c.is_ascii_lowercase())
            .to_string();
    }
    let budget = rule.max_len() - 1 - HASH_LEN;
    let mut head: String = cleaned.chars().take(budget).collect();
    while head.ends_with(['-', '.']) {
        head.pop();
    }
    join(&head, &hash(raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RULES: [NameRule; 4] = [
        NameRule::Subdomain,
        NameRule::Dns1035Label,
        NameRule::Job,
        NameRule::CronJob,
    ];

    #[test]
    fn valid_names_are_kept_as_they_are() {
        assert_eq!(subdomain("meshline-won-deals"), "meshline-won-deals");
        assert_eq!(subdomain("meshline-a.b"), "meshline-a.b");
        assert_eq!(dns_label("meshline-won-deals"), "meshline-won-deals");
        assert_eq!(label_value("Won_Deals.2"), "Won_Deals.2");
        assert_eq!(label_value(""), "");
    }

    #[test]
    fn a_content_hash_prefix_never_reaches_a_name() {
        let name = subdomain(&format!(
            "meshline-contract-deal-to-sale-order-{}",
            &hex_of("sha256:f6241a0b9c3d11")[..12]
        ));
        assert_eq!(name, "meshline-contract-deal-to-sale-order-f6241a0b9c3d");
        let repaired = subdomain("meshline-contract-x-sha256:f6241");
        assert!(NameRule::Subdomain.check(&repaired).is_ok(), "{repaired}");
        assert!(!repaired.contains(':'));
    }

    #[test]
    fn dots_are_kept_in_subdomains_and_replaced_in_service_names() {
        assert!(dns_label("meshline-a.b").starts_with("meshline-a-b-"));
        assert_eq!(
            dns_label("meshline-a.b").len(),
            "meshline-a-b-".len() + HASH_LEN
        );
        assert_ne!(dns_label("meshline-a.b"), dns_label("meshline-a-b"));
        let s = subdomain("Meshline..A.-b");
        assert!(s.starts_with("meshline.a.b-"), "{s}");
    }

    #[test]
    fn qualified_names_follow_the_label_key_rule() {
        for ok in [
            "team",
            "example.com/team",
            "a_b.c-d",
            "sync.meshline.io/flow",
        ] {
            assert!(check_qualified_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/team",
            "Example.com/team",
            "example.com/",
            "-team",
            "team-",
            "a/b/c",
            "has space",
        ] {
            assert!(check_qualified_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_qualified_name(&"x".repeat(63)).is_ok());
        assert!(check_qualified_name(&"x".repeat(64)).is_err());
    }

    #[test]
    fn limits_per_kind() {
        let long = format!("meshline-{}", "x".repeat(300));
        assert_eq!(subdomain(&long).len(), 253);
        assert_eq!(dns_label(&long).len(), 63);
        assert_eq!(job(&long).len(), 63);
        assert_eq!(cron_job(&long).len(), 52);
        assert_eq!(label_value(&long).len(), 63);
        assert!(NameRule::CronJob.check(&"a".repeat(53)).is_err());
        assert!(NameRule::CronJob.check(&"a".repeat(52)).is_ok());
        assert!(NameRule::Job.check(&"a".repeat(64)).is_err());
        assert!(NameRule::Dns1035Label.check("1abc").is_err());
        assert!(NameRule::Subdomain.check("1abc").is_ok());
    }

    #[test]
    fn truncation_keeps_names_apart() {
        let a = format!("meshline-{}-a", "x".repeat(300));
        let b = format!("meshline-{}-b", "x".repeat(300));
        assert_ne!(subdomain(&a), subdomain(&b));
        assert_ne!(cron_job(&a), cron_job(&b));
        assert_ne!(label_value(&a), label_value(&b));
    }

    #[test]
    fn inputs_without_a_single_valid_character_still_get_a_name() {
        for rule in RULES {
            let n = fit("::--..", rule);
            assert!(rule.check(&n).is_ok(), "{rule:?}: {n}");
            let n = fit("", rule);
            assert!(rule.check(&n).is_ok(), "{rule:?}: {n}");
            let n = fit("123", rule);
            assert!(rule.check(&n).is_ok(), "{rule:?}: {n}");
        }
        assert!(check_label_value(&label_value("--__..")).is_ok());
    }

    proptest! {
        #[test]
        fn every_output_is_valid_and_stable(raw in "[a-zA-Z0-9._:/ -]{0,400}") {
            for rule in RULES {
                let name = fit(&raw, rule);
                prop_assert!(rule.check(&name).is_ok(), "{:?}: {:?} from {:?}", rule, name, raw);
                prop_assert_eq!(fit(&name, rule), name.clone(), "a valid name is a fixed point");
                prop_assert_eq!(fit(&raw, rule), name);
            }
            let value = label_value(&raw);
            prop_assert!(check_label_value(&value).is_ok(), "{:?} from {:?}", value, raw);
        }

        #[test]
        fn any_unicode_input_gives_a_valid_name(raw in "\\PC{0,300}") {
            for rule in RULES {
                let name = fit(&raw, rule);
                prop_assert!(rule.check(&name).is_ok(), "{:?}: {:?} from {:?}", rule, name, raw);
            }
            prop_assert!(check_label_value(&label_value(&raw)).is_ok());
        }

        #[test]
        fn distinct_long_inputs_stay_distinct(a in "[a-z]{260,300}", b in "[a-z]{260,300}") {
            prop_assume!(a != b);
            prop_assert_ne!(subdomain(&a), subdomain(&b));
            prop_assert_ne!(dns_label(&a), dns_label(&b));
        }
    }
}
