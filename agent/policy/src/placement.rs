//! Where a model goes when a client asks the cluster to pull it without naming nodes (or the coordinator
//! adds copies to keep `models.replicas`): the nodes that lack it, with room for it, fastest and roomiest
//! first. Pure: the gateway gathers the figures, this orders them.

use std::cmp::Ordering;

/// One node, as placement sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Site {
    /// The node already lists the model.
    pub holds_model: bool,
    /// Memory a model could use: free GPU memory plus available RAM (or the agent's cap), when known.
    pub free_memory: Option<u64>,
    /// Free space where models are stored, when known.
    pub free_disk: Option<u64>,
    /// The model's size, when the cluster knows it from another node: a node with less free disk is
    /// placed last, and one with less free memory after those that can hold it.
    pub needed_disk: Option<u64>,
    /// How fast the node generated with the models it served (tokens per second, learned from
    /// Ollama's timings), when it served any.
    pub speed: Option<f64>,
}

impl Site {
    /// Whether the model would not fit on the node's disk, as far as anyone knows.
    fn too_full(&self) -> bool {
        matches!((self.free_disk, self.needed_disk), (Some(free), Some(needed)) if free < needed)
    }

    /// Whether the model would not fit in the node's free memory, as far as anyone knows.
    fn too_small(&self) -> bool {
        matches!((self.free_memory, self.needed_disk), (Some(free), Some(needed)) if free < needed)
    }
}

/// The `count` best nodes for a new copy of a model, best first: nodes that lack it before nodes that
/// hold it, nodes with room on disk before nodes without, nodes with the memory to run it before nodes
/// without, then the fastest learned generation (known before unknown), then the most free memory (known
/// figures before unknown ones), then the most free disk, then the order given.
pub fn choose(sites: &[Site], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sites.len()).collect();
    order.sort_by(|&a, &b| compare(&sites[a], &sites[b]).then(a.cmp(&b)));
    order.truncate(count);
    order
}

fn compare(a: &Site, b: &Site) -> Ordering {
    let more = |x: Option<u64>, y: Option<u64>| match (x, y) {
        (Some(x), Some(y)) => y.cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    let faster = match (a.speed, b.speed) {
        (Some(x), Some(y)) => y.total_cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    a.holds_model
        .cmp(&b.holds_model)
        .then(a.too_full().cmp(&b.too_full()))
        .then(a.too_small().cmp(&b.too_small()))
        .then(faster)
        .then(more(a.free_memory, b.free_memory))
        .then(more(a.free_disk, b.free_disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(holds_model: bool, free_memory: Option<u64>, free_disk: Option<u64>) -> Site {
        Site {
            holds_model,
            free_memory,
            free_disk,
            needed_disk: Some(100),
            speed: None,
        }
    }

    #[test]
    fn among_nodes_that_can_hold_it_the_fastest_comes_first() {
        let fast = |speed: f64, free_memory: u64| Site {
            speed: Some(speed),
            ..site(false, Some(free_memory), Some(1000))
        };
        let sites = [
            fast(20.0, 5000),
            fast(80.0, 200),
            // The fastest node, without the memory for the model: after those that have it.
            fast(200.0, 50),
            site(false, Some(9000), Some(1000)),
        ];
        assert_eq!(choose(&sites, 4), vec![1, 0, 3, 2]);
    }

    #[test]
    fn nodes_that_lack_the_model_come_first_roomiest_first() {
        let sites = [
            site(true, Some(1000), Some(1000)),
            site(false, Some(10), Some(1000)),
            site(false, Some(500), Some(1000)),
            site(false, None, None),
        ];
        // Node 1's 10 bytes free cannot hold the model's 100: it comes after the node nothing is known of.
        assert_eq!(choose(&sites, 4), vec![2, 3, 1, 0]);
        assert_eq!(choose(&sites, 1), vec![2]);
    }

    #[test]
    fn a_node_without_room_on_disk_comes_after_those_with_room() {
        let sites = [
            site(false, Some(1000), Some(50)),
            site(false, Some(10), Some(200)),
        ];
        assert_eq!(choose(&sites, 2), vec![1, 0]);
    }

    #[test]
    fn ties_keep_the_given_order() {
        let sites = [site(false, None, None), site(false, None, None)];
        assert_eq!(choose(&sites, 5), vec![0, 1]);
        assert_eq!(choose(&[], 3), Vec::<usize>::new());
    }
}
