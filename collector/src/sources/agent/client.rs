//! HTTP client for the agent's endpoints on port 5051: `/monitor/statistics.json`
//! (falling back to `/monitor/statistics`), `/containers`, `/state` and
//! `/metrics/snapshot`. Bodies are parsed tolerantly: a bare `NaN` or
//! `Infinity` (which some encoders write) doesn't fail the whole body.
//! Every failure is a typed error naming the URL; nothing here panics.

use std::time::Duration;

use serde_json::Value;

use crate::dcos::Credentials;
use crate::http::{HttpClient, HttpError};

/// Why an agent request failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent URL is not a URL.
    #[error("invalid agent URL {0:?}")]
    BadUrl(String),
    /// Connecting or reading failed.
    #[error("agent {url} unreachable: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// The transport error.
        reason: String,
    },
    /// No answer within the timeout.
    #[error("agent {url} did not answer within {timeout:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The timeout.
        timeout: Duration,
    },
    /// HTTP 401: the credential is missing or wrong.
    #[error("agent {url} refused the request: 401 Unauthorized (check the auth credential)")]
    Unauthorized {
        /// The URL.
        url: String,
    },
    /// Another error status.
    #[error("agent {url} answered HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// The body is larger than the limit (`agent_max_body_bytes`).
    #[error(
        "agent {url} answered more than {limit} bytes (the agent_max_body_bytes limit); the answer was refused"
    )]
    TooLarge {
        /// The URL.
        url: String,
        /// The limit.
        limit: usize,
    },
    /// The body is not the JSON expected.
    #[error("agent {url} answered malformed JSON: {reason}")]
    Malformed {
        /// The URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

impl AgentError {
    /// A short label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            AgentError::BadUrl(_) => "bad_url",
            AgentError::Unreachable { .. } => "unreachable",
            AgentError::Timeout { .. } => "timeout",
            AgentError::Unauthorized { .. } => "unauthorized",
            AgentError::Status { .. } => "status",
            AgentError::TooLarge { .. } => "too_large",
            AgentError::Malformed { .. } => "malformed",
        }
    }
}

/// A client for one agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    http: HttpClient,
    base: String,
    credentials: Credentials,
    timeout: Duration,
    max_body: usize,
}

/// Parses an agent body tolerantly.
pub fn parse_body(url: &str, body: &str) -> Result<Value, AgentError> {
    serde_json::from_str(&super::mapping::tolerate_non_finite(body)).map_err(|e| {
        AgentError::Malformed {
            url: url.to_owned(),
            reason: e.to_string(),
        }
    })
}

impl AgentClient {
    /// A client for `base_url` (e.g. `http://10.0.0.5:5051`, or `https://`
    /// with the CA of `credentials`). The token of `credentials` is sent as
    /// `Authorization: token=<token>`, like the original's
    /// `-auth-credential`. A body larger than `max_body` bytes is refused,
    /// never held.
    pub fn new(
        base_url: &str,
        credentials: Credentials,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Self, AgentError> {
        let base = base_url.trim_end_matches('/').to_owned();
        if reqwest::Url::parse(&base).is_err() {
            return Err(AgentError::BadUrl(base_url.to_owned()));
        }
        let http =
            HttpClient::new(&base, &credentials, timeout).map_err(|e| AgentError::Unreachable {
                url: base.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            http,
            base,
            credentials,
            timeout,
            max_body,
        })
    }

    /// The agent's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn get(&self, path: &str) -> Result<(u16, String), AgentError> {
        let url = format!("{}{path}", self.base);
        let headers =
            self.credentials
                .authorization_header()
                .map_err(|e| AgentError::Unreachable {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
        let failed = |e: HttpError| match e {
            HttpError::Timeout(_) => AgentError::Timeout {
                url: url.clone(),
                timeout: self.timeout,
            },
            e => AgentError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            },
        };
        let mut response = self.http.get(&url, &headers).await.map_err(failed)?;
        let status = response.status();
        let Some(body) = response.bytes_within(self.max_body).await.map_err(failed)? else {
            return Err(AgentError::TooLarge {
                url: url.clone(),
                limit: self.max_body,
            });
        };
        let body = String::from_utf8(body).map_err(|e| AgentError::Malformed {
            url: url.clone(),
            reason: format!("not UTF-8: {e}"),
        })?;
        Ok((status, body))
    }

    /// The body of a 200 answer, as text.
    async fn get_text(&self, path: &str) -> Result<(String, String), AgentError> {
        let url = format!("{}{path}", self.base);
        let (status, body) = self.get(path).await?;
        match status {
            200 => Ok((url, body)),
            401 => Err(AgentError::Unauthorized { url }),
            status => Err(AgentError::Status { url, status }),
        }
    }

    async fn get_json(&self, path: &str) -> Result<Value, AgentError> {
        let (url, body) = self.get_text(path).await?;
        parse_body(&url, &body)
    }

    /// Maps an entries body (see `mapping::map_entries_text`) as it is
    /// parsed, never holding its whole JSON tree.
    async fn get_entries(
        &self,
        path: &str,
        naming: super::mapping::Naming<'_>,
        now_ms: i64,
    ) -> Result<super::mapping::Mapped, AgentError> {
        let (url, body) = self.get_text(path).await?;
        super::mapping::map_entries_text(&body, naming, now_ms)
            .map_err(|reason| AgentError::Malformed { url, reason })
    }

    /// `/monitor/statistics.json` (or `/monitor/statistics`), mapped.
    pub async fn statistics_mapped(
        &self,
        naming: super::mapping::Naming<'_>,
        now_ms: i64,
    ) -> Result<super::mapping::Mapped, AgentError> {
        match self
            .get_entries("/monitor/statistics.json", naming, now_ms)
            .await
        {
            Err(AgentError::Status { status: 404, .. }) => {
                self.get_entries("/monitor/statistics", naming, now_ms)
                    .await
            }
            other => other,
        }
    }

    /// `/containers`, mapped.
    pub async fn containers_mapped(
        &self,
        naming: super::mapping::Naming<'_>,
        now_ms: i64,
    ) -> Result<super::mapping::Mapped, AgentError> {
        self.get_entries("/containers", naming, now_ms).await
    }

    /// `/monitor/statistics.json`, falling back to `/monitor/statistics`
    /// (the `.json` route is gone from Mesos 1.9).
    pub async fn statistics(&self) -> Result<Value, AgentError> {
        match self.get_json("/monitor/statistics.json").await {
            Err(AgentError::Status { status: 404, .. }) => {
                self.get_json("/monitor/statistics").await
            }
            other => other,
        }
    }

    /// `/containers`.
    pub async fn containers(&self) -> Result<Value, AgentError> {
        self.get_json("/containers").await
    }

    /// `/state`.
    pub async fn state(&self) -> Result<Value, AgentError> {
        self.get_json("/state").await
    }

    /// `/metrics/snapshot`.
    pub async fn snapshot(&self) -> Result<Value, AgentError> {
        self.get_json("/metrics/snapshot").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_non_finite_numbers_become_strings_outside_strings_only() {
        let body =
            r#"{"a": NaN, "b": [Infinity, -Infinity], "c": "NaN in a string", "d": "x\"NaN"}"#;
        let value: Value =
            serde_json::from_str(&crate::sources::agent::mapping::tolerate_non_finite(body))
                .unwrap();
        assert_eq!(value["a"], "NaN");
        assert_eq!(value["b"][1], "-Infinity");
        assert_eq!(value["c"], "NaN in a string");
        assert_eq!(value["d"], "x\"NaN");
    }

    #[test]
    fn bad_urls_are_errors() {
        assert!(matches!(
            AgentClient::new(
                "not a url",
                Credentials::default(),
                Duration::from_secs(1),
                1 << 20,
            ),
            Err(AgentError::BadUrl(_))
        ));
    }
}
