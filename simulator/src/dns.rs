//! Mesos-DNS: answers the SRV `_<framework>._tcp.marathon.mesos` and the A
//! records `<framework>.mesos` and `broker-N.<framework>.mesos`, over UDP and
//! TCP, with hickory's server crate, so that the collector's real discovery
//! (hickory's resolver) runs unmodified against it. Records can change at
//! runtime through the handle.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

use crate::listening::Listening;

/// The records Mesos-DNS serves, behind its handle.
#[derive(Debug, Default)]
pub struct Zone {
    /// Lower-case FQDN (with the trailing dot) → (port, target).
    srv: HashMap<String, Vec<(u16, String)>>,
    /// Lower-case FQDN → addresses.
    a: HashMap<String, Vec<Ipv4Addr>>,
}

/// A running Mesos-DNS fake; its address serves UDP and TCP (the same
/// port).
pub type DnsHandle = Listening<Arc<RwLock<Zone>>>;

fn fqdn(name: &str) -> String {
    let mut name = name.to_ascii_lowercase();
    if !name.ends_with('.') {
        name.push('.');
    }
    name
}

impl DnsHandle {
    fn zone(&self) -> std::sync::RwLockWriteGuard<'_, Zone> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a framework's scheduler task: the SRV
    /// `_<name>._tcp.marathon.mesos` → `<name>.mesos:<port>`, and the A record
    /// `<name>.mesos` → `ip`.
    pub fn set_scheduler(&self, framework: &str, ip: Ipv4Addr, port: u16) {
        let mut zone = self.zone();
        let host = fqdn(&format!("{framework}.mesos"));
        zone.srv.insert(
            fqdn(&format!("_{framework}._tcp.marathon.mesos")),
            vec![(port, host.clone())],
        );
        zone.a.insert(host, vec![ip]);
    }

    /// Removes a framework's SRV record (the scheduler task is gone).
    pub fn remove_scheduler(&self, framework: &str) {
        self.zone()
            .srv
            .remove(&fqdn(&format!("_{framework}._tcp.marathon.mesos")));
    }

    /// Sets the A records `broker-N.<framework>.mesos`.
    pub fn set_brokers(&self, framework: &str, ips: &[Ipv4Addr]) {
        let mut zone = self.zone();
        let suffix = fqdn(&format!(".{framework}.mesos"));
        zone.a
            .retain(|name, _| !(name.starts_with("broker-") && name.ends_with(&suffix)));
        for (i, ip) in ips.iter().enumerate() {
            zone.a
                .insert(fqdn(&format!("broker-{i}.{framework}.mesos")), vec![*ip]);
        }
    }

    /// Sets any A record.
    pub fn set_a(&self, name: &str, ip: Ipv4Addr) {
        self.zone().a.insert(fqdn(name), vec![ip]);
    }
}

struct Handler {
    zone: Arc<RwLock<Zone>>,
}

impl Handler {
    fn answer(&self, name: &Name, kind: RecordType) -> Vec<Record> {
        let zone = self.zone.read().unwrap_or_else(|p| p.into_inner());
        let key = fqdn(&name.to_string());
        match kind {
            RecordType::SRV => zone
                .srv
                .get(&key)
                .into_iter()
                .flatten()
                .filter_map(|(port, target)| {
                    let target = Name::from_str(target).ok()?;
                    Some(Record::from_rdata(
                        name.clone(),
                        5,
                        RData::SRV(SRV::new(0, 1, *port, target)),
                    ))
                })
                .collect(),
            RecordType::A => zone
                .a
                .get(&key)
                .into_iter()
                .flatten()
                .map(|ip| Record::from_rdata(name.clone(), 5, RData::A(A(*ip))))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn known(&self, name: &Name) -> bool {
        let zone = self.zone.read().unwrap_or_else(|p| p.into_inner());
        let key = fqdn(&name.to_string());
        zone.srv.contains_key(&key) || zone.a.contains_key(&key)
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let failed = |mut metadata: Metadata| {
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        };
        let Ok(info) = request.request_info() else {
            return failed(metadata);
        };
        let name: Name = info.query.name().into();
        let records = self.answer(&name, info.query.query_type());
        if records.is_empty() && !self.known(&name) {
            metadata.response_code = ResponseCode::NXDomain;
        }
        let builder = MessageResponseBuilder::from_message_request(request);
        let message = builder.build(metadata, records.iter(), [], [], []);
        match response.send_response(message).await {
            Ok(info) => info,
            Err(_) => failed(metadata),
        }
    }
}

/// Builds a Mesos-DNS fake.
#[derive(Debug, Clone)]
pub struct DnsBuilder {
    bind: SocketAddr,
}

/// Mesos-DNS on 127.0.0.1 with an ephemeral port (UDP and TCP share it).
pub fn mesos_dns() -> DnsBuilder {
    DnsBuilder {
        bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
    }
}

impl DnsBuilder {
    /// Listens on `addr` (port 0: one free for both UDP and TCP).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// Starts serving.
    pub async fn run(self) -> std::io::Result<DnsHandle> {
        serve(self.bind).await
    }
}

async fn serve(addr: SocketAddr) -> std::io::Result<DnsHandle> {
    let (udp, tcp) = if addr.port() != 0 {
        (UdpSocket::bind(addr).await?, TcpListener::bind(addr).await?)
    } else {
        loop {
            let udp = UdpSocket::bind(addr).await?;
            let port = udp.local_addr()?.port();
            if let Ok(tcp) = TcpListener::bind((addr.ip(), port)).await {
                break (udp, tcp);
            }
        }
    };
    let addr = udp.local_addr()?;
    let zone = Arc::new(RwLock::new(Zone::default()));
    let mut server = Server::new(Handler { zone: zone.clone() });
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 4096);
    Ok(Listening::spawn(addr, zone, async move {
        let _ = server.block_until_done().await;
    }))
}
