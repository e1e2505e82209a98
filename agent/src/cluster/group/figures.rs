//! A coordinator's [`Figures`] as the gossip's key-value state (text keys and values, written only by
//! their owner), and back. Floats are written in Rust's shortest round-trip form, so every
//! coordinator reads the very bits the owner holds.

use std::collections::BTreeMap;
use std::time::Duration;

use sollol_policy::group::Figures;
use sollol_policy::routing::PairStats;

pub const PAIR: &str = "pair/";
pub const SLOTS: &str = "slots/";
pub const LOAD: &str = "load/";
pub const OPEN: &str = "open/";
pub const WARM: &str = "warm/";

/// The key-value form of `figures`. Nodes with nothing in flight, nothing open or nothing loading
/// keep their keys with an empty or zero value, so a change is an update, never a deletion.
pub fn encode(figures: &Figures, known_nodes: &[String]) -> BTreeMap<String, String> {
    let mut entries = BTreeMap::new();
    for ((node, model), stats) in &figures.pairs {
        entries.insert(format!("{PAIR}{node}/{model}"), encode_pair(stats));
    }
    for (node, slots) in &figures.slots {
        entries.insert(format!("{SLOTS}{node}"), slots.to_string());
    }
    for node in known_nodes
        .iter()
        .chain(figures.in_flight.keys())
        .chain(figures.open_breakers.iter())
        .chain(figures.warming.iter().map(|(node, _, _)| node))
    {
        let in_flight = figures.in_flight.get(node).copied().unwrap_or(0);
        entries.insert(format!("{LOAD}{node}"), in_flight.to_string());
        let open = figures.open_breakers.contains(node);
        entries.insert(
            format!("{OPEN}{node}"),
            if open { "1" } else { "0" }.to_owned(),
        );
        let warming: Vec<String> = figures
            .warming
            .iter()
            .filter(|(warming_node, _, _)| warming_node == node)
            .map(|(_, model, remaining)| format!("{} {model}", remaining.as_millis()))
            .collect();
        entries.insert(format!("{WARM}{node}"), warming.join("\n"));
    }
    entries
}

fn encode_pair(stats: &PairStats) -> String {
    let cold = stats
        .cold_load
        .map_or_else(|| "-".to_owned(), |cold| cold.as_secs_f64().to_string());
    format!(
        "{} {} {} {} {}",
        stats.samples,
        stats.decode_tokens_per_second,
        stats.prompt_tokens_per_second,
        stats.time_to_first_token.as_secs_f64(),
        cold
    )
}

fn decode_pair(text: &str) -> Option<PairStats> {
    let mut fields = text.split(' ');
    let samples = fields.next()?.parse().ok()?;
    let decode: f64 = fields.next()?.parse().ok()?;
    let prompt: f64 = fields.next()?.parse().ok()?;
    let first_token = seconds(fields.next()?)?;
    let cold = match fields.next()? {
        "-" => None,
        text => Some(seconds(text)?),
    };
    if fields.next().is_some() || !decode.is_finite() || !prompt.is_finite() {
        return None;
    }
    Some(PairStats {
        decode_tokens_per_second: decode,
        prompt_tokens_per_second: prompt,
        cold_load: cold,
        time_to_first_token: first_token,
        samples,
    })
}

fn seconds(text: &str) -> Option<Duration> {
    let seconds: f64 = text.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// Reads another coordinator's figures from its key-value state; entries that do not parse are
/// skipped.
pub fn decode<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> Figures {
    let mut figures = Figures::default();
    for (key, value) in entries {
        if let Some(rest) = key.strip_prefix(PAIR) {
            let Some((node, model)) = rest.split_once('/') else {
                continue;
            };
            if let Some(stats) = decode_pair(value) {
                figures
                    .pairs
                    .insert((node.to_owned(), model.to_owned()), stats);
            }
        } else if let Some(node) = key.strip_prefix(SLOTS) {
            if let Ok(slots) = value.parse() {
                figures.slots.insert(node.to_owned(), slots);
            }
        } else if let Some(node) = key.strip_prefix(LOAD) {
            if let Ok(count) = value.parse::<u32>()
                && count > 0
            {
                figures.in_flight.insert(node.to_owned(), count);
            }
        } else if let Some(node) = key.strip_prefix(OPEN) {
            if value == "1" {
                figures.open_breakers.push(node.to_owned());
            }
        } else if let Some(node) = key.strip_prefix(WARM) {
            for line in value.split('\n') {
                if let Some((millis, model)) = line.split_once(' ')
                    && let Ok(millis) = millis.parse()
                {
                    figures.warming.push((
                        node.to_owned(),
                        model.to_owned(),
                        Duration::from_millis(millis),
                    ));
                }
            }
        }
    }
    figures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_survive_the_key_value_form_to_the_bit() {
        let mut figures = Figures::default();
        figures.pairs.insert(
            ("n1".into(), "llama3.2:1b".into()),
            PairStats {
                decode_tokens_per_second: 41.123_456_789_012_34,
                prompt_tokens_per_second: 1e-7,
                cold_load: Some(Duration::from_nanos(1_234_567_891)),
                time_to_first_token: Duration::from_micros(98_765),
                samples: 12,
            },
        );
        figures.pairs.insert(
            ("n2".into(), "library/x:tag".into()),
            PairStats {
                decode_tokens_per_second: 3.0,
                prompt_tokens_per_second: 30.0,
                cold_load: None,
                time_to_first_token: Duration::ZERO,
                samples: 1,
            },
        );
        figures.slots.insert("n1".into(), 4);
        figures.in_flight.insert("n1".into(), 3);
        figures.open_breakers.push("n2".into());
        figures
            .warming
            .push(("n1".into(), "a:b".into(), Duration::from_millis(1500)));
        figures
            .warming
            .push(("n1".into(), "c:d".into(), Duration::ZERO));
        let entries = encode(&figures, &["n3".to_owned()]);
        assert_eq!(entries["load/n3"], "0");
        let decoded = decode(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let original = &figures.pairs[&("n1".to_owned(), "llama3.2:1b".to_owned())];
        let read = &decoded.pairs[&("n1".to_owned(), "llama3.2:1b".to_owned())];
        assert_eq!(
            read.decode_tokens_per_second.to_bits(),
            original.decode_tokens_per_second.to_bits()
        );
        assert_eq!(read.cold_load, original.cold_load);
        assert_eq!(decoded.pairs.len(), 2);
        assert_eq!(decoded.slots, figures.slots);
        assert_eq!(decoded.in_flight, figures.in_flight);
        assert_eq!(decoded.open_breakers, figures.open_breakers);
        assert_eq!(decoded.warming, figures.warming);
    }

    #[test]
    fn odd_values_are_skipped_not_trusted() {
        let entries = [
            ("pair/n1/m", "1 NaN 2 0.1 -"),
            ("pair/n1/m2", "1 2 3 -5 -"),
            ("pair/n1", "1 2 3 0.1 -"),
            ("pair/n1/m3", "1 2 3 0.1 - extra"),
            ("load/n1", "-3"),
            ("slots/n1", "many"),
            ("warm/n1", "soon m"),
            ("meta.name", "x"),
        ];
        let figures = decode(entries);
        assert_eq!(figures, Figures::default());
    }
}
