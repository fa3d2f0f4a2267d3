//! Kafka security: TLS and SASL for every librdkafka client the project
//! makes (the collector's sink and topic admin, and the sample-producer).
//!
//! The settings are options like any other (declared in `options.rs`);
//! [`KafkaSecurity`] is their view. It checks how they fit together and the
//! files they name ([`KafkaSecurity::check`]: readable, PEM that parses, a
//! key that matches its certificate, a certificate in its validity period),
//! and sets them on a client configuration ([`KafkaSecurity::apply`]),
//! reading the secret files each time a client is made, so that a reload
//! (SIGHUP, `POST /v1/kafka/reload`) picks up rotated secrets.

use std::fmt;
use std::path::{Path, PathBuf};

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use super::{Config, ConfigError};

/// librdkafka's `security.protocol`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS, no authentication (the original's only choice).
    #[default]
    Plaintext,
    /// TLS, with a client certificate for mutual TLS if one is given.
    Ssl,
    /// SASL authentication without TLS.
    SaslPlaintext,
    /// SASL authentication over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// Whether connections use TLS.
    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    /// Whether connections authenticate with SASL.
    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    /// The option's value, as librdkafka and the configuration spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }
}

/// librdkafka's `sasl.mechanism` (GSSAPI only with the `gssapi` feature,
/// through `librdkafka` pass-through options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
pub enum SaslMechanism {
    /// Username and password in the clear (use it over TLS only).
    #[serde(rename = "PLAIN")]
    #[value(name = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The name librdkafka and Kafka use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A password given inline: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(super::REDACTED)
    }
}

/// The security settings of the Kafka clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSecurity {
    /// `kafka_security_protocol`.
    pub protocol: SecurityProtocol,
    /// `kafka_ssl_ca_file`.
    pub ca_file: Option<PathBuf>,
    /// `kafka_ssl_certificate_file`.
    pub certificate_file: Option<PathBuf>,
    /// `kafka_ssl_key_file`.
    pub key_file: Option<PathBuf>,
    /// `kafka_ssl_key_password_file`.
    pub key_password_file: Option<PathBuf>,
    /// `kafka_ssl_verify_hostname`.
    pub verify_hostname: bool,
    /// `kafka_sasl_mechanism`.
    pub mechanism: Option<SaslMechanism>,
    /// `kafka_sasl_username`.
    pub username: Option<String>,
    /// `kafka_sasl_password_file`.
    pub password_file: Option<PathBuf>,
    /// `kafka_sasl_password`.
    pub password: Option<Secret>,
}

impl Default for KafkaSecurity {
    fn default() -> Self {
        Self::from(&Config::default())
    }
}

impl From<&Config> for KafkaSecurity {
    fn from(config: &Config) -> Self {
        Self {
            protocol: config.kafka_security_protocol,
            ca_file: config.kafka_ssl_ca_file.clone(),
            certificate_file: config.kafka_ssl_certificate_file.clone(),
            key_file: config.kafka_ssl_key_file.clone(),
            key_password_file: config.kafka_ssl_key_password_file.clone(),
            verify_hostname: config.kafka_ssl_verify_hostname,
            mechanism: config.kafka_sasl_mechanism,
            username: config.kafka_sasl_username.clone(),
            password_file: config.kafka_sasl_password_file.clone(),
            password: config.kafka_sasl_password.clone().map(Secret),
        }
    }
}

/// How to reach DC/OS's HTTPS endpoints (the agent, the Kafka scheduler
/// through Admin Router): the settings; `crate::dcos` makes the HTTP
/// client and the `Authorization` header from them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// `dcos_ca_file`: CA certificates the servers' certificates chain to.
    pub ca_file: Option<PathBuf>,
    /// `auth_credential_file`: the token, read at every request.
    pub token_file: Option<PathBuf>,
    /// `auth_credential`: the token itself.
    pub token: Option<Secret>,
}

impl From<&Config> for Credentials {
    fn from(config: &Config) -> Self {
        Self {
            ca_file: config.dcos_ca_file.clone(),
            token_file: config.auth_credential_file.clone(),
            token: config.auth_credential.clone().map(Secret),
        }
    }
}

impl Credentials {
    /// Checks the files: the CA file holds PEM certificates, the token file
    /// is readable and not empty, and the token is given one way only.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.token.is_some() && self.token_file.is_some() {
            return Err(ConfigError::new(
                "auth_credential",
                "set only one of auth_credential_file and auth_credential",
            ));
        }
        if let Some(path) = &self.ca_file {
            parse_certificates("dcos_ca_file", path)?;
        }
        if let Some(path) = &self.token_file {
            read_secret("auth_credential_file", path)?;
        }
        Ok(())
    }
}

/// The options [`KafkaSecurity`] is made of, by file key.
pub const SECURITY_OPTIONS: &[&str] = &[
    "kafka_security_protocol",
    "kafka_ssl_ca_file",
    "kafka_ssl_certificate_file",
    "kafka_ssl_key_file",
    "kafka_ssl_key_password_file",
    "kafka_ssl_verify_hostname",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password_file",
    "kafka_sasl_password",
];

/// The largest secret file read.
const MAX_SECRET_BYTES: u64 = 64 * 1024;
/// The largest certificate or key file read.
const MAX_PEM_BYTES: u64 = 4 * 1024 * 1024;

/// Reads a certificate or key file (PEM, at most 4 MiB); errors name
/// `field` and the file.
pub(crate) fn read_pem(field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    read_file(field, path, MAX_PEM_BYTES)
}

fn read_file(field: &str, path: &Path, max: u64) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| ConfigError::new(field, format!("{}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ConfigError::new(field, format!("{}: {e}", path.display())))?;
    if bytes.len() as u64 > max {
        return Err(ConfigError::new(
            field,
            format!("{}: larger than {max} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

/// Reads a secret from a file: one line of UTF-8, its line ending dropped
/// (as `echo` or a DC/OS secret writes it). The error names `field` and the
/// file, never the content.
pub fn read_secret(field: &str, path: &Path) -> Result<String, ConfigError> {
    let bytes = read_file(field, path, MAX_SECRET_BYTES)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| ConfigError::new(field, format!("{}: not UTF-8 text", path.display())))?;
    let secret = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if secret.is_empty() {
        return Err(ConfigError::new(
            field,
            format!("{}: is empty", path.display()),
        ));
    }
    if secret.contains(['\n', '\0']) {
        return Err(ConfigError::new(
            field,
            format!("{}: holds more than one line", path.display()),
        ));
    }
    Ok(secret.to_owned())
}

/// Seconds since the Unix epoch, as OpenSSL's time.
fn asn1_now() -> Result<openssl::asn1::Asn1Time, ConfigError> {
    openssl::asn1::Asn1Time::days_from_now(0)
        .map_err(|e| ConfigError::new("kafka_ssl_certificate_file", e.to_string()))
}

/// Checks that `cert` is within its validity period; the error says which
/// end it is past.
fn check_validity(
    field: &str,
    path: &Path,
    cert: &openssl::x509::X509Ref,
) -> Result<(), ConfigError> {
    let now = asn1_now()?;
    if cert.not_after() < now {
        return Err(ConfigError::new(
            field,
            format!(
                "{}: the certificate {} expired on {}",
                path.display(),
                subject(cert),
                cert.not_after()
            ),
        ));
    }
    if cert.not_before() > now {
        return Err(ConfigError::new(
            field,
            format!(
                "{}: the certificate {} is not valid before {}",
                path.display(),
                subject(cert),
                cert.not_before()
            ),
        ));
    }
    Ok(())
}

/// A certificate's subject, for messages.
fn subject(cert: &openssl::x509::X509Ref) -> String {
    let names: Vec<String> = cert
        .subject_name()
        .entries()
        .filter_map(|entry| {
            let key = entry.object().nid().short_name().ok()?;
            let value = entry.data().to_string().ok()?;
            Some(format!("{key}={value}"))
        })
        .collect();
    format!("\"{}\"", names.join(", "))
}

pub(crate) fn parse_certificates(
    field: &str,
    path: &Path,
) -> Result<Vec<openssl::x509::X509>, ConfigError> {
    let pem = read_pem(field, path)?;
    let certs = openssl::x509::X509::stack_from_pem(&pem).map_err(|e| {
        ConfigError::new(
            field,
            format!("{}: not PEM certificates: {e}", path.display()),
        )
    })?;
    if certs.is_empty() {
        return Err(ConfigError::new(
            field,
            format!("{}: holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

impl KafkaSecurity {
    /// Checks how the settings fit together and the files they name: every
    /// file is readable; the CA file and the certificate are PEM
    /// certificates in their validity period; the key parses (with its
    /// password) and matches the certificate; a SASL password is given one
    /// way, and is not empty. Each error names its option.
    pub fn check(&self) -> Result<(), ConfigError> {
        let protocol = self.protocol.as_str();
        // Settings the protocol does not use are a mistake, named.
        let unused =
            |used: bool, settings: &[(&str, bool)], what: &str, protocols: &str| match settings
                .iter()
                .find(|(_, set)| !used && *set)
            {
                Some((field, _)) => Err(ConfigError::new(
                    field,
                    format!(
                        "is set, but kafka_security_protocol = {protocol} does not use {what}: \
                         set kafka_security_protocol to {protocols}"
                    ),
                )),
                None => Ok(()),
            };
        unused(
            self.protocol.uses_tls(),
            &[
                ("kafka_ssl_ca_file", self.ca_file.is_some()),
                (
                    "kafka_ssl_certificate_file",
                    self.certificate_file.is_some(),
                ),
                ("kafka_ssl_key_file", self.key_file.is_some()),
                (
                    "kafka_ssl_key_password_file",
                    self.key_password_file.is_some(),
                ),
            ],
            "TLS",
            "ssl or sasl_ssl",
        )?;
        unused(
            self.protocol.uses_sasl(),
            &[
                ("kafka_sasl_mechanism", self.mechanism.is_some()),
                ("kafka_sasl_username", self.username.is_some()),
                ("kafka_sasl_password_file", self.password_file.is_some()),
                ("kafka_sasl_password", self.password.is_some()),
            ],
            "SASL",
            "sasl_plaintext or sasl_ssl",
        )?;
        if self.protocol.uses_sasl() {
            if self.mechanism.is_none() {
                return Err(ConfigError::new(
                    "kafka_sasl_mechanism",
                    format!(
                        "kafka_security_protocol = {protocol} needs a mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
                    ),
                ));
            }
            if self.username.as_deref().is_none_or(str::is_empty) {
                return Err(ConfigError::new(
                    "kafka_sasl_username",
                    format!("kafka_security_protocol = {protocol} needs a username"),
                ));
            }
            match (&self.password_file, &self.password) {
                (None, None) => {
                    return Err(ConfigError::new(
                        "kafka_sasl_password_file",
                        format!(
                            "kafka_security_protocol = {protocol} needs a password: \
                             set kafka_sasl_password_file (or kafka_sasl_password)"
                        ),
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        "kafka_sasl_password",
                        "set only one of kafka_sasl_password_file and kafka_sasl_password",
                    ));
                }
                (Some(path), None) => {
                    read_secret("kafka_sasl_password_file", path)?;
                }
                (None, Some(password)) => {
                    if password.0.is_empty() {
                        return Err(ConfigError::new("kafka_sasl_password", "is empty"));
                    }
                }
            }
        }
        if self.protocol.uses_tls() {
            self.check_tls_files()?;
        }
        Ok(())
    }

    fn check_tls_files(&self) -> Result<(), ConfigError> {
        if let Some(path) = &self.ca_file {
            let field = "kafka_ssl_ca_file";
            let certs = parse_certificates(field, path)?;
            // A bundle may hold an expired certificate among good ones; all
            // of them expired is a mistake.
            let mut last = Ok(());
            if certs.iter().all(|cert| {
                last = check_validity(field, path, cert);
                last.is_err()
            }) {
                last?;
            }
        }
        match (&self.certificate_file, &self.key_file) {
            (None, None) => {
                if self.key_password_file.is_some() {
                    return Err(ConfigError::new(
                        "kafka_ssl_key_password_file",
                        "is set without kafka_ssl_key_file",
                    ));
                }
            }
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "kafka_ssl_key_file",
                    "kafka_ssl_certificate_file is set: its private key is needed too",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "kafka_ssl_certificate_file",
                    "kafka_ssl_key_file is set: its certificate is needed too",
                ));
            }
            (Some(cert_path), Some(key_path)) => {
                let field = "kafka_ssl_certificate_file";
                let certs = parse_certificates(field, cert_path)?;
                let cert = &certs[0];
                check_validity(field, cert_path, cert)?;
                let key_pem = read_pem("kafka_ssl_key_file", key_path)?;
                let key = match &self.key_password_file {
                    Some(password_path) => {
                        let password = read_secret("kafka_ssl_key_password_file", password_path)?;
                        openssl::pkey::PKey::private_key_from_pem_passphrase(
                            &key_pem,
                            password.as_bytes(),
                        )
                        .map_err(|e| {
                            ConfigError::new(
                                "kafka_ssl_key_password_file",
                                format!(
                                    "{} could not be read with this password (or is not a PEM private key): {e}",
                                    key_path.display()
                                ),
                            )
                        })?
                    }
                    // No password: the callback gives none, where OpenSSL
                    // would otherwise ask for one on the terminal.
                    None => openssl::pkey::PKey::private_key_from_pem_callback(&key_pem, |_| {
                        Ok(0)
                    })
                    .map_err(|e| {
                        ConfigError::new(
                            "kafka_ssl_key_file",
                            format!(
                                "{}: not a PEM private key, or encrypted (set kafka_ssl_key_password_file): {e}",
                                key_path.display()
                            ),
                        )
                    })?,
                };
                let public = cert
                    .public_key()
                    .map_err(|e| ConfigError::new(field, e.to_string()))?;
                if !public.public_eq(&key) {
                    return Err(ConfigError::new(
                        "kafka_ssl_key_file",
                        format!(
                            "{} does not match the certificate {} in {}",
                            key_path.display(),
                            subject(cert),
                            cert_path.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Sets the security options on a librdkafka client configuration,
    /// reading the secret files now. Errors name the option.
    pub fn apply(&self, config: &mut ClientConfig) -> Result<(), ConfigError> {
        config.set("security.protocol", self.protocol.as_str());
        if self.protocol.uses_tls() {
            let path = |p: &Path| p.to_string_lossy().into_owned();
            if let Some(ca) = &self.ca_file {
                config.set("ssl.ca.location", path(ca));
            }
            if let Some(cert) = &self.certificate_file {
                config.set("ssl.certificate.location", path(cert));
            }
            if let Some(key) = &self.key_file {
                config.set("ssl.key.location", path(key));
            }
            if let Some(file) = &self.key_password_file {
                config.set(
                    "ssl.key.password",
                    read_secret("kafka_ssl_key_password_file", file)?,
                );
            }
            config.set(
                "ssl.endpoint.identification.algorithm",
                if self.verify_hostname {
                    "https"
                } else {
                    "none"
                },
            );
        }
        if self.protocol.uses_sasl() {
            if let Some(mechanism) = self.mechanism {
                config.set("sasl.mechanism", mechanism.as_str());
            }
            if let Some(username) = &self.username {
                config.set("sasl.username", username);
            }
            match (&self.password_file, &self.password) {
                (Some(file), _) => {
                    config.set(
                        "sasl.password",
                        read_secret("kafka_sasl_password_file", file)?,
                    );
                }
                (None, Some(password)) => {
                    config.set("sasl.password", &password.0);
                }
                (None, None) => {}
            }
        }
        Ok(())
    }
}

/// What kind of failure a librdkafka error is, when it is about security:
/// these are reported at once in `/health`, not after
/// `health_kafka_unavailable_secs`, because retrying does not mend them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityFailure {
    /// SASL: a wrong password or user, or a mechanism the broker refuses.
    Authentication,
    /// TLS: an unknown CA, an expired certificate, a hostname mismatch, a
    /// refused client certificate, or TLS spoken to a plaintext port.
    Tls,
    /// A plaintext client talking to a TLS port.
    ProtocolMismatch,
}

impl SecurityFailure {
    /// Classifies a librdkafka error by its code and text.
    pub fn of(code: Option<rdkafka::error::RDKafkaErrorCode>, reason: &str) -> Option<Self> {
        use rdkafka::error::RDKafkaErrorCode as C;
        match code {
            Some(
                C::Authentication
                | C::SaslAuthenticationFailed
                | C::UnsupportedSASLMechanism
                | C::IllegalSASLState,
            ) => Some(Self::Authentication),
            Some(C::SSL) => Some(Self::Tls),
            _ if reason.contains("SASL") => Some(Self::Authentication),
            // "SSL handshake failed", and a handshake that timed out
            // ("in state SSL_HANDSHAKE"): a plaintext port that waits for
            // the rest of what it took for a request.
            _ if reason.contains("SSL handshake")
                || reason.contains("SSL_HANDSHAKE")
                || reason.contains("certificate") =>
            {
                Some(Self::Tls)
            }
            _ if reason.contains("security.protocol") => Some(Self::ProtocolMismatch),
            _ => None,
        }
    }

    /// How `/health` and the logs name it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Authentication => "Kafka authentication failed",
            Self::Tls => "Kafka TLS handshake failed",
            Self::ProtocolMismatch => {
                "Kafka connection failed: kafka_security_protocol does not match the broker's listener"
            }
        }
    }
}

impl KafkaSecurity {
    /// Why a TLS handshake with `broker` (`HOST:PORT`) fails, in OpenSSL's
    /// words for the certificate check ("certificate has expired",
    /// "hostname mismatch", "unable to get local issuer certificate"):
    /// librdkafka reports only "certificate verify failed". Connects with
    /// these settings, blocking for at most about five seconds; `None` when
    /// the handshake succeeds or TLS is off.
    pub fn diagnose_tls(&self, broker: &str) -> Option<String> {
        use openssl::ssl::{HandshakeError, SslConnector, SslMethod, SslVerifyMode};
        use std::net::ToSocketAddrs;
        if !self.protocol.uses_tls() {
            return None;
        }
        let address = broker.split_once("://").map_or(broker, |(_, rest)| rest);
        let (host, _) = address.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut builder = SslConnector::builder(SslMethod::tls_client()).ok()?;
        match &self.ca_file {
            Some(ca) => builder.set_ca_file(ca).ok()?,
            None => builder.set_default_verify_paths().ok()?,
        }
        if let (Some(cert), Some(key)) = (&self.certificate_file, &self.key_file) {
            // The key through its password file, if any (OpenSSL would
            // otherwise ask on the terminal); what can't be loaded is left
            // out, and the broker's certificate is checked all the same.
            let _ = builder.set_certificate_chain_file(cert);
            let password = self
                .key_password_file
                .as_ref()
                .and_then(|file| read_secret("kafka_ssl_key_password_file", file).ok())
                .unwrap_or_default();
            let key = std::fs::read(key).ok().and_then(|pem| {
                openssl::pkey::PKey::private_key_from_pem_callback(&pem, |buffer| {
                    let bytes = password.as_bytes();
                    let n = bytes.len().min(buffer.len());
                    buffer[..n].copy_from_slice(&bytes[..n]);
                    Ok(n)
                })
                .ok()
            });
            if let Some(key) = key {
                let _ = builder.set_private_key(&key);
            }
        }
        builder.set_verify(SslVerifyMode::PEER);
        let connector = builder.build();
        let mut configuration = connector.configure().ok()?;
        configuration.set_verify_hostname(self.verify_hostname);
        let addrs: Vec<_> = address.to_socket_addrs().ok()?.collect();
        let addr = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first())?;
        let timeout = std::time::Duration::from_secs(5);
        let stream = std::net::TcpStream::connect_timeout(addr, timeout).ok()?;
        stream.set_read_timeout(Some(timeout)).ok()?;
        stream.set_write_timeout(Some(timeout)).ok()?;
        match configuration.connect(host, stream) {
            Ok(_) => None,
            Err(HandshakeError::Failure(failed)) | Err(HandshakeError::WouldBlock(failed)) => {
                let verify = failed.ssl().verify_result();
                if verify == openssl::x509::X509VerifyResult::OK {
                    Some(failed.error().to_string())
                } else {
                    Some(verify.error_string().to_owned())
                }
            }
            Err(HandshakeError::SetupFailure(error)) => Some(error.to_string()),
        }
    }
}
