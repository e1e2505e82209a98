//! A hostile host on the LAN for `tests/netns.rs`: announces `COUNT` fake sollol coordinators over mDNS
//! at `ADDRESS`, half of them at a port that accepts connections and never answers (a stalled
//! handshake), half at ports where nothing listens. Runs until killed.
//!
//! Usage: `mdns_flood ADDRESS COUNT`

use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use mdns_sd::{ServiceDaemon, ServiceInfo};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: mdns_flood ADDRESS COUNT";
    let address: Ipv4Addr = args.next().ok_or(usage)?.parse()?;
    let count: u16 = args.next().ok_or(usage)?.parse()?;
    // Accepted by the kernel, never read or answered.
    let stalling = TcpListener::bind((address, 0))?;
    let stalling_port = stalling.local_addr()?.port();
    let daemon = ServiceDaemon::new()?;
    for index in 0..count {
        let port = if index % 2 == 0 {
            stalling_port
        } else {
            20_000 + index
        };
        let id = format!("{:032x}", 0x000f_100d_0000_u64 + u64::from(index));
        let properties = [
            ("id", id.as_str()),
            ("name", "impostor"),
            ("role", "coordinator"),
            ("roles", "coordinator,gateway"),
            ("v", "0.0.0"),
            ("proto", "4"),
            ("token", "1"),
        ];
        let info = ServiceInfo::new(
            "_sollol._tcp.local.",
            &format!("impostor-{index}"),
            "impostor.local.",
            address.to_string().as_str(),
            port,
            &properties[..],
        )?;
        // The daemon's command queue is bounded: wait while it is full.
        loop {
            match daemon.register(info.clone()) {
                Err(mdns_sd::Error::Again) => std::thread::sleep(Duration::from_millis(5)),
                other => break other?,
            }
        }
    }
    println!("announcing {count} fake coordinators at {address} (stalling port {stalling_port})");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
        let _ = &stalling;
    }
}
