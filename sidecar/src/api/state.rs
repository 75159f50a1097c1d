//! What the API handlers and the logoff path share: the configuration, the
//! operations, the metrics.

use crate::{config::Config, metrics::Metrics, snapshot::session::Sessions};

pub struct AppState {
    pub config: Config,
    pub sessions: Sessions,
    pub metrics: Metrics,
    /// The bearer token the API requires, when one is configured.
    pub token: Option<String>,
}
