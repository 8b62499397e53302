//! `meshline controller`: the operator's control plane (see `crate::controller`).

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;

/// Options of `meshline controller` (the chart's Deployment passes them).
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// How often every running flow's worker `/status` is read into the flow's status (Go duration).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub status_period: std::time::Duration,
    /// Image of the worker pods unless a flow sets `spec.worker.image`.
    #[arg(long, env = "MESHLINE_WORKER_IMAGE")]
    pub worker_image: String,
    /// Name of the leader-election Lease, in the controller's namespace (`POD_NAMESPACE`).
    #[arg(long, default_value = "meshline-controller-leader")]
    pub lease_name: String,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Read worker status through the API server's service proxy (needs `services/proxy`; for controllers
    /// outside the cluster).
    #[arg(long)]
    pub status_via_proxy: bool,
    /// Run without leader election (a single replica or a development run).
    #[arg(long)]
    pub no_leader_election: bool,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d: kube::core::Duration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration like 30s or 1m: {e}"))?;
    let d = std::time::Duration::from(d);
    if d.is_zero() {
        return Err("the status period must be positive".into());
    }
    Ok(d)
}

pub fn controller(args: ControllerArgs) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let identity = args
        .identity
        .unwrap_or_else(|| format!("meshline-controller-{}", std::process::id()));
    let settings = crate::controller::Settings {
        listen: args.listen,
        status_period: args.status_period,
        worker_image: args.worker_image,
        lease_name: args.lease_name,
        lease_namespace: args.lease_namespace,
        identity,
        namespace: args.namespace,
        status_via_proxy: args.status_via_proxy,
        no_leader_election: args.no_leader_election,
    };
    match runtime.block_on(crate::controller::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, label = e.metric_label(), "controller stopped");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
