//! DC/OS's authenticated HTTPS (strict and permissive modes): Admin Router
//! and the agents serve HTTPS with the cluster's CA and want
//! `Authorization: token=<service account token>`. The agent poller, broker
//! discovery and the sample-producer reach them through [`Credentials`]:
//! a CA file (`dcos_ca_file`) and a token, inline (`auth_credential`) or,
//! better, in a file (`auth_credential_file`) that is read at every
//! request, so that a token refreshed by whoever writes the file is used at
//! once.

use std::time::Duration;

use crate::config::ConfigError;
pub use crate::config::security::Credentials;
use crate::config::security::{read_pem, read_secret};

/// The User-Agent of every request.
pub const USER_AGENT: &str = concat!("metrics-collector/", env!("CARGO_PKG_VERSION"));

/// An error with its causes, `outer: inner: innermost`: reqwest's own
/// words ("error sending request") hide the TLS cause an operator needs
/// ("certificate verify failed", "hostname mismatch").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl Credentials {
    /// An HTTPS client that trusts the CA file too (beside the system's
    /// CAs), with `timeout` per request; `crate::http` makes it only where
    /// TLS is wanted (making it reads the system's CA bundle).
    pub(crate) fn http_client(&self, timeout: Duration) -> Result<reqwest::Client, ConfigError> {
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(timeout);
        if let Some(path) = &self.ca_file {
            let pem = read_pem("dcos_ca_file", path)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ConfigError::new("dcos_ca_file", format!("{}: {e}", path.display()))
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder
            .build()
            .map_err(|e| ConfigError::new("dcos_ca_file", e.to_string()))
    }

    /// The `Authorization` header's value, `token=<token>`, reading the
    /// token file now; `None` without a token.
    pub fn authorization(&self) -> Result<Option<String>, ConfigError> {
        let token = match (&self.token_file, &self.token) {
            (Some(path), _) => read_secret("auth_credential_file", path)?,
            (None, Some(token)) => token.0.clone(),
            (None, None) => return Ok(None),
        };
        Ok(Some(format!("token={token}")))
    }

    /// The `Authorization` header to send, reading the token file now:
    /// none without a token.
    pub fn authorization_header(
        &self,
    ) -> Result<Vec<(hyper::header::HeaderName, String)>, ConfigError> {
        Ok(self
            .authorization()?
            .map(|value| (hyper::header::AUTHORIZATION, value))
            .into_iter()
            .collect())
    }
}
