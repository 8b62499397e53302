//! The chart's dashboard and alerts query only metrics the code exports (issue #17): every metric name in
//! every panel's query, every template variable's query and every alert's expr must be a series the worker's
//! or the controller's registry really produces. The exported names come from the code (each registry
//! encoded, its `# TYPE` lines read and expanded the way Prometheus sees the series), never from a list kept
//! by hand; the queries are read from the files the chart ships.
//!
//! PromQL is read by a small tokenizer (no parser crate): it skips strings, label matchers `{…}`, ranges
//! `[…]`, numbers and durations, Grafana variables, function and aggregation names, keywords and the label
//! lists of `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`; every other identifier is a metric
//! name. Its own tests below pin that down, and a checker test proves an unexported name fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The families an OpenMetrics exposition shows, from its `# TYPE` lines, as (name, type).
fn exposed_families(exposition: &str) -> BTreeSet<(String, String)> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut parts = rest.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

fn registries() -> (
    meshline::worker::metrics::Metrics,
    meshline::controller::metrics::Metrics,
) {
    (
        meshline::worker::metrics::Metrics::new("commerce-sync", "salesforce-to-netsuite"),
        meshline::controller::metrics::Metrics::new(),
    )
}

/// Every series the worker and the controller export, from the catalogues of their registries.
fn exported() -> BTreeSet<String> {
    let (worker, controller) = registries();
    worker
        .catalogue
        .families()
        .iter()
        .chain(controller.catalogue.families())
        .flat_map(|f| f.series())
        .collect()
}

#[test]
fn the_catalogues_list_what_the_registries_expose() {
    let (worker, controller) = registries();
    // Families with a series show in the exposition; each must be catalogued under the same name and type.
    worker.fail(meshline::api::ErrorClass::Permanent);
    controller.observe("SyncFlow", std::time::Duration::from_millis(3), Some("api"));
    for (exposition, catalogue) in [
        (worker.encode(), &worker.catalogue),
        (controller.encode(), &controller.catalogue),
    ] {
        let catalogued: BTreeSet<(String, String)> = catalogue
            .families()
            .iter()
            .map(|f| (f.name.clone(), f.kind.clone()))
            .collect();
        let exposed = exposed_families(&exposition);
        assert!(!exposed.is_empty(), "{exposition}");
        let missing: Vec<_> = exposed.difference(&catalogued).collect();
        assert!(
            missing.is_empty(),
            "exposed but not catalogued: {missing:?}"
        );
    }
    assert!(
        exposed_families(&worker.encode())
            .contains(&("meshline_records_failed".to_string(), "counter".to_string())),
        "a touched family shows in the exposition"
    );
}

const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const OTHER_KEYWORDS: [&str; 9] = [
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "@",
];

/// The metric names a PromQL expression selects, or why it cannot be read.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_string = |i: usize| -> Result<usize, String> {
        let quote = chars[i];
        let mut j = i + 1;
        while j < chars.len() {
            match chars[j] {
                '\\' if quote != '`' => j += 2,
                c if c == quote => return Ok(j + 1),
                _ => j += 1,
            }
        }
        Err(format!("unterminated string starting at character {i}"))
    };
    // Skips from an opening `{`, `[` or `(` to just after its match, strings included.
    let skip_group = |i: usize| -> Result<usize, String> {
        let (open, close) = match chars[i] {
            '{' => ('{', '}'),
            '[' => ('[', ']'),
            _ => ('(', ')'),
        };
        let mut depth = 0;
        let mut j = i;
        while j < chars.len() {
            match chars[j] {
                '"' | '\'' | '`' => {
                    j = skip_string(j)?;
                    continue;
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(j + 1);
                    }
                }
                _ => {}
            }
            j += 1;
        }
        Err(format!("unbalanced '{open}' at character {i}"))
    };
    let is_ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if matches!(c, '"' | '\'' | '`') {
            i = skip_string(i)?;
        } else if c == '{' || c == '[' {
            i = skip_group(i)?;
        } else if c == '}' || c == ']' {
            return Err(format!("unbalanced '{c}' at character {i}"));
        } else if c == '$' {
            // A Grafana variable: `$flow`, `${flow}`, `$__rate_interval`.
            i += 1;
            if i < chars.len() && chars[i] == '{' {
                i = skip_group(i)?;
            } else {
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // A number or a duration (`1e3`, `0x1f`, `5m`, `1h30m`).
            while i < chars.len() && (is_ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let lower = word.to_ascii_lowercase();
            if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                if chars.get(next) == Some(&'(') {
                    i = skip_group(next)?;
                }
            } else if OTHER_KEYWORDS.contains(&lower.as_str())
                || AGGREGATIONS.contains(&lower.as_str())
                || chars.get(next) == Some(&'(')
            {
                // An operator, an aggregation or a function: its arguments are read on.
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    Ok(names)
}

/// A query that names a metric, and where it comes from (file, panel or alert, the query).
#[derive(Debug)]
struct Query {
    place: String,
    expr: String,
}

/// Grafana's `label_values(selector, label)`: the selector is PromQL, the label is not.
fn grafana_variable_query(query: &str) -> String {
    let q = query.trim();
    match q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        Some(inner) => match inner.rfind(',') {
            Some(comma) => inner[..comma].to_string(),
            None => String::new(),
        },
        None => q.to_string(),
    }
}

/// Every query of a Grafana dashboard: panels' targets (rows' nested panels too) and query variables.
fn dashboard_queries(file: &str, dashboard: &Value) -> Vec<Query> {
    fn panels(file: &str, list: &Value, out: &mut Vec<Query>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(Query {
                        place: format!("{file}: panel {title:?} target {}", target["refId"]),
                        expr: expr.to_string(),
                    });
                }
            }
            panels(file, &panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(file, &dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap_or_default();
        out.push(Query {
            place: format!("{file}: variable {}", var["name"]),
            expr: grafana_variable_query(query),
        });
    }
    out
}

/// Every alert expr of the chart's PrometheusRule template, with its template actions (thresholds, windows)
/// replaced by a number. Each expr must sit on one line, and there must be one per alert.
fn rule_queries(file: &str, template: &str) -> Result<Vec<Query>, String> {
    let alerts = template
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    let mut out = Vec::new();
    let mut alert = String::new();
    for (n, line) in template.lines().enumerate() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            alert = name.trim().to_string();
        } else if let Some(expr) = t.strip_prefix("expr:") {
            let mut expr = expr.trim().to_string();
            // A YAML block scalar (`>`, `|-`, ...) or an empty value: the expr goes on below.
            if expr.is_empty() || expr.starts_with(['>', '|']) {
                return Err(format!(
                    "{file}:{}: alert {alert}: write the expr on one line (found {expr:?})",
                    n + 1
                ));
            }
            while let (Some(a), Some(b)) = (expr.find("{{"), expr.find("}}")) {
                if b < a {
                    return Err(format!("{file}:{}: unbalanced template action", n + 1));
                }
                expr.replace_range(a..b + 2, "1");
            }
            out.push(Query {
                place: format!("{file}:{}: alert {alert}", n + 1),
                expr,
            });
        }
    }
    if out.len() != alerts {
        return Err(format!(
            "{file}: {alerts} alerts but {} one-line exprs: write each alert's expr on one line",
            out.len()
        ));
    }
    Ok(out)
}

/// What the queries name that nobody exports, one line each (empty: all good).
fn unexported(queries: &[Query], exported: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for q in queries {
        match metric_names(&q.expr) {
            Err(why) => problems.push(format!("{}: cannot read {:?}: {why}", q.place, q.expr)),
            Ok(names) if names.is_empty() => problems.push(format!(
                "{}: {:?} names no metric (a query that selects nothing proves nothing)",
                q.place, q.expr
            )),
            Ok(names) => {
                for name in names {
                    if !exported.contains(&name) {
                        problems.push(format!(
                            "{}: metric {name} is exported by neither the worker nor the controller (in {:?})",
                            q.place, q.expr
                        ));
                    }
                }
            }
        }
    }
    problems
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[test]
fn every_dashboard_panel_queries_an_exported_metric() {
    let dir = repo().join("charts/meshline/dashboards");
    let exported = exported();
    let mut files = 0;
    let mut queries = 0;
    for entry in std::fs::read_dir(&dir).expect("the chart's dashboards folder") {
        let path = entry.expect("a dashboard file").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        files += 1;
        let file = path
            .strip_prefix(repo())
            .unwrap_or(&path)
            .display()
            .to_string();
        let dashboard: Value = serde_json::from_str(&read(&path))
            .unwrap_or_else(|e| panic!("{file} is not JSON: {e}"));
        let found = dashboard_queries(&file, &dashboard);
        queries += found.len();
        let problems = unexported(&found, &exported);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
    assert!(files >= 1, "no dashboard in {}", dir.display());
    // The panels the issue asks for, each with at least one query.
    assert!(
        queries >= 20,
        "only {queries} queries found: is the dashboard read at all?"
    );
}

#[test]
fn every_alert_queries_an_exported_metric() {
    let path = repo().join("charts/meshline/templates/prometheusrule.yaml");
    let queries = rule_queries(
        "charts/meshline/templates/prometheusrule.yaml",
        &read(&path),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let alerts: Vec<&str> = queries.iter().map(|q| q.place.as_str()).collect();
    for wanted in [
        "MeshlineSlaBreached",
        "MeshlineBacklogGrowing",
        "MeshlineCircuitBreakerOpen",
        "MeshlineTicketSinkFailing",
        "MeshlineAuditUnexplainedDifferences",
        "MeshlineAuditPartial",
        "MeshlineAuditNotRun",
    ] {
        assert!(
            alerts
                .iter()
                .any(|a| a.ends_with(&format!("alert {wanted}"))),
            "alert {wanted} missing from {alerts:?}"
        );
    }
    let problems = unexported(&queries, &exported());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_operating_model_measures_are_exported_under_their_stable_names() {
    let exported = exported();
    for name in [
        // Worker: throughput, backlog, failures, breaker, ticket sinks.
        "meshline_records_received_total",
        "meshline_records_delivered_total",
        "meshline_queue_depth",
        "meshline_oldest_pending_age_seconds",
        "meshline_dead_letters_total",
        "meshline_circuit_breaker_open",
        "meshline_ticket_sink_failing",
        // Worker: the operating model's measures, from the ledger.
        "meshline_flow_record_mttr_seconds",
        "meshline_flow_ticket_time_to_resolve_seconds",
        "meshline_ticket_time_to_resolve_seconds",
        "meshline_flow_failure_rate_sla_window",
        "meshline_flow_manual_interventions_per_1k",
        "meshline_sla_max_failure_rate",
        // Controller: per flow.
        "meshline_flow_sla_breached",
        "meshline_flow_sla_breaches_total",
        "meshline_flow_contract_change_duration_seconds_bucket",
        "meshline_flow_contract_change_last_duration_seconds",
        "meshline_flow_canary_weight",
        "meshline_flow_audit_unexplained",
        "meshline_controller_reconciles_total",
    ] {
        assert!(
            exported.contains(name),
            "{name} not exported; exported: {exported:#?}"
        );
    }
}

#[test]
fn a_panel_querying_a_metric_nobody_exports_fails() {
    let dashboard = serde_json::json!({
        "panels": [{"type": "row", "title": "r", "panels": [{
            "title": "Throughput",
            "targets": [{"refId": "A", "expr": "sum(rate(meshline_records_recieved_total{flow=\"$flow\"}[5m]))"}]
        }]}],
        "templating": {"list": []}
    });
    let problems = unexported(&dashboard_queries("test.json", &dashboard), &exported());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("panel \"Throughput\"")
            && problems[0].contains("meshline_records_recieved_total"),
        "{problems:?}"
    );
}

#[test]
fn a_counter_queried_without_its_total_suffix_fails() {
    let queries = [Query {
        place: "test".into(),
        expr: "rate(meshline_records_delivered[5m])".into(),
    }];
    assert_eq!(unexported(&queries, &exported()).len(), 1);
    let queries = [Query {
        place: "test".into(),
        expr: "histogram_quantile(0.9, sum by (le) (rate(meshline_delivery_duration_seconds[5m])))"
            .into(),
    }];
    assert_eq!(
        unexported(&queries, &exported()).len(),
        1,
        "a histogram is queried by its _bucket series"
    );
}

#[test]
fn a_variable_querying_a_metric_nobody_exports_fails() {
    let dashboard = serde_json::json!({
        "panels": [],
        "templating": {"list": [{"name": "flow", "type": "query",
            "query": {"query": "label_values(meshline_flows_received_total{namespace=\"$namespace\"}, flow)"}}]}
    });
    let problems = unexported(&dashboard_queries("test.json", &dashboard), &exported());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("meshline_flows_received_total"),
        "{problems:?}"
    );
}

#[test]
fn an_alert_expr_split_over_lines_is_refused_rather_than_skipped() {
    let template = "        - alert: A\n          expr: >\n            up == 0\n";
    let err = rule_queries("rules.yaml", template).expect_err("a multi-line expr");
    assert!(
        err.contains("rules.yaml:2: alert A: write the expr on one line"),
        "{err}"
    );
}

fn names(expr: &str) -> Vec<String> {
    metric_names(expr)
        .unwrap_or_else(|e| panic!("{expr}: {e}"))
        .into_iter()
        .collect()
}

#[test]
fn the_tokenizer_finds_metric_names_and_nothing_else() {
    assert_eq!(names("up"), ["up"]);
    assert_eq!(
        names(r#"sum by (reason, flow) (increase(a_total{flow="$flow",x=~"b|c"}[1h] offset 5m))"#),
        ["a_total"]
    );
    assert_eq!(
        names("max without (pod) (a) / on (namespace, flow) group_left (owner) b > bool 0.5"),
        ["a", "b"]
    );
    assert_eq!(
        names("histogram_quantile(0.9, sum by (le) (rate(h_bucket[$__rate_interval])))"),
        ["h_bucket"]
    );
    assert_eq!(
        names("time() - max(c) > 172800 and d unless e or f"),
        ["c", "d", "e", "f"]
    );
    // A metric named like a keyword's prefix, a recording rule's colons, a string with braces in it.
    assert_eq!(
        names(r#"bytes_total + job:rate5m + g{l="}{ by (x)"} * 1e3"#),
        ["bytes_total", "g", "job:rate5m"]
    );
    assert_eq!(names(r#"{__name__="x"}"#), Vec::<String>::new());
    assert_eq!(names("sum(rate(m[5m:1m]))"), ["m"]);
    assert_eq!(names("topk(3, m) > ${threshold}"), ["m"]);
}

#[test]
fn the_tokenizer_refuses_unbalanced_queries() {
    for bad in [r#"m{l="x""#, "rate(m[5m)", r#"m{l="x}"#, "m}"] {
        assert!(metric_names(bad).is_err(), "{bad} was read");
    }
}

#[test]
fn grafana_label_values_keeps_only_the_selector() {
    assert_eq!(
        grafana_variable_query(r#"label_values(m{a="1",b="2"}, flow)"#),
        r#"m{a="1",b="2"}"#
    );
    assert_eq!(grafana_variable_query("label_values(flow)"), "");
    assert_eq!(grafana_variable_query("max(m)"), "max(m)");
}

/// The (family, type) rows of one `## section` table of docs/metrics.md.
fn documented(doc: &str, section: &str) -> BTreeSet<(String, String)> {
    let heading = format!("## {section}\n");
    let start = doc
        .find(&heading)
        .unwrap_or_else(|| panic!("docs/metrics.md has no section {section:?}"));
    let body = &doc[start + heading.len()..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    body.lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let series = cells[1].split('`').nth(1).unwrap_or_default();
            let kind = cells[2].to_string();
            let family = match kind.as_str() {
                "counter" => series.strip_suffix("_total"),
                "histogram" => series.strip_suffix("_bucket"),
                _ => Some(series),
            }
            .unwrap_or_else(|| panic!("docs/metrics.md: {series} does not end as a {kind} does"));
            (family.to_string(), kind)
        })
        .collect()
}

#[test]
fn the_metrics_reference_lists_every_exported_family_with_its_type() {
    let doc = read(&repo().join("docs/metrics.md"));
    let (worker, controller) = registries();
    for (sections, catalogue) in [
        (&["Worker", "Reconciliation audit"][..], &worker.catalogue),
        (&["Controller"][..], &controller.catalogue),
    ] {
        let exported: BTreeSet<(String, String)> = catalogue
            .families()
            .iter()
            .map(|f| (f.name.clone(), f.kind.clone()))
            .collect();
        // The worker's audit gauges have a section of their own.
        let listed: BTreeSet<(String, String)> = sections
            .iter()
            .flat_map(|section| documented(&doc, section))
            .collect();
        let section = sections.join(" and ");
        let undocumented: Vec<_> = exported.difference(&listed).collect();
        let stale: Vec<_> = listed.difference(&exported).collect();
        assert!(
            undocumented.is_empty() && stale.is_empty(),
            "docs/metrics.md section {section}: exported but not listed (or under another type): \
             {undocumented:?}; listed but not exported: {stale:?}"
        );
    }
}

#[test]
fn worker_and_controller_never_export_the_same_name() {
    let (worker, controller) = registries();
    let worker: BTreeSet<&str> = worker
        .catalogue
        .families()
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    for f in controller.catalogue.families() {
        assert!(
            !worker.contains(f.name.as_str()),
            "{} is exported by both the worker and the controller",
            f.name
        );
    }
}
