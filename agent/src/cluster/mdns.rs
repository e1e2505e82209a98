//! Zero-configuration discovery on a LAN: every sollol process announces itself over multicast DNS as a
//! DNS-SD service of type `_sollol._tcp` and browses for the others (`discovery.mdns`).
//!
//! The TXT record carries `id` (node id), `name`, `role` (`agent` or `coordinator`), `roles` (the role
//! and what else the process runs: `stage`, `engine`, `gateway`, `distributed`), `v` (build version),
//! `proto` (agent protocol version) and `token` (`1` when the process holds a cluster token).
//! A coordinator's instance points at its cluster port, an agent's at its stage port. Each process
//! announces under a host name of its own (`sollol-<id>.local.`), so several on one machine (or in
//! network namespaces sharing a host name) never answer for each other's addresses.
//!
//! mDNS only says who is there: joining still needs the token proven both ways (see [`crate::cluster::join`]).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use sollol_shared::BUILD_VERSION;
use sollol_shared::api::{MdnsDiscovery, MdnsInterface, MdnsPeer};
use sollol_shared::protocol::PROTOCOL_VERSION;
use tokio_util::sync::CancellationToken;

/// The DNS-SD service type every sollol process announces.
pub const SERVICE_TYPE: &str = "_sollol._tcp.local.";
/// How long withdrawing the announcement (goodbye packets) may take at shutdown.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Agent,
    Coordinator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Coordinator => "coordinator",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "agent" => Some(Self::Agent),
            "coordinator" => Some(Self::Coordinator),
            _ => None,
        }
    }
}

/// What this process announces.
#[derive(Clone, Debug)]
pub struct Announce {
    pub role: Role,
    pub node_id: String,
    pub name: String,
    /// The port peers connect to: the cluster port of a coordinator, the stage port of an agent.
    pub port: u16,
    pub has_token: bool,
    /// What the process runs besides its role, e.g. `stage` and `engine` for an agent.
    pub serves: Vec<&'static str>,
}

/// Another sollol process that announced itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Peer {
    pub instance: String,
    pub node_id: String,
    pub name: String,
    pub role: Role,
    /// The role and what else the peer runs.
    pub roles: Vec<String>,
    pub version: String,
    pub addresses: Vec<Ipv4Addr>,
    pub port: u16,
    pub has_token: bool,
}

/// The running announcement and browser.
pub struct Mdns {
    daemon: ServiceDaemon,
    own_id: String,
    announced_as: String,
    peers: Mutex<HashMap<String, Peer>>,
    /// Cancelled once the announcement is withdrawn and the daemon stopped.
    stopped: CancellationToken,
}

impl std::fmt::Debug for Mdns {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Mdns")
            .field("announced_as", &self.announced_as)
            .finish_non_exhaustive()
    }
}

impl Mdns {
    /// Announces `announce` on every IPv4 interface but loopback and browses for the other processes
    /// until `shutdown`, when the announcement is withdrawn. Fails when the mDNS sockets cannot be set up.
    pub fn start(announce: &Announce, shutdown: CancellationToken) -> Result<Arc<Self>, String> {
        let daemon = ServiceDaemon::new().map_err(|error| format!("cannot start mDNS: {error}"))?;
        // The cluster speaks IPv4, and processes on one machine reach each other without mDNS.
        for kind in [IfKind::IPv6, IfKind::LoopbackV4, IfKind::LoopbackV6] {
            daemon
                .disable_interface(kind)
                .map_err(|error| format!("cannot configure mDNS: {error}"))?;
        }
        let info = service_info(announce)?;
        let announced_as = info.get_fullname().to_owned();
        daemon
            .register(info)
            .map_err(|error| format!("cannot announce over mDNS: {error}"))?;
        let events = daemon
            .browse(SERVICE_TYPE)
            .map_err(|error| format!("cannot browse mDNS: {error}"))?;
        let mdns = Arc::new(Self {
            daemon,
            own_id: announce.node_id.clone(),
            announced_as,
            peers: Mutex::new(HashMap::new()),
            stopped: CancellationToken::new(),
        });
        tracing::info!(instance = %mdns.announced_as, role = announce.role.as_str(), port = announce.port, "announced over mDNS");
        tokio::spawn(watch(Arc::clone(&mdns), events, shutdown));
        Ok(mdns)
    }

    pub fn announced_as(&self) -> &str {
        &self.announced_as
    }

    /// Waits until, after `shutdown`, the announcement is withdrawn (goodbye packets sent).
    pub async fn stopped(&self) {
        self.stopped.cancelled().await;
    }

    /// Every other process seen, by instance name.
    pub fn peers(&self) -> Vec<Peer> {
        let mut peers: Vec<Peer> = self
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        peers.sort_by(|a, b| a.instance.cmp(&b.instance));
        peers
    }

    /// The cluster addresses of the coordinators seen, one per address each announced.
    pub fn coordinators(&self) -> Vec<SocketAddr> {
        self.peers()
            .into_iter()
            .filter(|peer| peer.role == Role::Coordinator)
            .flat_map(|peer| {
                peer.addresses
                    .into_iter()
                    .map(move |address| SocketAddr::from((address, peer.port)))
            })
            .collect()
    }

    /// What the discovery API shows: interfaces, and the peers with whether each is a member.
    pub fn status(&self, is_member: impl Fn(&str) -> bool) -> MdnsDiscovery {
        let peers = self.peers();
        MdnsDiscovery {
            announced_as: Some(self.announced_as.clone()),
            error: None,
            interfaces: interfaces()
                .into_iter()
                .map(|interface| MdnsInterface {
                    answers: peers
                        .iter()
                        .filter(|peer| peer.addresses.iter().any(|ip| interface.contains(*ip)))
                        .count() as u32,
                    name: interface.name,
                    address: format!("{}/{}", interface.address, interface.prefix),
                })
                .collect(),
            peers: peers
                .into_iter()
                .map(|peer| MdnsPeer {
                    joined: peer.role == Role::Agent && is_member(&peer.node_id),
                    instance: peer.instance,
                    node_id: peer.node_id,
                    name: peer.name,
                    role: peer.role.as_str().to_owned(),
                    roles: peer.roles,
                    version: peer.version,
                    addresses: peer.addresses.iter().map(Ipv4Addr::to_string).collect(),
                    port: peer.port,
                    has_token: peer.has_token,
                })
                .collect(),
        }
    }

    fn resolved(&self, service: &mdns_sd::ResolvedService) {
        let Some(peer) = peer_of(service) else {
            tracing::debug!(instance = %service.fullname, "ignored an mDNS answer without sollol's TXT keys");
            return;
        };
        if peer.node_id == self.own_id {
            return;
        }
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if peers.get(&peer.instance) != Some(&peer) {
            tracing::info!(instance = %peer.instance, role = peer.role.as_str(), addresses = ?peer.addresses, port = peer.port, "found over mDNS");
            peers.insert(peer.instance.clone(), peer);
        }
    }

    fn removed(&self, instance: &str) {
        if self
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(instance)
            .is_some()
        {
            tracing::info!(%instance, "withdrawn over mDNS");
        }
    }
}

async fn watch(
    mdns: Arc<Mdns>,
    events: mdns_sd::Receiver<ServiceEvent>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            event = events.recv_async() => match event {
                Ok(ServiceEvent::ServiceResolved(service)) => mdns.resolved(&service),
                Ok(ServiceEvent::ServiceRemoved(_, instance)) => mdns.removed(&instance),
                Ok(_) => {}
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        }
    }
    if let Ok(done) = mdns.daemon.unregister(&mdns.announced_as) {
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, done.recv_async()).await;
    }
    let _ = mdns.daemon.shutdown();
    mdns.stopped.cancel();
}

fn service_info(announce: &Announce) -> Result<ServiceInfo, String> {
    let short_id: String = announce.node_id.chars().take(8).collect();
    let label: String = announce
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    let instance = format!("{label}-{short_id}");
    let host: String = announce.node_id.chars().take(16).collect();
    let properties = [
        ("id", announce.node_id.clone()),
        ("name", announce.name.clone()),
        ("role", announce.role.as_str().to_owned()),
        (
            "roles",
            std::iter::once(announce.role.as_str())
                .chain(announce.serves.iter().copied())
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("v", BUILD_VERSION.to_owned()),
        ("proto", PROTOCOL_VERSION.to_string()),
        (
            "token",
            if announce.has_token { "1" } else { "0" }.to_owned(),
        ),
    ];
    ServiceInfo::new(
        SERVICE_TYPE,
        &instance,
        &format!("sollol-{host}.local."),
        (),
        announce.port,
        &properties[..],
    )
    .map(ServiceInfo::enable_addr_auto)
    .map_err(|error| format!("cannot describe the mDNS service: {error}"))
}

/// The peer an answer describes, if it carries sollol's TXT keys.
fn peer_of(service: &mdns_sd::ResolvedService) -> Option<Peer> {
    let txt = |key: &str| service.txt_properties.get_property_val_str(key);
    let mut addresses: Vec<Ipv4Addr> = service.get_addresses_v4().into_iter().collect();
    addresses.sort();
    let role = Role::parse(txt("role")?)?;
    let roles = match txt("roles") {
        Some(roles) if !roles.is_empty() => roles.split(',').map(str::to_owned).collect(),
        _ => vec![role.as_str().to_owned()],
    };
    Some(Peer {
        instance: service.fullname.clone(),
        node_id: txt("id").filter(|id| !id.is_empty())?.to_owned(),
        name: txt("name").unwrap_or_default().to_owned(),
        role,
        roles,
        version: txt("v").unwrap_or_default().to_owned(),
        addresses,
        port: service.port,
        has_token: txt("token") == Some("1"),
    })
}

/// An IPv4 interface mDNS runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl Interface {
    fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.address) & mask
    }
}

/// This machine's IPv4 interfaces but loopback, sorted by name.
pub fn interfaces() -> Vec<Interface> {
    let mut found: Vec<Interface> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|interface| !interface.is_loopback())
        .filter_map(|interface| match interface.addr {
            if_addrs::IfAddr::V4(v4) => Some(Interface {
                name: interface.name,
                address: v4.ip,
                prefix: u32::from(v4.netmask).count_ones() as u8,
            }),
            if_addrs::IfAddr::V6(_) => None,
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name).then(a.address.cmp(&b.address)));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_contains_the_addresses_of_its_network() {
        let interface = Interface {
            name: "eth0".to_owned(),
            address: Ipv4Addr::new(192, 168, 1, 20),
            prefix: 24,
        };
        assert!(interface.contains(Ipv4Addr::new(192, 168, 1, 1)));
        assert!(interface.contains(Ipv4Addr::new(192, 168, 1, 255)));
        assert!(!interface.contains(Ipv4Addr::new(192, 168, 2, 1)));
        let point_to_point = Interface {
            prefix: 32,
            ..interface.clone()
        };
        assert!(point_to_point.contains(Ipv4Addr::new(192, 168, 1, 20)));
        assert!(!point_to_point.contains(Ipv4Addr::new(192, 168, 1, 21)));
        let everything = Interface {
            prefix: 0,
            ..interface
        };
        assert!(everything.contains(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn the_announcement_carries_the_txt_keys_a_peer_is_read_from() {
        let announce = Announce {
            role: Role::Agent,
            node_id: "0123456789abcdef0123456789abcdef".to_owned(),
            name: "pi left.lan".to_owned(),
            port: 7703,
            has_token: true,
            serves: vec!["stage", "engine"],
        };
        let info = service_info(&announce).expect("service info");
        assert_eq!(
            info.get_fullname(),
            "pi-left-lan-01234567._sollol._tcp.local."
        );
        assert_eq!(info.get_hostname(), "sollol-0123456789abcdef.local.");
        assert_eq!(info.get_property_val_str("role"), Some("agent"));
        assert_eq!(
            info.get_property_val_str("roles"),
            Some("agent,stage,engine")
        );
        assert_eq!(info.get_property_val_str("name"), Some("pi left.lan"));
        assert_eq!(info.get_property_val_str("token"), Some("1"));
        assert_eq!(info.get_property_val_str("v"), Some(BUILD_VERSION));
        assert_eq!(info.get_port(), 7703);
    }
}
