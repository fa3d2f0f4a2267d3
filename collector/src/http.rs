//! GETs to the agent and to the Kafka scheduler, with a deadline and a
//! bounded body.
//!
//! Plain `http://` goes through hyper alone: no TLS context is made, so
//! OpenSSL never reads the system's CA bundle (5 MiB more resident in an
//! idle collector polling its agent, `BENCHMARKS.md` section 1) on a node
//! whose agent and scheduler speak plain HTTP, as they do outside DC/OS's
//! strict mode. A URL with a user and password goes through reqwest too,
//! which sends them as Basic authentication. `https://`, or a DC/OS CA
//! file configured, goes through reqwest and the system's OpenSSL,
//! trusting that CA beside the system's. Plain HTTP follows no redirect
//! and goes through no proxy (`HTTP_PROXY`): the agent and the scheduler
//! are on the cluster's own network.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{HeaderName, HeaderValue, USER_AGENT};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::config::ConfigError;
use crate::dcos::Credentials;

/// Why a GET failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// No whole answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A redirect, which is not followed.
    #[error(
        "answered HTTP {status}, a redirect to {location:?}, which is not followed: configure the URL it names"
    )]
    Redirected {
        /// The status.
        status: u16,
        /// Where it points (its `Location`).
        location: String,
    },
    /// The URL can't be asked with this client.
    #[error("{0}")]
    BadUrl(String),
    /// The connection or the request failed: the error and its causes.
    #[error("{0}")]
    Failed(String),
}

/// A client for URLs under one base.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Inner,
    timeout: Duration,
}

#[derive(Debug, Clone)]
enum Inner {
    // Boxed: one client per agent or scheduler, made once.
    Plain(Box<Client<HttpConnector, Empty<Bytes>>>),
    Tls(reqwest::Client),
}

impl HttpClient {
    /// A client for URLs under `base`, each GET answered whole within
    /// `timeout`: over TLS only when `base` is `https://` or `credentials`
    /// name a CA file (a CA file that can't be read is an error naming
    /// `dcos_ca_file`).
    pub fn new(
        base: &str,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<Self, ConfigError> {
        let tls = credentials.ca_file.is_some() || !is_plain(base);
        let inner = if tls {
            Inner::Tls(credentials.http_client(timeout)?)
        } else {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(timeout));
            Inner::Plain(Box::new(
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .pool_max_idle_per_host(1)
                    .build(connector),
            ))
        };
        Ok(Self { inner, timeout })
    }

    /// Whether requests go over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }

    /// GETs `url` with `headers`; the answer's head and its body come
    /// within the client's timeout, or [`HttpError::Timeout`].
    pub async fn get(
        &self,
        url: &str,
        headers: &[(HeaderName, String)],
    ) -> Result<Response, HttpError> {
        let deadline = Instant::now() + self.timeout;
        let timeout = self.timeout;
        let body = match &self.inner {
            Inner::Plain(client) => {
                // Parsed as reqwest would (normalised): hyper takes the
                // URL as it is written.
                let Some(url) = plain_url(url) else {
                    return Err(HttpError::BadUrl(format!(
                        "{url}: only http:// URLs without a user or password are asked without TLS"
                    )));
                };
                let mut request = hyper::Request::get(url.as_str())
                    .header(USER_AGENT, crate::dcos::USER_AGENT)
                    .body(Empty::new())
                    .map_err(|e| HttpError::BadUrl(format!("{url}: {e}")))?;
                for (name, value) in headers {
                    let value = HeaderValue::from_str(value)
                        .map_err(|e| HttpError::BadUrl(format!("{url}: header {name}: {e}")))?;
                    request.headers_mut().insert(name, value);
                }
                let response = tokio::time::timeout_at(deadline, client.request(request))
                    .await
                    .map_err(|_| HttpError::Timeout(timeout))?
                    .map_err(|e| HttpError::Failed(crate::dcos::error_chain(&e)))?;
                Body::Plain(response)
            }
            Inner::Tls(client) => {
                let mut request = client.get(url);
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                let response = request
                    .send()
                    .await
                    .map_err(|e| reqwest_error(&e, timeout))?;
                Body::Tls(response)
            }
        };
        let response = Response {
            body,
            deadline,
            timeout,
        };
        let status = response.status();
        if (300..400).contains(&status) {
            return Err(HttpError::Redirected {
                status,
                location: response.location().unwrap_or_default(),
            });
        }
        Ok(response)
    }
}

/// `url`, normalised, when it is plain HTTP with no user or password.
fn plain_url(url: &str) -> Option<reqwest::Url> {
    reqwest::Url::parse(url).ok().filter(|url| {
        url.scheme() == "http" && url.username().is_empty() && url.password().is_none()
    })
}

/// Whether `url` can be asked without TLS.
fn is_plain(url: &str) -> bool {
    plain_url(url).is_some()
}

fn reqwest_error(error: &reqwest::Error, timeout: Duration) -> HttpError {
    if error.is_timeout() {
        HttpError::Timeout(timeout)
    } else {
        HttpError::Failed(crate::dcos::error_chain(error))
    }
}

/// An answer whose body is read a chunk at a time.
#[derive(Debug)]
pub struct Response {
    body: Body,
    deadline: Instant,
    timeout: Duration,
}

#[derive(Debug)]
enum Body {
    Plain(hyper::Response<hyper::body::Incoming>),
    Tls(reqwest::Response),
}

impl Response {
    /// The status code.
    pub fn status(&self) -> u16 {
        match &self.body {
            Body::Plain(response) => response.status().as_u16(),
            Body::Tls(response) => response.status().as_u16(),
        }
    }

    /// Its `Location` header, if any.
    pub fn location(&self) -> Option<String> {
        let headers = match &self.body {
            Body::Plain(response) => response.headers(),
            Body::Tls(response) => response.headers(),
        };
        headers
            .get(hyper::header::LOCATION)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    }

    /// The length the answer declares, if any.
    pub fn content_length(&self) -> Option<u64> {
        match &self.body {
            Body::Plain(response) => hyper::body::Body::size_hint(response.body()).exact(),
            Body::Tls(response) => response.content_length(),
        }
    }

    /// The body's next chunk; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, HttpError> {
        let timeout = self.timeout;
        match &mut self.body {
            Body::Plain(response) => loop {
                let frame = tokio::time::timeout_at(self.deadline, response.body_mut().frame())
                    .await
                    .map_err(|_| HttpError::Timeout(timeout))?;
                match frame {
                    None => return Ok(None),
                    Some(Err(error)) => {
                        return Err(HttpError::Failed(crate::dcos::error_chain(&error)));
                    }
                    // Trailers carry no body.
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            return Ok(Some(data));
                        }
                    }
                }
            },
            Body::Tls(response) => response
                .chunk()
                .await
                .map_err(|e| reqwest_error(&e, timeout)),
        }
    }

    /// The whole body, refused past `max` bytes: `Ok(None)`.
    pub async fn bytes_within(&mut self, max: usize) -> Result<Option<Vec<u8>>, HttpError> {
        if self.content_length().is_some_and(|len| len > max as u64) {
            return Ok(None);
        }
        let mut body = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            if body.len() + chunk.len() > max {
                return Ok(None);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_only_for_https_or_a_ca_file() {
        let none = Credentials::default();
        let timeout = Duration::from_secs(1);
        for (base, tls) in [
            ("http://10.0.0.5:5051", false),
            ("HTTP://agent:5051", false),
            ("https://10.0.0.5:5051", true),
            ("httpx://weird", true),
            // reqwest sends these as Basic authentication.
            ("http://user:secret@agent:5051", true),
            ("not a url", true),
        ] {
            assert_eq!(
                HttpClient::new(base, &none, timeout).unwrap().is_tls(),
                tls,
                "{base}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let missing = Credentials {
            ca_file: Some(dir.path().join("absent.pem")),
            ..Credentials::default()
        };
        let error = HttpClient::new("http://agent:5051", &missing, timeout).unwrap_err();
        assert!(error.to_string().contains("dcos_ca_file"), "{error}");
    }

    /// A server that answers each request with `answer` (each request is
    /// one read: hyper writes a GET's head at once), holding its
    /// connection open.
    async fn server(answer: &'static str) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = [0u8; 4096];
                    while stream.read(&mut head).await.is_ok_and(|n| n > 0) {
                        let _ = stream.write_all(answer.as_bytes()).await;
                    }
                });
            }
        });
        addr
    }

    /// A plain client with `timeout`, and the URL of a [`server`] answering
    /// `answer`.
    async fn against(answer: &'static str, timeout: Duration) -> (HttpClient, String) {
        let url = format!("http://{}/state", server(answer).await);
        let client = HttpClient::new(&url, &Credentials::default(), timeout).unwrap();
        (client, url)
    }

    #[tokio::test]
    async fn a_body_that_stalls_after_the_head_times_out_within_the_deadline() {
        let (client, url) = against(
            "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"partial\":",
            Duration::from_millis(300),
        )
        .await;
        let mut response = client.get(&url, &[]).await.unwrap();
        assert_eq!(response.status(), 200);
        // The server holds the connection open: only the deadline ends it
        // (the outer bound only keeps a broken deadline from hanging).
        let error = tokio::time::timeout(Duration::from_secs(60), response.bytes_within(1 << 20))
            .await
            .expect("the deadline ends the read")
            .unwrap_err();
        assert_eq!(error, HttpError::Timeout(Duration::from_millis(300)));
    }

    #[tokio::test]
    async fn a_chunked_body_past_the_bound_is_refused_not_held() {
        // No declared length: the bound is found while reading.
        let (client, url) = against(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\n01234567\r\n8\r\n89abcdef\r\n0\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        let mut response = client.get(&url, &[]).await.unwrap();
        assert_eq!(response.content_length(), None);
        assert_eq!(response.bytes_within(12).await.unwrap(), None);
        let mut response = client.get(&url, &[]).await.unwrap();
        assert_eq!(
            response.bytes_within(16).await.unwrap().as_deref(),
            Some(&b"0123456789abcdef"[..])
        );
    }

    #[tokio::test]
    async fn a_redirect_is_an_error_naming_where_it_points() {
        let (client, url) = against(
            "HTTP/1.1 301 Moved Permanently\r\nlocation: https://agent:5051/state\r\ncontent-length: 0\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        let error = client.get(&url, &[]).await.unwrap_err();
        assert_eq!(
            error,
            HttpError::Redirected {
                status: 301,
                location: "https://agent:5051/state".into()
            }
        );
        assert!(
            error.to_string().contains("https://agent:5051/state"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_plain_client_refuses_an_https_url_rather_than_send_it_in_the_clear() {
        let client = HttpClient::new(
            "http://127.0.0.1:1",
            &Credentials::default(),
            Duration::from_secs(1),
        )
        .unwrap();
        let error = client
            .get("https://127.0.0.1:1/state", &[])
            .await
            .unwrap_err();
        assert!(matches!(error, HttpError::BadUrl(_)), "{error}");
    }
}
