//! The README's example install works as written: the Secrets its `kubectl create secret` commands create
//! hold the keys the controller's Secret check (`controller::secrets`) demands of every flow the README
//! applies from `examples/`, ledger Secret included, so the flow passes `SecretsReady`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use meshline::api::{OwnershipRoster, SyncFlow};
use meshline::controller::secrets;
use serde::Deserialize;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// What a README shell block does, as far as the controller can tell.
#[derive(Debug, Default)]
struct Install {
    namespaces: BTreeSet<String>,
    /// (namespace, Secret name) → the keys the Secret holds.
    secrets: BTreeMap<(String, String), BTreeSet<String>>,
    /// Directories applied with `kubectl apply -f`, relative to the repository.
    applied: Vec<String>,
}

/// The fenced `sh` blocks of a Markdown text, with continuation lines joined: one command a line.
fn shell_commands(markdown: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    let mut pending = String::new();
    for line in markdown.lines() {
        let trimmed = line.trim();
        match &mut current {
            None if trimmed == "```sh" || trimmed == "```bash" => current = Some(Vec::new()),
            None => {}
            Some(block) if trimmed == "```" => {
                assert!(
                    pending.is_empty(),
                    "a README command ends in a continuation"
                );
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                let code = strip_comment(line);
                match code.trim_end().strip_suffix('\\') {
                    Some(continued) => {
                        pending.push_str(continued);
                        pending.push(' ');
                    }
                    None => {
                        pending.push_str(code);
                        let command = std::mem::take(&mut pending);
                        if !command.trim().is_empty() {
                            block.push(command.trim().to_string());
                        }
                    }
                }
            }
        }
    }
    blocks
}

/// A line without its `#` comment (a `#` starting a word, outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if previous.is_whitespace() => return &line[..i],
            _ => {}
        }
        previous = c;
    }
    line
}

/// POSIX-shell word splitting for the simple commands a README holds: quotes and backslashes, no expansion.
fn words(command: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        out.push(word);
    }
    out
}

/// What the `kubectl` commands of one block do to namespaces, Secrets and applied manifests.
fn install(commands: &[String]) -> Install {
    let mut install = Install::default();
    for command in commands {
        let mut args = words(command);
        if args.first().map(String::as_str) != Some("kubectl") {
            continue;
        }
        args.remove(0);
        // The namespace flag may come anywhere.
        let mut namespace = "default".to_string();
        let mut rest = Vec::new();
        let mut iter = args.into_iter();
        while let Some(arg) = iter.next() {
            if arg == "-n" || arg == "--namespace" {
                namespace = iter.next().expect("a namespace after -n");
            } else if let Some(ns) = arg.strip_prefix("--namespace=") {
                namespace = ns.to_string();
            } else {
                rest.push(arg);
            }
        }
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        match rest.as_slice() {
            ["create", "namespace", name] => {
                install.namespaces.insert(name.to_string());
            }
            ["create", "secret", "generic", name, sources @ ..] => {
                let keys = sources
                    .iter()
                    .map(|source| secret_key(command, source))
                    .collect();
                install
                    .secrets
                    .insert((namespace.clone(), name.to_string()), keys);
            }
            ["create", "secret", ..] => {
                panic!("README: `{command}`: only generic Secrets are read")
            }
            ["apply", "-f", dir] if dir.starts_with("examples/") => {
                install.applied.push(dir.trim_end_matches('/').to_string());
            }
            _ => {}
        }
    }
    install
}

/// The key one `--from-literal` / `--from-file` argument puts in the Secret, the way kubectl names it.
fn secret_key(command: &str, source: &str) -> String {
    if let Some(literal) = source.strip_prefix("--from-literal=") {
        let (key, _) = literal
            .split_once('=')
            .unwrap_or_else(|| panic!("README: `{command}`: {source} has no key=value"));
        key.to_string()
    } else if let Some(file) = source.strip_prefix("--from-file=") {
        match file.split_once('=') {
            Some((key, _)) => key.to_string(),
            // Without a key, kubectl uses the file's base name.
            None => file.rsplit('/').next().unwrap_or(file).to_string(),
        }
    } else {
        panic!("README: `{command}`: {source} is not a --from-literal or --from-file source")
    }
}

/// Every SyncFlow in the YAML files of an example directory.
fn flows_in(dir: &str) -> Vec<SyncFlow> {
    objects_in(dir, "SyncFlow")
}

/// Every OwnershipRoster in the YAML files of an example directory.
fn rosters_in(dir: &str) -> Vec<std::sync::Arc<OwnershipRoster>> {
    objects_in(dir, "OwnershipRoster")
        .into_iter()
        .map(std::sync::Arc::new)
        .collect()
}

/// Every object of `kind` in the YAML files of an example directory.
fn objects_in<T: serde::de::DeserializeOwned>(dir: &str, kind: &str) -> Vec<T> {
    let path = Path::new(REPO).join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("README applies {dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut flows = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document).unwrap();
            if value.get("kind").and_then(|k| k.as_str()) == Some(kind) {
                flows.push(
                    serde_yaml::from_value(value)
                        .unwrap_or_else(|e| panic!("{}: {e}", file.display())),
                );
            }
        }
    }
    flows
}

/// The controller's Secret check: `Ok`, or `Err((reason, message))`.
type SecretCheck = Result<(), (&'static str, String)>;

/// The controller's verdict on each flow the block installs, by `namespace/name`.
fn secret_checks(install: &Install) -> Vec<(String, SecretCheck)> {
    let mut out = Vec::new();
    for dir in &install.applied {
        for flow in flows_in(dir) {
            let namespace = flow.metadata.namespace.clone().unwrap_or_default();
            let name = flow.metadata.name.clone().unwrap_or_default();
            assert!(
                install.namespaces.contains(&namespace),
                "README applies flow {name} into namespace {namespace}, which it never creates"
            );
            let present: BTreeMap<String, Option<BTreeSet<String>>> = install
                .secrets
                .iter()
                .filter(|((ns, _), _)| *ns == namespace)
                .map(|((_, secret), keys)| (secret.clone(), Some(keys.clone())))
                .collect();
            // The roster that covers the flow adds its ticket sinks' and identities' Secrets.
            let rosters = rosters_in(dir);
            let roster = meshline::controller::flow::validate::owning_roster(&flow, &rosters);
            out.push((
                format!("{namespace}/{name}"),
                secrets::check(&flow, roster.as_ref().map(|(r, _)| &**r), &present),
            ));
        }
    }
    out
}

fn readme_example_install() -> Install {
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    let blocks: Vec<Install> = shell_commands(&readme)
        .iter()
        .map(|block| install(block))
        .filter(|i| !i.applied.is_empty())
        .collect();
    assert_eq!(
        blocks.len(),
        1,
        "the README has one example install walk-through"
    );
    blocks.into_iter().next().unwrap()
}

#[test]
fn readme_secret_commands_satisfy_the_controllers_secret_check() {
    let install = readme_example_install();
    assert_eq!(install.applied, ["examples/salesforce-netsuite"]);
    let checks = secret_checks(&install);
    assert!(!checks.is_empty(), "the applied example has a flow");
    for (flow, check) in checks {
        assert_eq!(check, Ok(()), "flow {flow} would stay SecretsReady=False");
    }
    // The ledger Secret is among them: the example keeps its ledger in PostgreSQL.
    let keys = &install.secrets[&("revenue-sync".to_string(), "meshline-ledger-pg".to_string())];
    assert!(keys.contains("url"), "{keys:?}");
}

/// Guards the extraction: the commands the README carried before would leave the flow unready, for the
/// reasons the issue names (Salesforce JWT without `username`, NetSuite with the wrong keys, no ledger Secret).
#[test]
fn the_former_readme_commands_are_refused_by_the_secret_check() {
    let former = "```sh\n\
        kubectl create namespace revenue-sync\n\
        kubectl -n revenue-sync create secret generic salesforce-oauth --from-literal=clientId=... --from-file=privateKey=sf.key\n\
        kubectl -n revenue-sync create secret generic netsuite-m2m --from-literal=accountId=... --from-file=certificate=ns.pem\n\
        kubectl apply -f examples/salesforce-netsuite/\n\
        ```\n";
    let blocks = shell_commands(former);
    let install = install(&blocks[0]);
    assert_eq!(install.secrets.len(), 2);
    let checks = secret_checks(&install);
    let (_, Err((reason, message))) = &checks[0] else {
        panic!("the former commands passed the check: {checks:?}");
    };
    assert_eq!(*reason, "SecretNotFound");
    assert!(
        message.contains("Secret meshline-ledger-pg does not exist"),
        "{message}"
    );
    // JWT without `username`: one key short of either alternative.
    assert!(
        message.contains("Secret salesforce-oauth lacks key(s) "),
        "{message}"
    );
    assert!(
        message.contains("Secret netsuite-m2m lacks key(s)"),
        "{message}"
    );
}

#[test]
fn readme_commands_are_split_like_a_shell_splits_them() {
    assert_eq!(
        words(
            r#"kubectl create secret generic s --from-literal=url='postgres://a b' --from-literal="k=v \"q\"" x\ y"#
        ),
        [
            "kubectl",
            "create",
            "secret",
            "generic",
            "s",
            "--from-literal=url=postgres://a b",
            "--from-literal=k=v \"q\"",
            "x y"
        ]
    );
    let blocks = shell_commands(
        "```sh\n# note\nkubectl -n ns create secret generic s \\\n  --from-file=dir/key.pem  # the key\n```\n",
    );
    assert_eq!(
        blocks,
        [["kubectl -n ns create secret generic s    --from-file=dir/key.pem"]]
    );
    let install = install(&blocks[0]);
    assert_eq!(
        install.secrets[&("ns".to_string(), "s".to_string())],
        BTreeSet::from(["key.pem".to_string()])
    );
}
