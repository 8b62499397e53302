//! `meshline dev` (an example end to end on one machine) and `meshline sim crm|erp` (the stand-ins alone).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::dev::{DevOptions, ScenarioOptions};

#[derive(Debug, Args)]
pub struct DevArgs {
    /// An example directory with a roster, a contract and a flow.
    pub dir: PathBuf,
    /// State directory (ledger, generated secrets), kept between runs. Default: .meshline/dev/<flow>.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Start from an empty state directory.
    #[arg(long)]
    pub fresh: bool,
    /// The worker's webhook port (`POST /webhook`).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The worker's operations port (status, records, dead letters, holds, metrics; asks for the token).
    #[arg(long, default_value_t = 8081)]
    pub ops_port: u16,
    /// The operations web page's port (flows, exceptions by owner, held records with approve and reject,
    /// dead letters with replay by reason), on 127.0.0.1 only.
    #[arg(long, default_value_t = 8090)]
    pub page_port: u16,
    /// Run a built-in scenario and report, instead of waiting for you to poke at it.
    #[arg(long, value_parser = ["default"])]
    pub scenario: Option<String>,
    /// Deals the scenario closes.
    #[arg(long, default_value_t = 200)]
    pub records: usize,
    /// Deals per second.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

pub fn dev(args: DevArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let options = DevOptions { dir: args.dir.clone(), state: args.state.clone(), fresh: args.fresh, port: args.port, ops_port: args.ops_port };
        let mut env = match crate::dev::start(&options).await {
            Ok(env) => env,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        eprintln!("meshline dev: flow {} (state in {})", env.flow, env.state_dir.display());
        eprintln!("  webhooks   {}   (POST /webhook)", env.webhook_url());
        eprintln!("  operations {}   (/status, /records/ID, /dead-letters, /holds with the token; /metrics)", env.ops_url());
        eprintln!("  CRM        http://{}   (Salesforce-style org: OAuth client credentials, GET /services/data/v61.0/query?q=SOQL)", env.crm_addr);
        eprintln!("  ERP        http://{}   (NetSuite-style REST stand-in: records, SuiteQL; GET /sim/orders)", env.erp_addr);
        eprintln!("  tickets    http://{}/sinks/<sink>   (local webhook receiving every roster ticket sink's tickets, signature checked)", env.tickets_addr);
        eprintln!("  API token in {}", env.token_file().display());
        // The operations page, as the controller serves it, reading this worker directly.
        let page = match tokio::net::TcpListener::bind(("127.0.0.1", args.page_port)).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("error: --page-port {}: cannot listen on 127.0.0.1:{}: {e}", args.page_port, args.page_port);
                env.shutdown().await;
                return ExitCode::from(2);
            }
        };
        let page_url = page.local_addr().map(|a| format!("http://{a}/")).unwrap_or_default();
        let backend = env.page_backend();
        let page_task = tokio::spawn(crate::ops_page::serve(page, std::sync::Arc::new(backend)));
        eprintln!("  page       {page_url}   (operations page: flows, exceptions by owner, approve or reject held records with your personal token)");
        let code = match args.scenario {
            Some(_) => {
                use std::io::IsTerminal;
                let scenario = ScenarioOptions {
                    records: args.records,
                    rate: args.rate,
                    progress: std::io::stderr().is_terminal(),
                    timeout: Duration::from_secs(120),
                };
                match crate::dev::run_scenario(&mut env, &scenario).await {
                    Ok(report) => {
                        if args.json {
                            println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
                        } else {
                            print!("{report}");
                        }
                        if report.unexplained.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            None => {
                let secret = std::fs::read_to_string(env.state_dir.join("stand-ins.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v["webhookSecret"].as_str().map(str::to_string))
                    .unwrap_or_default();
                eprintln!("  send deals:   meshline sim crm --target {}/webhook --secret {secret} --records 20", env.webhook_url());
                eprintln!("  dead letters: meshline dlq list --url {} --token-file {}", env.ops_url(), env.token_file().display());
                eprintln!("  tickets:      meshline ticket list {} --url {} --token-file {}", env.flow, env.ops_url(), env.token_file().display());
                eprintln!("  audit:        meshline audit {} --url {} --token-file {}", env.flow, env.ops_url(), env.token_file().display());
                // Shown as the first owner who approves anything, with that owner's generated token.
                let approver = env.rendered.roster.as_ref().and_then(|r| {
                    r.spec.owners.iter().find(|o| !o.approver_roles.is_empty()).map(|o| o.id.clone())
                });
                if let Some(owner) = approver
                    && let Some(identity) = env.identity_token_file(&owner)
                {
                    eprintln!(
                        "  approve:      meshline hold approve {} ID --url {} --token-file {} --by {owner} --identity-token-file {} --reason '...'",
                        env.flow, env.ops_url(), env.token_file().display(), identity.display()
                    );
                }
                eprintln!("Ctrl-C stops.");
                super::worker::shutdown_signal().await;
                ExitCode::SUCCESS
            }
        };
        page_task.abort();
        env.shutdown().await;
        code
    })
}

#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Close deals and post them as signed webhooks to a worker, retrying until acknowledged.
    Crm {
        /// The worker's webhook URL.
        #[arg(long, default_value = "http://127.0.0.1:8080/webhook")]
        target: String,
        /// The webhook signing secret (the source Secret's `webhookSecret`).
        #[arg(long, env = "MESHLINE_WEBHOOK_SECRET")]
        secret: String,
        #[arg(long, default_value_t = 20)]
        records: usize,
        /// Deals per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
    },
    /// Serve the NetSuite-style ERP stand-in until Ctrl-C.
    Erp {
        #[arg(long, default_value_t = 8090)]
        port: u16,
        /// Write the TBA credentials the stand-in accepts here (one file per key, like a mounted Secret).
        #[arg(long)]
        credentials_dir: PathBuf,
    },
}

pub fn sim(command: SimCommand) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        match command {
            SimCommand::Crm { target, secret, records, rate } => {
                if rate.is_nan() || rate <= 0.0 {
                    eprintln!("error: --rate must be positive");
                    return ExitCode::from(2);
                }
                let crm = crate::sim::crm::CrmStandIn::new(target, secret);
                let pricebook: Vec<(String, rust_decimal::Decimal)> =
                    crate::sim::erp::example_pricebook().into_iter().map(|(k, (p, _))| (k, p)).collect();
                let interval = Duration::from_secs_f64(1.0 / rate);
                for n in 0..records {
                    let deal = crate::sim::crm::opportunity(n, crate::sim::crm::DealKind::Normal, &pricebook);
                    if let Err(e) = crm.send(&[deal], Duration::from_secs(60)).await {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                    tokio::time::sleep(interval).await;
                }
                println!("sent {records} closed-won deals to {}", crm.target);
                ExitCode::SUCCESS
            }
            SimCommand::Erp { port, credentials_dir } => {
                let creds = crate::sim::erp::ErpCredentials::generate();
                if let Err(e) = std::fs::create_dir_all(&credentials_dir) {
                    eprintln!("error: {}: {e}", credentials_dir.display());
                    return ExitCode::from(2);
                }
                for (key, value) in creds.secret_files() {
                    if let Err(e) = std::fs::write(credentials_dir.join(key), value) {
                        eprintln!("error: {}: {e}", credentials_dir.display());
                        return ExitCode::from(2);
                    }
                }
                let state = crate::sim::erp::ErpState::new(creds, crate::sim::erp::example_pricebook());
                let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("error: cannot listen on 127.0.0.1:{port}: {e}");
                        return ExitCode::from(2);
                    }
                };
                eprintln!("ERP stand-in on http://127.0.0.1:{port}; TBA credentials in {}", credentials_dir.display());
                let app = crate::sim::erp::router(state);
                tokio::select! {
                    r = axum::serve(listener, app) => if let Err(e) = r { eprintln!("error: {e}"); return ExitCode::FAILURE; },
                    _ = super::worker::shutdown_signal() => {}
                }
                ExitCode::SUCCESS
            }
        }
    })
}
