//! ERP sinks: NetSuite's REST record service, Odoo's JSON-RPC API, generic HTTP JSON and a PostgreSQL table.
//! Each delivers by upsert keyed by the contract's external id, so a retried delivery never duplicates.
