//! Who is up: a node's status from the time since its last report. Pure code: no IO, not async.

use std::time::Duration;

use sollol_shared::api::NodeStatus;

/// What the coordinator knows about one node when it judges its health.
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    /// Time since the last frame from the node, or since the coordinator started for a node only remembered.
    pub since_last_report: Duration,
    pub heartbeat_interval: Duration,
    pub connected: bool,
    /// The node said goodbye and has not come back.
    pub left: bool,
}

/// `down` after `down_after_missed` intervals of silence; `suspect` after one and a half, or as soon as the connection drops.
pub fn status(liveness: Liveness, down_after_missed: u32) -> NodeStatus {
    if liveness.left {
        return NodeStatus::Left;
    }
    let down_after = liveness
        .heartbeat_interval
        .saturating_mul(down_after_missed);
    let suspect_after = liveness.heartbeat_interval.saturating_mul(3) / 2;
    if liveness.since_last_report >= down_after {
        NodeStatus::Down
    } else if !liveness.connected || liveness.since_last_report >= suspect_after {
        NodeStatus::Suspect
    } else {
        NodeStatus::Up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        fn check(since_ms: u64, connected: bool, left: bool, expected: NodeStatus) {
            let liveness = Liveness {
                since_last_report: Duration::from_millis(since_ms),
                heartbeat_interval: Duration::from_millis(1000),
                connected,
                left,
            };
            assert_eq!(status(liveness, 3), expected, "{liveness:?}");
        }
        check(0, true, false, NodeStatus::Up);
        check(1499, true, false, NodeStatus::Up);
        check(1500, true, false, NodeStatus::Suspect);
        check(2999, true, false, NodeStatus::Suspect);
        check(3000, true, false, NodeStatus::Down);
        check(100, false, false, NodeStatus::Suspect);
        check(3000, false, false, NodeStatus::Down);
        check(0, false, true, NodeStatus::Left);
        check(999_999, false, true, NodeStatus::Left);
    }

    #[test]
    fn huge_intervals_do_not_overflow() {
        let liveness = Liveness {
            since_last_report: Duration::MAX,
            heartbeat_interval: Duration::MAX,
            connected: true,
            left: false,
        };
        assert_eq!(status(liveness, 3), NodeStatus::Down);
    }
}
