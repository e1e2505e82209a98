//! What memory this node has and offers: available now, this process's resident set, and the share
//! offered to models within `engine.max_memory`.

use super::Stage;

/// The memory a node offers to models: what it has `available`, within its `engine.max_memory`
/// (`limit`). The stage offers this to a plan, and the coordinator ranks and judges nodes by it, so that
/// both sides count the same memory.
pub fn offered_memory(available: u64, limit: Option<u64>) -> u64 {
    limit.map_or(available, |limit| available.min(limit))
}

impl Stage {
    /// The memory this node offers to a part now: what it has available, within `engine.max_memory`.
    pub(super) fn offered_memory(&self) -> u64 {
        offered_memory(
            crate::telemetry::available_memory_bytes(),
            self.settings.memory_limit,
        )
    }
}

/// This process's resident memory (`VmRSS`), 0 when unknown.
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_offers_its_available_memory_within_its_limit() {
        assert_eq!(offered_memory(4000, None), 4000);
        assert_eq!(offered_memory(4000, Some(64)), 64);
        assert_eq!(offered_memory(50, Some(64)), 50);
    }
}
