//! The catalogue of what a process exports to Prometheus: every metric family registered in the worker's or
//! the controller's registry, by the name Prometheus stores and its type. A registry's exposition shows a
//! family only once it has a series (a labelled family nobody touched yet is invisible), so the catalogue is
//! what tests and docs read to know the stable names, e.g. that the chart's dashboard and alerts query only
//! metrics the code exports. It owns no values and does no I/O.

use prometheus_client::metrics::TypedMetric;
use prometheus_client::registry::{Metric, Registry};

/// One registered metric family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportedFamily {
    /// The family's full name, prefix included, without the suffixes the exposition adds.
    pub name: String,
    /// `counter`, `gauge`, `histogram`, `info` or `unknown`.
    pub kind: String,
    pub help: String,
}

impl ExportedFamily {
    /// The series names Prometheus stores for the family: a counter as `_total`, a histogram as `_bucket`,
    /// `_sum` and `_count`, an info as `_info`, a gauge as is.
    pub fn series(&self) -> Vec<String> {
        let suffixes: &[&str] = match self.kind.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        suffixes
            .iter()
            .map(|s| format!("{}{s}", self.name))
            .collect()
    }
}

/// The families registered so far (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct Catalogue(Vec<ExportedFamily>);

impl Catalogue {
    /// Registers `metric` as `name` in `registry`, whose prefix is `prefix`, and records it.
    pub fn register<M: Metric + TypedMetric>(
        &mut self,
        registry: &mut Registry,
        prefix: &str,
        name: &str,
        help: &str,
        metric: M,
    ) {
        self.0.push(ExportedFamily {
            name: format!("{prefix}_{name}"),
            kind: M::TYPE.as_str().to_string(),
            help: help.to_string(),
        });
        registry.register(name, help, metric);
    }

    pub fn families(&self) -> &[ExportedFamily] {
        &self.0
    }
}
