//! A real, throwaway PostgreSQL server for tests, started from the machine's own binaries.
//!
//! `PgServer::start()` finds `initdb`/`postgres` (on PATH or under `/usr/lib/postgresql/*/bin`), creates a
//! data directory in a fresh temp dir, and runs the server on a free 127.0.0.1 port with its unix socket in
//! the same temp dir. PostgreSQL refuses to run as root, and tests run as root here and in CI, so as root the
//! server runs as the unprivileged `meshline-test` system user (created with `useradd` when missing) through
//! `setpriv`, with a parent-death signal so a killed test binary does not leave a server behind. Dropping the
//! handle (also while unwinding from a panic) stops the server and removes the directory.
//!
//! Missing binaries are a test failure with instructions, never a silent skip: a green run must mean the
//! PostgreSQL paths were exercised.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TEST_USER: &str = "meshline-test";

pub struct PgServer {
    child: Option<Child>,
    port: u16,
    dir: Option<tempfile::TempDir>,
    log: PathBuf,
}

impl PgServer {
    /// Starts a fresh server tuned for tests (no fsync); panics with a clear message if that is impossible.
    pub fn start() -> PgServer {
        PgServer::start_with(&[])
    }

    /// Starts a fresh server with extra `-c name=value` settings, which win over the test defaults (a
    /// benchmark passes `fsync=on`, `synchronous_commit=on` to measure real commits).
    pub fn start_with(settings: &[(&str, &str)]) -> PgServer {
        PgServer::start_on(free_port(), settings)
    }

    /// Starts a fresh server on `port` (a test that points a worker at a server which comes up later).
    pub fn start_on(port: u16, settings: &[(&str, &str)]) -> PgServer {
        let bin = find_bin_dir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL server binaries (initdb, postgres) were not found on PATH or under \
                 /usr/lib/postgresql/*/bin. The ledger's PostgreSQL tests need a real server: install the \
                 Debian package (`apt-get install postgresql`, as scripts/test does) and run again."
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("meshline-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for PostgreSQL: {e}"));
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        let as_root = is_root();
        let ids = if as_root {
            let ids = ensure_test_user();
            chown(dir.path(), ids);
            Some(ids)
        } else {
            None
        };

        let initdb = run_as(ids, &bin.join("initdb"))
            .args([
                "--auth=trust",
                "--username=meshline",
                "--encoding=UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.join("initdb").display()));
        assert!(
            initdb.status.success(),
            "initdb failed ({}): {}",
            initdb.status,
            String::from_utf8_lossy(&initdb.stderr)
        );

        let log_file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        if let Some(ids) = ids {
            chown(&log, ids);
        }
        let log_err = log_file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone the log handle: {e}"));
        // fsync off and no full-page writes: a test server's data dies with the test anyway.
        let child = run_as(ids, &bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1", "-p", &port.to_string()])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args([
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "synchronous_commit=off",
            ])
            .args(["-c", "max_connections=100", "-c", "shared_buffers=32MB"])
            .args(
                settings
                    .iter()
                    .flat_map(|(name, value)| ["-c".to_string(), format!("{name}={value}")]),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.join("postgres").display()));

        let mut server = PgServer {
            child: Some(child),
            port,
            dir: Some(dir),
            log,
        };
        server.wait_ready(&bin);
        server
    }

    /// URL of the `postgres` database as the superuser `meshline` (trust auth, loopback only).
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://meshline@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id (its backends are its children), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log (its stdout and stderr), e.g. for the plans `auto_explain` writes there.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Creates a database and returns its URL, so one server can host independent ledgers.
    pub fn create_database(&self, name: &str) -> String {
        self.run_sql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url_for(name)
    }

    /// Runs one SQL command in `database` through `psql`, as the superuser; panics if it fails.
    pub fn run_sql(&self, database: &str, sql: &str) {
        let bin = find_bin_dir().unwrap_or_else(|| panic!("PostgreSQL binaries vanished"));
        let psql = bin.join("psql");
        let status = Command::new(&psql)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "meshline",
                "-d",
                database,
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", psql.display()));
        assert!(status.success(), "{sql} failed in {database}");
    }

    fn wait_ready(&mut self, bin: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "postgres exited during start-up ({status}); its log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let ready = Command::new(bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "meshline",
                    "-q",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "postgres did not accept connections within 60 s; its log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT is PostgreSQL's immediate shutdown: no checkpoint, the data is thrown away anyway.
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

fn run_as(ids: Option<(u32, u32)>, program: &Path) -> Command {
    match ids {
        Some((uid, gid)) => {
            let mut command = Command::new("setpriv");
            command
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg("--pdeathsig=KILL")
                .arg("--")
                .arg(program);
            command
        }
        None => Command::new(program),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The uid and gid of the unprivileged test user, creating it if needed.
fn ensure_test_user() -> (u32, u32) {
    let lookup = || -> Option<(u32, u32)> {
        let uid = Command::new("id").args(["-u", TEST_USER]).output().ok()?;
        let gid = Command::new("id").args(["-g", TEST_USER]).output().ok()?;
        if !uid.status.success() || !gid.status.success() {
            return None;
        }
        Some((
            String::from_utf8_lossy(&uid.stdout).trim().parse().ok()?,
            String::from_utf8_lossy(&gid.stdout).trim().parse().ok()?,
        ))
    };
    if let Some(ids) = lookup() {
        return ids;
    }
    // Several test processes may race to create the user; whoever loses finds it on the second lookup.
    let _ = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--user-group",
            "--shell",
            "/usr/sbin/nologin",
            TEST_USER,
        ])
        .status();
    lookup().unwrap_or_else(|| {
        panic!(
            "PostgreSQL refuses to run as root, and the unprivileged user {TEST_USER} could not be created \
             with useradd; create it (useradd --system {TEST_USER}) or run the tests as a normal user"
        )
    })
}

fn chown(path: &Path, (uid, gid): (u32, u32)) {
    let status = Command::new("chown")
        .arg(format!("{uid}:{gid}"))
        .arg(path)
        .status()
        .unwrap_or_else(|e| panic!("cannot run chown: {e}"));
    assert!(status.success(), "chown {} failed", path.display());
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("cannot find a free port on 127.0.0.1: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("cannot read the bound port: {e}"))
        .port()
}

/// Whether the server's own library directory (next to its binaries) holds the loadable module `name`, e.g.
/// `pg_stat_statements` from the contrib package, so `shared_preload_libraries` may name it.
pub fn has_server_library(name: &str) -> bool {
    find_bin_dir().is_some_and(|bin| bin.join("../lib").join(format!("{name}.so")).is_file())
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    // Debian puts the real binaries in /usr/lib/postgresql/N/bin; PATH may only hold wrappers or links.
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|dir| has_server(dir))
        .collect();
    versioned.sort_by_key(|dir| {
        dir.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(dir) = versioned.pop() {
        return Some(dir);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|dir| has_server(dir) && dir.join("pg_isready").is_file())
}
