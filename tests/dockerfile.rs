//! The Dockerfile's dependency-caching stage works with the Cargo.toml beside it.
//!
//! Docker cannot run here, so the test replays that stage the way the builder would: it reads the builder
//! stage from the Dockerfile text, copies what its `COPY` instructions name into an empty directory (the
//! `WORKDIR`), and runs its `RUN` commands verbatim with `sh -c`. Only `cargo` is replaced, by a shim that
//! does what cargo does before it compiles anything: `cargo fetch --locked --offline` for this host loads
//! the manifest (refused when a declared target has no source file, the bug this guards against), resolves
//! the dependency graph against Cargo.lock without changing it and finds every package it needs; then
//! `cargo metadata` records the targets it saw. A release build of every dependency would take far too long
//! here and proves nothing more about the stage's layout.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// One instruction of a Dockerfile, continuation lines joined.
#[derive(Debug, Clone)]
struct Instruction {
    line: usize,
    keyword: String,
    args: String,
}

fn instructions(dockerfile: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (index, raw) in dockerfile.lines().enumerate() {
        let trimmed = raw.trim();
        if current.is_none() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        // Comment lines inside a continued instruction are dropped, as Docker does.
        if current.is_some() && trimmed.starts_with('#') {
            continue;
        }
        let (start, mut text) = current.take().unwrap_or((index + 1, String::new()));
        match trimmed.strip_suffix('\\') {
            Some(continued) => {
                text.push_str(continued);
                text.push(' ');
                current = Some((start, text));
            }
            None => {
                text.push_str(trimmed);
                let (keyword, args) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
                out.push(Instruction {
                    line: start,
                    keyword: keyword.to_ascii_uppercase(),
                    args: args.trim().to_string(),
                });
            }
        }
    }
    assert!(
        current.is_none(),
        "the Dockerfile ends inside a continued instruction"
    );
    out
}

/// The builder stage's instructions before the full source tree is copied (`COPY . .`): the manifest-only,
/// dependency-caching part, plus its `WORKDIR`.
fn dependency_stage(dockerfile: &str) -> (String, Vec<Instruction>) {
    let all = instructions(dockerfile);
    let from = all
        .iter()
        .position(|i| i.keyword == "FROM" && i.args.to_ascii_lowercase().ends_with(" as builder"))
        .expect("the Dockerfile has a stage named `builder`");
    let mut workdir = None;
    let mut stage = Vec::new();
    for instruction in &all[from + 1..] {
        match instruction.keyword.as_str() {
            "FROM" => panic!("the builder stage ends before it copies the whole source tree"),
            "COPY" if instruction.args.split_whitespace().next() == Some(".") => {
                return (workdir.expect("the builder stage sets a WORKDIR"), stage);
            }
            "WORKDIR" => workdir = Some(instruction.args.clone()),
            _ => stage.push(instruction.clone()),
        }
    }
    panic!("the builder stage never copies the whole source tree (`COPY . .`)")
}

/// The `.dockerignore` patterns without wildcards: paths that never reach the build context.
fn ignored_paths(context: &Path) -> Vec<String> {
    fs::read_to_string(context.join(".dockerignore"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.contains(['*', '?', '!']))
        .map(|l| l.trim_matches('/').to_string())
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

/// `COPY src... dest` relative to the build context and the working directory, as the builder does it.
fn replay_copy(instruction: &Instruction, context: &Path, workdir: &Path) {
    let words: Vec<&str> = instruction.args.split_whitespace().collect();
    assert!(
        words.len() >= 2 && !words.iter().any(|w| w.starts_with("--")),
        "Dockerfile line {}: COPY {}: only `COPY <src>... <dest>` is replayed",
        instruction.line,
        instruction.args
    );
    let (dest, sources) = words.split_last().unwrap();
    assert!(
        !dest.starts_with('/'),
        "Dockerfile line {}: the dependency stage copies to {dest}, outside its WORKDIR",
        instruction.line
    );
    let ignored = ignored_paths(context);
    for source in sources {
        let source = source.trim_end_matches('/');
        assert!(
            !ignored
                .iter()
                .any(|i| source == i || source.starts_with(&format!("{i}/"))),
            "Dockerfile line {}: COPY {source}, but .dockerignore keeps it out of the build context",
            instruction.line
        );
        let from = context.join(source);
        assert!(
            from.exists(),
            "Dockerfile line {}: COPY {source}: no such file in the build context",
            instruction.line
        );
        let into_dir = dest.ends_with('/') || sources.len() > 1 || *dest == ".";
        let to = if from.is_file() && into_dir {
            workdir.join(dest).join(from.file_name().unwrap())
        } else {
            workdir.join(dest)
        };
        copy_tree(&from, &to);
    }
}

/// The `cargo` the replayed commands run: records its arguments, then loads the manifest and resolves the
/// lock file offline for this host (`cargo fetch --locked --offline`), and saves the manifest's metadata.
fn write_cargo_shim(dir: &Path, log: &Path) -> PathBuf {
    let real_cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let host = String::from_utf8(
        Command::new("rustc")
            .arg("-vV")
            .output()
            .expect("rustc runs")
            .stdout,
    )
    .unwrap()
    .lines()
    .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
    .expect("rustc -vV names the host");
    let shim = dir.join("cargo");
    fs::write(
        &shim,
        format!(
            r#"#!/bin/sh
n=$(ls '{log}' | grep -c '\.args$')
printf '%s\n' "$@" > '{log}'/$n.args
'{real_cargo}' fetch --locked --offline --target '{host}' || exit
exec '{real_cargo}' metadata --locked --offline --format-version 1 --filter-platform '{host}' > '{log}'/$n.json
"#,
            log = log.display(),
        ),
    )
    .unwrap();
    let status = Command::new("chmod").arg("+x").arg(&shim).status().unwrap();
    assert!(status.success());
    shim
}

/// One cargo invocation the stage made, with the metadata of the manifest it saw.
struct CargoCall {
    args: Vec<String>,
    metadata: serde_json::Value,
}

struct Replay {
    /// The builder's working directory after the stage.
    workdir: tempfile::TempDir,
    cargo_calls: Vec<CargoCall>,
}

/// Replays the dependency stage of `dockerfile` over the build context `context`; `Err` carries the failing
/// RUN command and its output.
fn replay(dockerfile: &str, context: &Path) -> Result<Replay, String> {
    let (_, stage) = dependency_stage(dockerfile);
    let workdir = tempfile::tempdir().unwrap();
    let tools = tempfile::tempdir().unwrap();
    let log = tools.path().join("calls");
    fs::create_dir(&log).unwrap();
    write_cargo_shim(tools.path(), &log);
    let path = format!(
        "{}:{}",
        tools.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for instruction in &stage {
        match instruction.keyword.as_str() {
            "COPY" => replay_copy(instruction, context, workdir.path()),
            "RUN" => {
                let output = Command::new("sh")
                    .arg("-c")
                    .arg(&instruction.args)
                    .current_dir(workdir.path())
                    .env("PATH", &path)
                    .output()
                    .unwrap();
                if !output.status.success() {
                    return Err(format!(
                        "Dockerfile line {}: RUN {} failed ({}):\n{}{}",
                        instruction.line,
                        instruction.args,
                        output.status,
                        String::from_utf8_lossy(&output.stdout),
                        String::from_utf8_lossy(&output.stderr)
                    ));
                }
            }
            "ARG" | "ENV" | "LABEL" => {}
            other => panic!(
                "Dockerfile line {}: {other} in the dependency stage is not replayed by this test",
                instruction.line
            ),
        }
    }
    let mut cargo_calls = Vec::new();
    for n in 0.. {
        let args = log.join(format!("{n}.args"));
        if !args.exists() {
            break;
        }
        cargo_calls.push(CargoCall {
            args: fs::read_to_string(args)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect(),
            metadata: serde_json::from_str(
                &fs::read_to_string(log.join(format!("{n}.json"))).unwrap(),
            )
            .expect("cargo metadata wrote JSON"),
        });
    }
    Ok(Replay {
        workdir,
        cargo_calls,
    })
}

fn repo_dockerfile() -> String {
    fs::read_to_string(Path::new(REPO).join("Dockerfile")).unwrap()
}

/// A build context made of the repository's files the dependency stage reads, with `Cargo.toml` replaced.
fn context_with_manifest(manifest: &str) -> tempfile::TempDir {
    let context = tempfile::tempdir().unwrap();
    for file in [
        "Cargo.lock",
        ".dockerignore",
        ".cargo/config.toml",
        "scripts/cargo-target-stubs",
    ] {
        copy_tree(&Path::new(REPO).join(file), &context.path().join(file));
    }
    fs::write(context.path().join("Cargo.toml"), manifest).unwrap();
    context
}

fn target_names(metadata: &serde_json::Value, kind: &str) -> BTreeSet<String> {
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "meshline")
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == kind))
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn dependency_stage_accepts_the_manifest_and_builds_the_binary_target() {
    let replay = replay(&repo_dockerfile(), Path::new(REPO)).unwrap_or_else(|e| panic!("{e}"));
    let subcommands: Vec<&str> = replay
        .cargo_calls
        .iter()
        .map(|c| c.args[0].as_str())
        .collect();
    assert_eq!(subcommands, ["fetch", "build"], "the stage's cargo calls");
    for call in &replay.cargo_calls {
        assert!(
            call.args.iter().any(|a| a == "--locked"),
            "cargo {:?} must not re-resolve Cargo.lock",
            call.args
        );
    }
    // The binary the stage builds is a target of the manifest it saw, so the dependencies it compiles are
    // the ones the real build needs.
    let build = &replay.cargo_calls[1];
    let bin = &build.args[build.args.iter().position(|a| a == "--bin").unwrap() + 1];
    assert!(target_names(&build.metadata, "bin").contains(bin));
    // Every bench Cargo.toml declares was stubbed; nothing in the source tree was needed.
    let benches = declared_benches();
    assert_eq!(target_names(&build.metadata, "bench"), benches);
    assert!(benches.len() >= 5, "{benches:?}");
    // The stubs are gone afterwards, so the application layer's sources replace them entirely.
    let left: Vec<String> = ["src/main.rs", "src/lib.rs"]
        .into_iter()
        .map(str::to_string)
        .chain(benches.iter().map(|n| format!("benches/{n}.rs")))
        .filter(|p| replay.workdir.path().join(p).exists())
        .collect();
    assert!(left.is_empty(), "stubs left behind: {left:?}");
    assert!(!replay.workdir.path().join(".target-stubs").exists());
}

#[test]
fn a_target_added_to_cargo_toml_needs_no_dockerfile_change() {
    let manifest = fs::read_to_string(Path::new(REPO).join("Cargo.toml")).unwrap()
        + "\n[[bench]]\nname = \"added_later\"\nharness = false\n\n\
           [[test]]\nname = 'odd_place'\npath = \"checks/odd_place.rs\" # not under tests/\n\n\
           [[bin]]\nname = \"meshline-tool\"\n";
    let context = context_with_manifest(&manifest);
    let replay = replay(&repo_dockerfile(), context.path()).unwrap_or_else(|e| panic!("{e}"));
    let metadata = &replay.cargo_calls.last().unwrap().metadata;
    assert!(target_names(metadata, "bench").contains("added_later"));
    assert!(target_names(metadata, "test").contains("odd_place"));
    assert!(target_names(metadata, "bin").contains("meshline-tool"));
}

/// Guards the guard: the stage as it was before the stubs were derived (one hand-written bench stub) is
/// refused by the replay, with cargo's own reason.
#[test]
fn a_stage_with_a_missing_bench_stub_is_refused() {
    let before = repo_dockerfile();
    let (_, stage) = dependency_stage(&before);
    let run = stage
        .iter()
        .find(|i| i.keyword == "RUN")
        .expect("the stage has a RUN");
    let hand_written = run.args.replace(
        "sh scripts/cargo-target-stubs Cargo.toml > .target-stubs",
        "mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
         && echo 'fn main() {}' > benches/contract.rs && : > .target-stubs",
    );
    assert_ne!(hand_written, run.args, "the stage derives its stubs");
    let dockerfile = before.replacen(
        &raw_run_text(&before, run.line),
        &format!("RUN {hand_written}\n"),
        1,
    );
    let error = match replay(&dockerfile, Path::new(REPO)) {
        Ok(_) => panic!("a manifest with unstubbed benches was accepted"),
        Err(e) => e,
    };
    assert!(
        error.contains("can't find `") && error.contains("bench at `benches/"),
        "{error}"
    );
}

/// The raw text of the instruction starting at `line` (1-based), continuation lines included.
fn raw_run_text(dockerfile: &str, line: usize) -> String {
    let mut out = String::new();
    for raw in dockerfile.lines().skip(line - 1) {
        out.push_str(raw);
        out.push('\n');
        if !raw.trim_end().ends_with('\\') {
            break;
        }
    }
    out
}

/// The bench names the repository's Cargo.toml declares, as cargo itself reads them (independent of the
/// stub script).
fn declared_benches() -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .current_dir(REPO)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    target_names(&serde_json::from_slice(&output.stdout).unwrap(), "bench")
}
