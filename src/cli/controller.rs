//! `meshline controller`: the operator's control plane (see `crate::controller`).

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;

use crate::api::WorkerPodSettings;

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
    /// Pod settings of every worker, under each flow's own `spec.worker`, as JSON: `serviceAccountName`,
    /// `imagePullSecrets`, `nodeSelector`, `tolerations`, `affinity`, `priorityClassName`, `podAnnotations`,
    /// `podLabels` (the chart's `workerDefaults`).
    #[arg(long, env = "MESHLINE_WORKER_DEFAULTS", default_value = "{}", value_parser = parse_worker_defaults)]
    pub worker_defaults: WorkerPodSettings,
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
    /// How long no worker pod of a flow may answer (over at least three polls) before the controller opens
    /// the ticket `status:NoWorkerAnswering` for the flow's owner (Go duration).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub outage_after: std::time::Duration,
    /// Flows whose worker pods are polled at the same time.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub status_flows_at_once: u16,
    /// Worker pods of one flow polled at the same time (so at most flows × pods requests are in flight).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub status_pods_at_once: u16,
    /// Run without leader election (a single replica or a development run).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Per-flow NetworkPolicies for the worker pods: `off` (none, no RBAC needed), `on` (one per flow,
    /// owned by it), `clean-up` (none; delete those made while it was on).
    #[arg(long, value_enum, default_value_t = NetworkPolicyMode::Off)]
    pub flow_network_policies: NetworkPolicyMode,
    /// With `--flow-network-policies on`: a namespace whose pods may reach the workers' webhook port (the
    /// ingress controller's). Repeat for several; none closes the webhook port.
    #[arg(long = "webhook-from-namespace", value_name = "NAMESPACE")]
    pub webhook_from_namespaces: Vec<String>,
    /// With `--flow-network-policies on`: the labels of the controller's own pods (`k=v,k=v`), which the
    /// workers' operations port admits (from `POD_NAMESPACE`).
    #[arg(long, value_parser = parse_labels, default_value = "app.kubernetes.io/name=meshline")]
    pub controller_pod_labels: std::collections::BTreeMap<String, String>,
    /// With `--flow-network-policies on`: a namespace whose pods may reach the operations port for
    /// `/metrics` (Prometheus'). Repeat for several.
    #[arg(long = "metrics-from-namespace", value_name = "NAMESPACE")]
    pub metrics_from_namespaces: Vec<String>,
    /// With `--flow-network-policies on` and `--status-via-proxy`: the API server's address range (CIDR),
    /// admitted to the operations port, since the pod proxy calls the worker from there. Repeat for
    /// several.
    #[arg(long = "api-server-cidr", value_name = "CIDR", value_parser = parse_cidr)]
    pub api_server_cidrs: Vec<String>,
    /// Serve the operations web page on this address (e.g. `0.0.0.0:8090`); off when not given. Reach it
    /// through the cluster's own access control (`kubectl port-forward`, or an Ingress with SSO in front):
    /// it has no sign-in of its own, and approvals need each person's own token.
    #[arg(long)]
    pub ops_page_addr: Option<SocketAddr>,
}

/// `--flow-network-policies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkPolicyMode {
    Off,
    On,
    CleanUp,
}

fn parse_labels(s: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?}: expected key=value"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    if out.is_empty() {
        return Err("at least one label key=value is required".into());
    }
    Ok(out)
}

fn parse_cidr(s: &str) -> Result<String, String> {
    let (ip, bits) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a CIDR like 10.0.0.1/32"))?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match bits.parse::<u8>() {
        Ok(b) if b <= max => Ok(s.to_string()),
        _ => Err(format!("{s:?}: the prefix length must be 0 to {max}")),
    }
}

/// Reads `--worker-defaults`: a JSON object of known fields only (a misspelt key would otherwise be dropped
/// silently), decoded with the path of any bad field, and checked like a flow's `spec.worker`.
pub fn parse_worker_defaults(s: &str) -> Result<WorkerPodSettings, String> {
    if s.trim().is_empty() {
        return Ok(WorkerPodSettings::default());
    }
    let value: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
    let Some(object) = value.as_object() else {
        return Err("must be a JSON object of worker pod settings".into());
    };
    let schema = schemars::schema_for!(WorkerPodSettings);
    let known: Vec<&str> = schema
        .get("properties")
        .and_then(|p| p.as_object())
        .map(|p| p.keys().map(String::as_str).collect())
        .unwrap_or_default();
    if let Some(unknown) = object.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!(
            "unknown field {unknown:?}; the fields are {}",
            known.join(", ")
        ));
    }
    let settings: WorkerPodSettings = serde_path_to_error::deserialize(value)
        .map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    let problems =
        crate::controller::flow::validate::worker_pod_settings(&settings, "--worker-defaults");
    if problems.is_empty() {
        Ok(settings)
    } else {
        Err(problems.join("; "))
    }
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
    let network_policies = match args.flow_network_policies {
        NetworkPolicyMode::Off => crate::controller::FlowNetworkPolicies::Off,
        NetworkPolicyMode::CleanUp => crate::controller::FlowNetworkPolicies::CleanUp,
        NetworkPolicyMode::On => {
            if args.status_via_proxy && args.api_server_cidrs.is_empty() {
                eprintln!(
                    "warning: --status-via-proxy with --flow-network-policies on needs --api-server-cidr: \
                     the API server's pod proxy reaches the workers from its own address, and the \
                     policies admit only the controller's pods until it is given"
                );
            }
            crate::controller::FlowNetworkPolicies::On(
                crate::controller::flow::build::NetworkPolicySettings {
                    webhook_from_namespaces: args.webhook_from_namespaces,
                    controller_namespace: args.lease_namespace.clone(),
                    controller_pod_labels: args.controller_pod_labels,
                    metrics_from_namespaces: args.metrics_from_namespaces,
                    api_server_cidrs: args.api_server_cidrs,
                },
            )
        }
    };
    let settings = crate::controller::Settings {
        listen: args.listen,
        status_period: args.status_period,
        worker_image: args.worker_image,
        worker_defaults: args.worker_defaults,
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
        network_policies,
        outage: crate::controller::flow::outage::OutageSettings {
            after: args.outage_after,
            ..Default::default()
        },
        ops_page: args.ops_page_addr,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_pod_labels_are_key_value_pairs() {
        let labels =
            parse_labels("app.kubernetes.io/name=meshline, app.kubernetes.io/instance=prod")
                .unwrap();
        assert_eq!(labels["app.kubernetes.io/name"], "meshline");
        assert_eq!(labels["app.kubernetes.io/instance"], "prod");
        assert!(parse_labels("name").unwrap_err().contains("key=value"));
        assert!(parse_labels("").is_err());
    }

    #[test]
    fn api_server_cidrs_are_checked() {
        assert_eq!(parse_cidr("10.0.0.1/32").unwrap(), "10.0.0.1/32");
        assert_eq!(parse_cidr("fd00::/8").unwrap(), "fd00::/8");
        for bad in ["10.0.0.1", "10.0.0.1/33", "ten/8", "fd00::/129"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }
}
