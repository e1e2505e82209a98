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
//!
//! Anyone on the LAN can announce, so the table of peers is bounded ([`PeerTable`]): at most
//! [`MAX_PEERS`] peers, at most [`MAX_PER_ADDRESS`] claiming any one address, a few addresses and short
//! strings each. A newcomer past a bound waits outside; a coordinator that failed its handshake is
//! forgotten ([`Mdns::forget`]), and once there is room the daemon's cache is read again so the ones that
//! waited get their turn.

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
/// Peers the table holds at most.
pub const MAX_PEERS: usize = 256;
/// Peers that may claim any one address: one host announcing a thousand instances fills this, not the table.
pub const MAX_PER_ADDRESS: usize = 8;
/// Addresses kept per peer, and characters per string read from its TXT record.
const MAX_ADDRESSES: usize = 4;
const MAX_TEXT: usize = 64;
/// How often the daemon's cache may be read again for peers that waited outside a full table.
const REFRESH_EVERY: Duration = Duration::from_secs(2);

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
    peers: Mutex<PeerTable>,
    /// Woken when the table has room for peers that were refused.
    room: tokio::sync::Notify,
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
            peers: Mutex::new(PeerTable::default()),
            room: tokio::sync::Notify::new(),
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
        self.table().peers()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, PeerTable> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the coordinators announced at `address` (one whose handshake failed), making room for
    /// others; they come back if they announce again.
    pub fn forget(&self, address: SocketAddr) {
        let (forgotten, waiting) = {
            let mut table = self.table();
            (table.forget(address), table.refused)
        };
        if forgotten > 0 {
            tracing::info!(%address, forgotten, "forgot coordinators announced over mDNS that failed their handshake");
            if waiting > 0 {
                self.room.notify_one();
            }
        }
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
        let (instance, role, addresses, port) = (
            peer.instance.clone(),
            peer.role,
            peer.addresses.clone(),
            peer.port,
        );
        match self.table().insert(peer) {
            Inserted::New => {
                tracing::info!(%instance, role = role.as_str(), ?addresses, port, "found over mDNS");
            }
            Inserted::Same => {}
            Inserted::Refused(first) => {
                if first {
                    tracing::warn!(%instance, ?addresses, max_peers = MAX_PEERS, max_per_address = MAX_PER_ADDRESS, "mDNS peer table full for this address or in all: later announcements wait until there is room");
                }
            }
        }
    }

    fn removed(&self, instance: &str) {
        let (removed, waiting) = {
            let mut table = self.table();
            (table.remove(instance), table.refused)
        };
        if removed {
            tracing::info!(%instance, "withdrawn over mDNS");
            if waiting > 0 {
                self.room.notify_one();
            }
        }
    }
}

/// What [`PeerTable::insert`] did.
#[derive(Debug, PartialEq, Eq)]
enum Inserted {
    /// A new peer, or a known one that announced something else.
    New,
    /// Already there as announced.
    Same,
    /// Past a bound; `true` for the first refusal since the table last had room.
    Refused(bool),
}

/// The peers seen, bounded: [`MAX_PEERS`] in all, [`MAX_PER_ADDRESS`] claiming any one address.
#[derive(Debug, Default)]
struct PeerTable {
    peers: HashMap<String, Peer>,
    /// Announcements refused since the cache was last read again.
    refused: usize,
}

impl PeerTable {
    fn insert(&mut self, peer: Peer) -> Inserted {
        if let Some(known) = self.peers.get(&peer.instance) {
            if *known == peer {
                return Inserted::Same;
            }
            // An update never adds a peer, but may claim other addresses: the per-address bound holds.
            if self.crowded(&peer, Some(&peer.instance)) {
                return self.refuse();
            }
            self.peers.insert(peer.instance.clone(), peer);
            return Inserted::New;
        }
        if self.peers.len() >= MAX_PEERS || self.crowded(&peer, None) {
            return self.refuse();
        }
        self.peers.insert(peer.instance.clone(), peer);
        Inserted::New
    }

    /// Whether some address `peer` claims is claimed by [`MAX_PER_ADDRESS`] others already.
    fn crowded(&self, peer: &Peer, except: Option<&str>) -> bool {
        peer.addresses.iter().any(|address| {
            self.peers
                .values()
                .filter(|other| Some(other.instance.as_str()) != except)
                .filter(|other| other.addresses.contains(address))
                .count()
                >= MAX_PER_ADDRESS
        })
    }

    fn refuse(&mut self) -> Inserted {
        self.refused += 1;
        Inserted::Refused(self.refused == 1)
    }

    fn remove(&mut self, instance: &str) -> bool {
        self.peers.remove(instance).is_some()
    }

    /// Removes the coordinators announced at `address`; how many.
    fn forget(&mut self, address: SocketAddr) -> usize {
        let before = self.peers.len();
        self.peers.retain(|_, peer| {
            !(peer.role == Role::Coordinator
                && peer.port == address.port()
                && peer
                    .addresses
                    .iter()
                    .any(|ip| std::net::IpAddr::V4(*ip) == address.ip()))
        });
        before - self.peers.len()
    }

    fn peers(&self) -> Vec<Peer> {
        let mut peers: Vec<Peer> = self.peers.values().cloned().collect();
        peers.sort_by(|a, b| a.instance.cmp(&b.instance));
        peers
    }
}

async fn watch(
    mdns: Arc<Mdns>,
    mut events: mdns_sd::Receiver<ServiceEvent>,
    shutdown: CancellationToken,
) {
    // Browsing again replays the daemon's cache: the peers refused while the table was full are offered
    // again once there is room, and a subscription the daemon ended (its event queue overflowed during a
    // flood of announcements) starts again. At most every REFRESH_EVERY.
    let mut last_browse = tokio::time::Instant::now();
    let mut browse_at: Option<tokio::time::Instant> = None;
    let mut subscribed = true;
    loop {
        let browse_due = async {
            match browse_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.recv_async(), if subscribed => match event {
                Ok(ServiceEvent::ServiceResolved(service)) => mdns.resolved(&service),
                Ok(ServiceEvent::ServiceRemoved(_, instance)) => mdns.removed(&instance),
                Ok(_) => {}
                Err(_) => {
                    subscribed = false;
                    browse_at = Some(last_browse + REFRESH_EVERY);
                }
            },
            () = mdns.room.notified(), if browse_at.is_none() => {
                browse_at = Some(last_browse + REFRESH_EVERY);
            }
            () = browse_due => {
                browse_at = None;
                last_browse = tokio::time::Instant::now();
                mdns.table().refused = 0;
                match mdns.daemon.browse(SERVICE_TYPE) {
                    Ok(again) => {
                        events = again;
                        subscribed = true;
                    }
                    // The daemon stopped.
                    Err(_) => break,
                }
            }
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
    let short = |text: &str| text.chars().take(MAX_TEXT).collect::<String>();
    let mut addresses: Vec<Ipv4Addr> = service.get_addresses_v4().into_iter().collect();
    addresses.sort();
    addresses.truncate(MAX_ADDRESSES);
    let role = Role::parse(txt("role")?)?;
    let roles = match txt("roles") {
        Some(roles) if !roles.is_empty() => roles.split(',').take(8).map(short).collect(),
        _ => vec![role.as_str().to_owned()],
    };
    Some(Peer {
        instance: service.fullname.clone(),
        node_id: short(txt("id").filter(|id| !id.is_empty())?),
        name: short(txt("name").unwrap_or_default()),
        role,
        roles,
        version: short(txt("v").unwrap_or_default()),
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

    fn coordinator(index: usize, address: Ipv4Addr, port: u16) -> Peer {
        Peer {
            instance: format!("fake-{index}._sollol._tcp.local."),
            node_id: format!("{index:032x}"),
            name: format!("fake {index}"),
            role: Role::Coordinator,
            roles: vec!["coordinator".to_owned()],
            version: BUILD_VERSION.to_owned(),
            addresses: vec![address],
            port,
            has_token: true,
        }
    }

    #[test]
    fn a_thousand_announcements_from_one_host_hold_a_few_places_and_the_real_one_gets_in() {
        let mut table = PeerTable::default();
        let flood = Ipv4Addr::new(10, 77, 0, 14);
        let refused = (0..1000)
            .filter(|&index| {
                matches!(
                    table.insert(coordinator(index, flood, 7000 + index as u16)),
                    Inserted::Refused(_)
                )
            })
            .count();
        assert_eq!(refused, 1000 - MAX_PER_ADDRESS);
        let real = coordinator(5000, Ipv4Addr::new(10, 77, 0, 1), 11436);
        assert_eq!(table.insert(real.clone()), Inserted::New);
        assert_eq!(table.insert(real.clone()), Inserted::Same);
        assert_eq!(table.peers().len(), MAX_PER_ADDRESS + 1);
        // A failed handshake forgets the coordinators at that address and port only.
        assert_eq!(table.forget(SocketAddr::from((flood, 7000))), 1);
        assert_eq!(table.forget(SocketAddr::from((flood, 7000))), 0);
        assert_eq!(table.insert(coordinator(1001, flood, 9000)), Inserted::New);
        assert!(table.peers().contains(&real));
    }

    #[test]
    fn the_table_never_holds_more_than_its_bound() {
        let mut table = PeerTable::default();
        for index in 0..2000usize {
            let address = Ipv4Addr::from(0x0a00_0000 + index as u32);
            table.insert(coordinator(index, address, 11436));
        }
        assert_eq!(table.peers().len(), MAX_PEERS);
        assert_eq!(table.refused, 2000 - MAX_PEERS);
        // Withdrawing makes room.
        assert!(table.remove(&coordinator(0, Ipv4Addr::UNSPECIFIED, 0).instance));
        let newcomer = coordinator(5000, Ipv4Addr::new(10, 1, 1, 1), 1);
        assert_eq!(table.insert(newcomer), Inserted::New);
    }

    #[test]
    fn a_known_peer_cannot_move_onto_a_crowded_address() {
        let mut table = PeerTable::default();
        let crowded = Ipv4Addr::new(10, 0, 0, 9);
        for index in 0..MAX_PER_ADDRESS {
            table.insert(coordinator(index, crowded, 1));
        }
        let mut mover = coordinator(100, Ipv4Addr::new(10, 0, 0, 1), 1);
        assert_eq!(table.insert(mover.clone()), Inserted::New);
        mover.addresses = vec![crowded];
        assert!(matches!(table.insert(mover), Inserted::Refused(_)));
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
