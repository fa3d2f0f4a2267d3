//! A certificate authority made at start, for TLS in tests and in the
//! simulator's HTTPS fakes: a CA, and server and client certificates it
//! signs, valid or deliberately wrong (expired, for another host name).
//! Made with OpenSSL, the library the collector's TLS runs on.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::symm::Cipher;
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509, X509NameBuilder};

/// A CA that signs certificates for tests.
pub struct TestCa {
    key: PKey<Private>,
    cert: X509,
}

/// What a certificate is for, and when it is valid.
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// Its common name.
    pub common_name: String,
    /// DNS names in its subjectAltName.
    pub dns_names: Vec<String>,
    /// IP addresses in its subjectAltName.
    pub ips: Vec<IpAddr>,
    /// Valid from this many days from now (negative: in the past).
    pub valid_from_days: i64,
    /// Valid until this many days from now (negative: expired).
    pub valid_until_days: i64,
}

impl CertSpec {
    /// A server certificate for `localhost` and 127.0.0.1, valid for a year.
    pub fn localhost() -> Self {
        Self::server(&["localhost"])
    }

    /// A server certificate for these names (and 127.0.0.1 only when
    /// `localhost` is among them), valid for a year.
    pub fn server(names: &[&str]) -> Self {
        Self {
            common_name: names.first().copied().unwrap_or("server").to_owned(),
            dns_names: names.iter().map(|n| (*n).to_owned()).collect(),
            ips: if names.contains(&"localhost") {
                vec![IpAddr::from([127, 0, 0, 1])]
            } else {
                Vec::new()
            },
            valid_from_days: -1,
            valid_until_days: 365,
        }
    }

    /// A client certificate named `name`, valid for a year.
    pub fn client(name: &str) -> Self {
        Self {
            common_name: name.to_owned(),
            dns_names: Vec::new(),
            ips: Vec::new(),
            valid_from_days: -1,
            valid_until_days: 365,
        }
    }

    /// The same, expired yesterday.
    pub fn expired(mut self) -> Self {
        self.valid_from_days = -30;
        self.valid_until_days = -1;
        self
    }
}

/// A certificate and its private key, in PEM.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: Vec<u8>,
    /// Its private key (PKCS#8, unencrypted).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued { <certificate and key> }")
    }
}

impl Issued {
    /// The key encrypted with `password` (AES-256-CBC, PKCS#8).
    pub fn encrypted_key_pem(&self, password: &str) -> Result<Vec<u8>, ErrorStack> {
        PKey::private_key_from_pem(&self.key_pem)?
            .private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), password.as_bytes())
    }

    /// Writes `NAME.crt` and `NAME.key` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> std::io::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem)?;
        std::fs::write(&key, &self.key_pem)?;
        Ok((cert, key))
    }
}

fn time(days_from_now: i64) -> Result<Asn1Time, ErrorStack> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Asn1Time::from_unix(now + days_from_now * 86_400)
}

fn serial() -> Result<Asn1Integer, ErrorStack> {
    let mut bn = BigNum::new()?;
    bn.rand(127, openssl::bn::MsbOption::MAYBE_ZERO, false)?;
    bn.to_asn1_integer()
}

fn new_key() -> Result<PKey<Private>, ErrorStack> {
    let ec = openssl::ec::EcKey::generate(
        openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)?.as_ref(),
    )?;
    PKey::from_ec_key(ec)
}

impl TestCa {
    /// A new CA called `name`, valid for a year.
    pub fn new(name: &str) -> Result<Self, ErrorStack> {
        let key = new_key()?;
        let mut subject = X509NameBuilder::new()?;
        subject.append_entry_by_text("CN", name)?;
        let subject = subject.build();
        let mut builder = X509::builder()?;
        builder.set_version(2)?;
        builder.set_serial_number(serial()?.as_ref())?;
        builder.set_subject_name(&subject)?;
        builder.set_issuer_name(&subject)?;
        builder.set_pubkey(&key)?;
        builder.set_not_before(time(-1)?.as_ref())?;
        builder.set_not_after(time(365)?.as_ref())?;
        builder.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        builder.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
        builder.sign(&key, MessageDigest::sha256())?;
        Ok(Self {
            key,
            cert: builder.build(),
        })
    }

    /// The CA's certificate, in PEM.
    pub fn cert_pem(&self) -> Vec<u8> {
        self.cert.to_pem().unwrap_or_default()
    }

    /// Writes the CA's certificate to `path`.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.cert_pem())
    }

    /// A certificate signed by this CA.
    pub fn issue(&self, spec: &CertSpec) -> Result<Issued, ErrorStack> {
        let key = new_key()?;
        let mut subject = X509NameBuilder::new()?;
        subject.append_entry_by_text("CN", &spec.common_name)?;
        let subject = subject.build();
        let mut builder = X509::builder()?;
        builder.set_version(2)?;
        builder.set_serial_number(serial()?.as_ref())?;
        builder.set_subject_name(&subject)?;
        builder.set_issuer_name(self.cert.subject_name())?;
        builder.set_pubkey(&key)?;
        builder.set_not_before(time(spec.valid_from_days)?.as_ref())?;
        builder.set_not_after(time(spec.valid_until_days)?.as_ref())?;
        builder.append_extension(BasicConstraints::new().build()?)?;
        builder.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_agreement()
                .build()?,
        )?;
        builder.append_extension(
            ExtendedKeyUsage::new()
                .server_auth()
                .client_auth()
                .build()?,
        )?;
        if !spec.dns_names.is_empty() || !spec.ips.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for name in &spec.dns_names {
                san.dns(name);
            }
            for ip in &spec.ips {
                san.ip(&ip.to_string());
            }
            let san = san.build(&builder.x509v3_context(Some(&self.cert), None))?;
            builder.append_extension(san)?;
        }
        builder.sign(&self.key, MessageDigest::sha256())?;
        Ok(Issued {
            cert_pem: builder.build().to_pem()?,
            key_pem: key.private_key_to_pem_pkcs8()?,
        })
    }
}

/// Serves `app` over HTTPS with `identity`, as `axum::serve` serves it
/// over TCP. Handshakes happen one at a time, each within 10 s (a fake's
/// few clients, not a server's many).
pub async fn serve_https(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    identity: &Issued,
) -> std::io::Result<()> {
    let identity = native_tls::Identity::from_pkcs8(&identity.cert_pem, &identity.key_pem)
        .map_err(std::io::Error::other)?;
    let acceptor = native_tls::TlsAcceptor::new(identity).map_err(std::io::Error::other)?;
    let listener = TlsListener {
        tcp: listener,
        acceptor: acceptor.into(),
    };
    axum::serve(listener, app).await
}

/// Serves `app` over HTTPS with `identity`, or over plain HTTP without.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    identity: Option<&Issued>,
) -> std::io::Result<()> {
    match identity {
        Some(identity) => serve_https(listener, app, identity).await,
        None => axum::serve(listener, app).await,
    }
}

struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_native_tls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_native_tls::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handshake = self.acceptor.accept(tcp);
            // A client that refuses the certificate, or says nothing, is
            // dropped; the next one is served.
            if let Ok(Ok(tls)) =
                tokio::time::timeout(std::time::Duration::from_secs(10), handshake).await
            {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
