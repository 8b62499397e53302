//! CRM sources: signed webhooks (generic HMAC-SHA256, HubSpot v3) and the Salesforce REST query poller.
//! Each hands records to an [`Intake`](super::Intake) and acknowledges only after it returned.
