//! The durable ticket outbox under SIGKILL: the real `meshline worker` binary is killed at random points
//! (several while a ticket delivery is at the receiver) while a CRM pushes records, some of which the ERP
//! refuses with different statuses, so several tickets open and keep changing. Each time it is restarted on
//! the same ledger. Afterwards a webhook receiver that verifies the signature and drops repeated
//! `Idempotency-Key`s holds exactly one ticket per cause, at the version the ledger has; the resends the kills
//! caused carried the key of what was already delivered (so the receiver dropped them); and the records
//! themselves are neither lost nor stored twice. Once with the embedded SQLite ledger, once with PostgreSQL.

#[path = "support/postgres.rs"]
#[allow(dead_code)]
mod postgres;
#[path = "support/reliability.rs"]
#[allow(dead_code)]
mod reliability;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use meshline::api::{SecretRef, TicketSink, TicketSinkType};
use rand::{Rng, SeedableRng};
use reliability::*;
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::{Notify, Semaphore};

const RECORDS: usize = 1_500;
const BATCH: usize = 50;
const KILLS: u32 = 10;
/// The CRM batches each kill lets go (30 batches over 10 kills).
const BATCHES_PER_KILL: usize = 3;
const SIGNING_SECRET: &str = "whsec-ticket-receiver";
const SINK: &str = "ops-webhook";
/// The worker's claim lease (seconds); a ticket send begun by a killed worker is resent after it too.
const LEASE_SECS: &str = "4";

/// The ERP's answer to record `n`: every tenth record is refused, with one of four permanent statuses, so
/// four causes (`erp:400`, `erp:409`, `erp:410`, `erp:422`) each collect dead letters.
fn refusal(n: usize) -> Option<u16> {
    (n % 10 == 7).then(|| [400, 409, 410, 422][(n / 10) % 4])
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    key: String,
    fingerprint: String,
    version: i64,
    event: String,
    /// Dropped as a repeat of a key already taken.
    duplicate: bool,
}

/// The receiver's copy of one ticket, from the requests it took (repeats dropped).
#[derive(Clone, Debug, Default)]
struct Copy {
    opened: usize,
    version: i64,
    state: String,
    reason: String,
    count: u64,
}

#[derive(Default)]
struct ReceiverState {
    requests: Mutex<Vec<Received>>,
    taken: Mutex<HashSet<String>>,
    tickets: Mutex<BTreeMap<String, Copy>>,
    violations: Mutex<Vec<String>>,
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    /// Armed by the test: the next request the receiver takes is held unanswered until `release`.
    hold_next: AtomicBool,
    /// Holds begun so far. A held request can also end without `release`: the server drops it when the killed
    /// worker's connection goes away.
    holds_begun: AtomicUsize,
    release: Notify,
    /// The held requests, by their place in `requests`.
    held: Mutex<Vec<usize>>,
}

/// A well-behaved webhook receiver: checks the signature over `"{timestamp}.{body}"`, takes each
/// `Idempotency-Key` once and answers a repeat with 200 without applying it. Every third request is slow to
/// answer (after it was applied, as a receiver that commits and then does more work), so kills land between
/// the receiver's commit and the worker's record of it; armed by the test, it holds the next one it takes
/// unanswered until the test has killed the worker.
struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let state = Arc::new(ReceiverState::default());
        let app = axum::Router::new()
            .route("/tickets", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the ticket receiver");
        let addr = listener.local_addr().expect("receiver address");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver serves");
        });
        Receiver { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}/tickets", self.addr)
    }

    fn requests(&self) -> Vec<Received> {
        self.state.requests.lock().unwrap().clone()
    }

    fn tickets(&self) -> BTreeMap<String, Copy> {
        self.state.tickets.lock().unwrap().clone()
    }

    fn violations(&self) -> Vec<String> {
        self.state.violations.lock().unwrap().clone()
    }
}

fn verified(headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let timestamp = header("x-meshline-timestamp").ok_or("no X-Meshline-Timestamp")?;
    let signature = header("x-meshline-signature").ok_or("no X-Meshline-Signature")?;
    let sent: i64 = timestamp.parse().map_err(|_| "timestamp is not a number")?;
    // The usual five-minute window against replays.
    if (chrono::Utc::now().timestamp() - sent).abs() > 300 {
        return Err(format!("stale timestamp {timestamp}"));
    }
    let hex = signature
        .strip_prefix("sha256=")
        .ok_or("signature is not sha256=")?;
    let given = hex::decode(hex).map_err(|_| "signature is not hex")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(SIGNING_SECRET.as_bytes()).expect("HMAC key");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&given)
        .map_err(|_| "signature does not match".to_string())
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let call = state.calls.fetch_add(1, Ordering::SeqCst);
    state.in_flight.fetch_add(1, Ordering::SeqCst);
    let _guard = InFlight(&state.in_flight);
    let refuse = |why: String| {
        state.violations.lock().unwrap().push(why.clone());
        (StatusCode::BAD_REQUEST, why).into_response()
    };
    if let Err(why) = verified(&headers, &body) {
        state.violations.lock().unwrap().push(why.clone());
        return (StatusCode::UNAUTHORIZED, why).into_response();
    }
    let Ok(ticket) = serde_json::from_slice::<Value>(&body) else {
        return refuse("body is not JSON".into());
    };
    let fingerprint = ticket["fingerprint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let version = ticket["version"].as_i64().unwrap_or(-1);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if key != format!("{fingerprint}:{version}") {
        return refuse(format!(
            "Idempotency-Key {key:?} does not name the body's ticket {fingerprint} version {version}"
        ));
    }
    let event = ticket["event"].as_str().unwrap_or_default().to_string();
    let duplicate = !state.taken.lock().unwrap().insert(key.clone());
    if !duplicate {
        let mut tickets = state.tickets.lock().unwrap();
        let copy = tickets.entry(fingerprint.clone()).or_default();
        if event == "opened" {
            copy.opened += 1;
        }
        // Sends of one ticket are sequential, so versions only grow; a late older one must not win.
        if version > copy.version {
            copy.version = version;
            copy.state = ticket["state"].as_str().unwrap_or_default().to_string();
            copy.reason = ticket["reason"].as_str().unwrap_or_default().to_string();
            copy.count = ticket["count"].as_u64().unwrap_or_default();
        }
    }
    let index = {
        let mut requests = state.requests.lock().unwrap();
        requests.push(Received {
            key,
            fingerprint,
            version,
            event,
            duplicate,
        });
        requests.len() - 1
    };
    if state.hold_next.swap(false, Ordering::SeqCst) {
        state.held.lock().unwrap().push(index);
        // Taken, not yet answered: the test kills the worker now, so the ledger never records this send.
        // Registered as a waiter before the hold is announced, so a release after it always wakes it (and one
        // with nobody waiting leaves nothing behind for a later hold).
        let release = state.release.notified();
        tokio::pin!(release);
        release.as_mut().enable();
        state.holds_begun.fetch_add(1, Ordering::SeqCst);
        release.await;
    } else if call % 3 == 0 {
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    StatusCode::OK.into_response()
}

/// The flow's roster with one webhook ticket sink at `url` that every route uses, and its Secret.
fn with_webhook_sink(files: &FlowFiles, url: &str) {
    let mut rendered = files.rendered.clone();
    let roster = rendered
        .roster
        .as_mut()
        .expect("the example flow has a roster");
    roster.spec.ticket_sinks = vec![TicketSink {
        name: SINK.into(),
        r#type: TicketSinkType::Webhook,
        url: Some(url.into()),
        project: None,
        repository: None,
        channel: None,
        credentials_secret_ref: SecretRef {
            name: "ticket-webhook".into(),
        },
    }];
    for route in &mut roster.spec.routes {
        route.ticket_sink = Some(SINK.into());
    }
    let dir = files.secrets_dir().join("ticket-webhook");
    std::fs::create_dir_all(&dir).expect("secret dir");
    std::fs::write(dir.join("signingSecret"), format!("{SIGNING_SECRET}\n")).expect("secret");
    std::fs::write(
        files.flow_file(),
        serde_yaml::to_string(&rendered).expect("rendered flow serialises"),
    )
    .expect("flow file");
}

/// The ticket versions waiting in the outbox (`meshline_ticket_deliveries_pending`), `None` while the
/// worker does not answer or has not counted its sink yet.
async fn outbox_pending(worker: &WorkerProcess) -> Option<f64> {
    let text = client()
        .get(format!("{}/metrics", worker.ops_url()))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("meshline_ticket_deliveries_pending{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The ledger's tickets (`GET /tickets?all=true`), by fingerprint.
async fn ledger_tickets(worker: &WorkerProcess) -> BTreeMap<String, Value> {
    let list: Vec<Value> = client()
        .get(format!("{}/tickets?all=true&limit=1000", worker.ops_url()))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .expect("GET /tickets")
        .json()
        .await
        .expect("/tickets is JSON");
    list.into_iter()
        .map(|t| (t["fingerprint"].as_str().unwrap_or_default().to_string(), t))
        .collect()
}

async fn kill_and_restart_while_tickets_change(ledger: LedgerChoice, seed: u64) {
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let erp = Erp::start(ERP_TOKEN).await;
    erp.set_latency(Duration::from_millis(2));
    for n in 0..RECORDS {
        if let Some(status) = refusal(n) {
            erp.refuse_with(&external_id(n), status);
        }
    }
    let receiver = Receiver::start().await;
    let files = FlowFiles::new(&erp.base_url(), ledger.clone(), 8);
    with_webhook_sink(&files, &receiver.url());
    let mut worker = WorkerProcess::new(&files, "tickets-worker");
    worker.use_args(&["--lease", LEASE_SECS]);
    worker.start().await;
    let _evidence = EvidenceOnFailure::new(vec![worker.ops_url()]);

    let (batches, _, versions) = traffic(RECORDS, BATCH, &[]);
    let urls = vec![worker.url()];
    // The CRM is paced by the kills, not by a clock: each kill lets three more batches go, so dead letters (and
    // with them new ticket versions to send) keep coming until the last kill, however slow the machine is.
    let pace = Arc::new(Semaphore::new(BATCHES_PER_KILL));
    let crm_pace = pace.clone();
    let crm = tokio::spawn(async move {
        let http = client();
        let mut stats = CrmStats::default();
        for batch in &batches {
            crm_pace
                .acquire()
                .await
                .expect("the pace is never closed")
                .forget();
            deliver_batch(&http, &urls, batch, &mut stats, Duration::from_secs(60)).await;
        }
        stats
    });

    let mut mid_delivery = 0;
    for kill in 0..KILLS {
        pace.add_permits(BATCHES_PER_KILL);
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..900))).await;
        let targeted = kill % 2 == 1;
        if targeted {
            // Every other kill lands while the receiver holds a ticket it took and has not answered, so the
            // window between the receiver taking it and the ledger recording that is hit for sure, however
            // the machine schedules. The batches this kill let go bring new dead letters, so a ticket version
            // is on its way; the deadline only turns a hang into a failure.
            let holds = receiver.state.holds_begun.load(Ordering::SeqCst);
            receiver.state.hold_next.store(true, Ordering::SeqCst);
            let until = Instant::now() + Duration::from_secs(120);
            while receiver.state.holds_begun.load(Ordering::SeqCst) == holds {
                assert!(
                    Instant::now() < until,
                    "kill {kill}: the receiver took no ticket to hold in 120 s; log:\n{}",
                    worker.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if receiver.state.in_flight.load(Ordering::SeqCst) > 0 {
            mid_delivery += 1;
        }
        worker.kill();
        if targeted {
            receiver.state.release.notify_waiters();
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        worker.start().await;
    }
    // The kills have let every batch go (3 + 3 a kill); whatever the pacing leaves is released here.
    pace.add_permits(RECORDS.div_ceil(BATCH));
    let crm_stats = tokio::time::timeout(Duration::from_secs(60), crm)
        .await
        .expect("the CRM finished sending within 60 s of the last kill")
        .expect("the CRM task did not panic");
    let killing_done = started.elapsed();

    // Quiescent: every record settled and the outbox empty (the ledger's own view, not the receiver's).
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = worker.status().await
            && status["pending"].as_u64() == Some(0)
            && outbox_pending(&worker).await == Some(0.0)
        {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "records or ticket deliveries still pending 60 s after the kills; log:\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // ---- tickets ----
    let ledger_view = ledger_tickets(&worker).await;
    let copies = receiver.tickets();
    let requests = receiver.requests();
    assert_eq!(
        receiver.violations(),
        Vec::<String>::new(),
        "every ticket request was signed and keyed by fingerprint:version"
    );
    let reasons: HashSet<String> = (0..RECORDS)
        .filter_map(refusal)
        .map(|s| format!("erp:{s}"))
        .collect();
    let ledger_reasons: HashSet<String> = ledger_view
        .values()
        .map(|t| t["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        ledger_reasons, reasons,
        "the ledger has one ticket per cause that occurred"
    );
    assert_eq!(
        copies.keys().collect::<Vec<_>>(),
        ledger_view.keys().collect::<Vec<_>>(),
        "the receiver holds exactly the ledger's tickets, none lost and none extra"
    );
    for (fp, t) in &ledger_view {
        let copy = &copies[fp];
        assert_eq!(
            copy.opened, 1,
            "ticket {fp} ({}) was opened exactly once at the receiver after dropping repeats: {copy:?}",
            copy.reason
        );
        assert_eq!(
            (
                copy.version,
                copy.state.as_str(),
                copy.reason.as_str(),
                copy.count
            ),
            (
                t["version"].as_i64().unwrap_or(-1),
                t["state"].as_str().unwrap_or_default(),
                t["reason"].as_str().unwrap_or_default(),
                t["count"].as_u64().unwrap_or_default(),
            ),
            "the receiver's copy of {fp} (left) is the ledger's current version (right)"
        );
    }
    // Each refused record is one dead letter, counted on its cause's ticket exactly once.
    let mut refused_per_reason: HashMap<String, u64> = HashMap::new();
    for n in 0..RECORDS {
        if let Some(s) = refusal(n) {
            *refused_per_reason.entry(format!("erp:{s}")).or_default() += 1;
        }
    }
    for t in ledger_view.values() {
        let reason = t["reason"].as_str().unwrap_or_default();
        assert_eq!(
            t["count"].as_u64(),
            refused_per_reason.get(reason).copied(),
            "ticket {reason} counts each of its dead letters once"
        );
    }
    // A resend after a kill carries the key of the version it resends; the receiver drops it.
    let resends: Vec<&Received> = requests.iter().filter(|r| r.duplicate).collect();
    let mut per_key: HashMap<&str, usize> = HashMap::new();
    for r in &requests {
        *per_key.entry(r.key.as_str()).or_default() += 1;
    }
    assert!(
        resends
            .iter()
            .all(|r| r.key == format!("{}:{}", r.fingerprint, r.version)),
        "resends carry the same Idempotency-Key"
    );
    let mut events: BTreeMap<&str, usize> = BTreeMap::new();
    for r in requests.iter().filter(|r| !r.duplicate) {
        *events.entry(r.event.as_str()).or_default() += 1;
    }

    // ---- records ----
    let orders = erp.orders();
    let accepted: HashSet<String> = (0..RECORDS)
        .filter(|&n| refusal(n).is_none())
        .map(external_id)
        .collect();
    let got: HashSet<String> = orders.keys().cloned().collect();
    assert!(
        accepted == got,
        "the ERP holds exactly the records it accepted: {} missing, {} extra",
        accepted.difference(&got).count(),
        got.difference(&accepted).count()
    );
    assert_eq!(
        erp.violations(),
        Vec::<String>::new(),
        "every ERP request carried the token and an Idempotency-Key"
    );
    assert_eq!(
        counter(&status, "delivered") as usize,
        orders.len(),
        "the ledger's delivered count agrees with the ERP: {status}"
    );
    assert_eq!(
        counter(&status, "deadLettered") as u64,
        refused_per_reason.values().sum::<u64>(),
        "every refused record was dead-lettered once: {status}"
    );
    assert_eq!(
        counter(&status, "received") as usize,
        versions,
        "every record was stored exactly once, none lost and no CRM retry counted twice: {status}"
    );

    assert!(
        worker.starts > KILLS,
        "the worker was restarted after every kill"
    );
    assert!(
        mid_delivery >= KILLS / 2,
        "at least half the kills hit a ticket delivery in flight ({mid_delivery})"
    );
    // Every ticket the receiver took and held unanswered while the worker was killed was sent again after the
    // restart: the same version (a resend the receiver dropped by its key) or, when the ticket changed in
    // the meantime, a newer one. Never lost with the killed worker.
    let held = receiver.state.held.lock().unwrap().clone();
    assert!(
        held.len() >= (KILLS / 2) as usize,
        "every other kill landed while the receiver held a ticket it took ({} holds)",
        held.len()
    );
    for &index in &held {
        let taken = &requests[index];
        assert!(
            requests[index + 1..]
                .iter()
                .any(|r| r.fingerprint == taken.fingerprint && r.version >= taken.version),
            "ticket {} version {} was taken while its worker was killed, and never sent again",
            taken.fingerprint,
            taken.version
        );
    }
    eprintln!(
        "tickets ({}): {} tickets, {} ticket requests (taken: {events:?}), {} resends dropped by Idempotency-Key \
         ({} keys sent more than once), {KILLS} SIGKILLs ({mid_delivery} with a ticket at the receiver), \
         CRM {crm_stats:?}, kills over after {killing_done:.1?}, total {:.1?}",
        status["backend"],
        ledger_view.len(),
        requests.len(),
        resends.len(),
        per_key.values().filter(|&&c| c > 1).count(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_ticket_delivery_neither_loses_nor_reopens_tickets_with_sqlite() {
    kill_and_restart_while_tickets_change(LedgerChoice::Embedded, 0x71c4_0001).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_ticket_delivery_neither_loses_nor_reopens_tickets_with_postgres() {
    let pg = postgres::PgServer::start();
    let url = pg.create_database("tickets");
    kill_and_restart_while_tickets_change(LedgerChoice::Postgres(url), 0x71c4_0002).await;
}
