//! Which models to load where before requests ask for them: pure planning over remembered demand and
//! the nodes' speeds and limits. No IO, no clocks.
//!
//! The coordinator's history says how often each model was asked for; the learned figures say how fast
//! each node serves it. [`plan`] spreads the models in demand over the nodes the router would pick for
//! them (those not much slower than the best), a model's share of the warm capacity following its share
//! of the demand, within each node's limit of loaded models. The caller loads the pairs in the order
//! given, one at a time per node, and only on idle nodes.

/// How often a model was asked for in the remembered window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demand {
    pub model: String,
    pub requests: u64,
}

/// One node as warm-up planning sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct WarmNode {
    pub name: String,
    /// Models on the node's disk (warm-up never pulls).
    pub models: Vec<String>,
    /// Models loaded now.
    pub loaded: Vec<String>,
    /// Models the node keeps loaded at once (the most it was seen holding; at least 1).
    pub capacity: usize,
    /// Requests it runs at once.
    pub slots: u32,
    /// Learned generation speed per model (tokens/s); a model missing here is unmeasured on the node.
    pub speeds: Vec<(String, f64)>,
}

impl WarmNode {
    fn speed(&self, model: &str) -> Option<f64> {
        self.speeds
            .iter()
            .find(|(name, _)| name == model)
            .map(|(_, speed)| *speed)
            .filter(|speed| speed.is_finite() && *speed > 0.0)
    }

    fn has(&self, model: &str) -> bool {
        self.models.iter().any(|name| name == model)
    }
}

/// Limits of warm-up planning (`coordinator.warmup_*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupSettings {
    /// The most models warmed (the most asked-for first).
    pub max_models: usize,
    /// A model is warmed only with at least this many requests in the window…
    pub min_requests: u64,
    /// …and at least this share of all of them (0–1).
    pub min_share: f64,
    /// A node is warmed with a model only if it serves it at least 1/this as fast as the model's
    /// fastest node: slower ones would get its requests only when everything else is full.
    pub max_slowdown: f64,
}

impl Default for WarmupSettings {
    fn default() -> Self {
        Self {
            max_models: 4,
            min_requests: 3,
            min_share: 0.05,
            max_slowdown: 4.0,
        }
    }
}

/// One load to make: `model` on `nodes[node]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Load {
    pub node: usize,
    pub model: String,
}

/// The models worth warming, most asked-for first, with their share of the demand.
pub fn wanted(demand: &[Demand], settings: &WarmupSettings) -> Vec<(String, f64)> {
    let total: u64 = demand.iter().map(|entry| entry.requests).sum();
    if total == 0 {
        return Vec::new();
    }
    let mut wanted: Vec<&Demand> = demand
        .iter()
        .filter(|entry| {
            entry.requests >= settings.min_requests
                && entry.requests as f64 / total as f64 >= settings.min_share
        })
        .collect();
    wanted.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.model.cmp(&b.model)));
    wanted
        .into_iter()
        .take(settings.max_models)
        .map(|entry| (entry.model.clone(), entry.requests as f64 / total as f64))
        .collect()
}

/// Where each wanted model should be loaded, most useful first (models already loaded count as placed
/// and are not listed). Greedy: the model whose share of the warm capacity lags its share of the demand
/// most goes next, onto its fastest eligible node with room.
pub fn plan(demand: &[Demand], nodes: &[WarmNode], settings: &WarmupSettings) -> Vec<Load> {
    let wanted = wanted(demand, settings);
    // Nodes eligible per model: they hold it and are not much slower than its fastest node. Unmeasured
    // nodes are eligible (the router is optimistic about them too), ranked after measured ones.
    let eligible: Vec<Vec<(usize, f64)>> = wanted
        .iter()
        .map(|(model, _)| {
            let best = nodes
                .iter()
                .filter_map(|node| node.speed(model))
                .fold(0.0, f64::max);
            let mut eligible: Vec<(usize, f64)> = nodes
                .iter()
                .enumerate()
                .filter(|(_, node)| node.has(model))
                .filter_map(|(index, node)| match node.speed(model) {
                    Some(speed) if speed * settings.max_slowdown >= best => Some((index, speed)),
                    Some(_) => None,
                    None => Some((index, 0.0)),
                })
                .collect();
            eligible.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            eligible
        })
        .collect();
    // Capacity of a node for a model: its speed times its slots (unmeasured: the slowest eligible).
    let capacity_of = |model: usize, node: usize, speed: f64| {
        let floor = eligible[model]
            .iter()
            .map(|(_, speed)| *speed)
            .filter(|speed| *speed > 0.0)
            .fold(f64::INFINITY, f64::min);
        let speed = if speed > 0.0 {
            speed
        } else if floor.is_finite() {
            floor
        } else {
            1.0
        };
        speed * f64::from(nodes[node].slots.max(1))
    };
    let total_capacity: Vec<f64> = (0..wanted.len())
        .map(|model| {
            eligible[model]
                .iter()
                .map(|(node, speed)| capacity_of(model, *node, *speed))
                .sum::<f64>()
                .max(f64::MIN_POSITIVE)
        })
        .collect();
    let mut holds: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| {
            node.loaded
                .iter()
                .filter(|model| wanted.iter().any(|(name, _)| name == *model))
                .cloned()
                .collect()
        })
        .collect();
    let mut placed: Vec<f64> = wanted
        .iter()
        .enumerate()
        .map(|(model, (name, _))| {
            eligible[model]
                .iter()
                .filter(|(node, _)| holds[*node].contains(name))
                .map(|(node, speed)| capacity_of(model, *node, *speed))
                .sum()
        })
        .collect();
    let mut loads = Vec::new();
    loop {
        let next = wanted
            .iter()
            .enumerate()
            .filter_map(|(model, (name, share))| {
                let (node, speed) = eligible[model].iter().find(|(node, _)| {
                    !holds[*node].contains(name) && holds[*node].len() < nodes[*node].capacity
                })?;
                let lag = share - placed[model] / total_capacity[model];
                Some((lag, model, *node, *speed))
            })
            .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
        let Some((_, model, node, speed)) = next else {
            break;
        };
        let name = &wanted[model].0;
        holds[node].push(name.clone());
        placed[model] += capacity_of(model, node, speed);
        loads.push(Load {
            node,
            model: name.clone(),
        });
    }
    loads
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, speed: f64, slots: u32, capacity: usize) -> WarmNode {
        WarmNode {
            name: name.into(),
            models: vec!["small".into(), "big".into(), "rare".into()],
            loaded: Vec::new(),
            capacity,
            slots,
            speeds: vec![("small".into(), speed), ("big".into(), speed / 2.0)],
        }
    }

    fn demand(pairs: &[(&str, u64)]) -> Vec<Demand> {
        pairs
            .iter()
            .map(|(model, requests)| Demand {
                model: (*model).into(),
                requests: *requests,
            })
            .collect()
    }

    fn names(loads: &[Load], nodes: &[WarmNode]) -> Vec<String> {
        loads
            .iter()
            .map(|load| format!("{}:{}", nodes[load.node].name, load.model))
            .collect()
    }

    #[test]
    fn demand_is_spread_over_the_nodes_the_router_would_pick() {
        let nodes = vec![
            node("fast", 120.0, 2, 3),
            node("mid1", 40.0, 2, 2),
            node("mid2", 40.0, 2, 1),
            node("slow", 10.0, 1, 1),
        ];
        let loads = plan(
            &demand(&[("small", 84), ("big", 36)]),
            &nodes,
            &WarmupSettings::default(),
        );
        assert_eq!(
            names(&loads, &nodes),
            [
                "fast:small",
                "fast:big",
                "mid1:small",
                "mid2:small",
                "mid1:big"
            ],
            "the slow node (12x slower) is left cold; the most-asked model goes first"
        );
    }

    #[test]
    fn rare_models_and_tiny_histories_warm_nothing() {
        let nodes = vec![node("fast", 120.0, 2, 3)];
        let settings = WarmupSettings::default();
        assert!(plan(&demand(&[("small", 2)]), &nodes, &settings).is_empty());
        let loads = plan(&demand(&[("small", 100), ("rare", 3)]), &nodes, &settings);
        assert_eq!(
            names(&loads, &nodes),
            ["fast:small"],
            "3 of 103 is under 5%"
        );
        assert!(plan(&[], &nodes, &settings).is_empty());
    }

    #[test]
    fn loaded_models_count_as_placed_and_limits_hold() {
        let mut fast = node("fast", 120.0, 2, 2);
        fast.loaded = vec!["small".into(), "other".into()];
        let mut mid = node("mid", 40.0, 2, 1);
        mid.models = vec!["big".into()];
        let nodes = vec![fast, mid];
        let loads = plan(
            &demand(&[("small", 50), ("big", 50)]),
            &nodes,
            &WarmupSettings::default(),
        );
        // A model out of demand holds no place: big may take its room on fast.
        assert_eq!(names(&loads, &nodes), ["fast:big", "mid:big"]);
        assert!(
            !loads
                .iter()
                .any(|load| load.node == 0 && load.model == "small")
        );
    }

    #[test]
    fn unmeasured_nodes_are_eligible_after_measured_ones() {
        let mut new = node("new", 0.0, 1, 1);
        new.speeds.clear();
        let nodes = vec![new, node("fast", 100.0, 1, 1)];
        let loads = plan(
            &demand(&[("small", 10)]),
            &nodes,
            &WarmupSettings::default(),
        );
        assert_eq!(names(&loads, &nodes), ["fast:small", "new:small"]);
    }
}
