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
    /// Read each worker pod's status through the API server's pod proxy (needs `pods/proxy`; for controllers
    /// outside the cluster).
    #[arg(long)]
    pub status_via_proxy: bool,
    /// The bound of one flow's status poll, all its worker pods together (Go duration); a pod that has not
    /// answered by then is reported unreachable in the flow's `StatusUnavailable` condition.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub status_timeout: std::time::Duration,
    /// Flows whose worker pods are polled at the same time.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub status_flows_at_once: u16,
    /// Worker pods of one flow polled at the same time (so at most flows × pods requests are in flight).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub status_pods_at_once: u16,
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
        poll: crate::controller::poll::PollSettings {
            timeout: args.status_timeout,
            flows_at_once: usize::from(args.status_flows_at_once),
            pods_at_once: usize::from(args.status_pods_at_once),
        },
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
