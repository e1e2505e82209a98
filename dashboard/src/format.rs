//! Pure formatting and chart geometry: no browser, so unit-tested natively.

/// `1.5 GiB`, `512 MiB`, `0 B`.
pub fn bytes(value: u64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    const MIB: f64 = 1024.0 * 1024.0;
    let value = value as f64;
    if value >= GIB {
        format!("{:.1} GiB", value / GIB)
    } else if value >= MIB {
        format!("{:.0} MiB", value / MIB)
    } else {
        format!("{value:.0} B")
    }
}

/// `850 ms`, `1.42 s`, `2 min 5 s`.
pub fn millis(value: u64) -> String {
    if value < 1000 {
        format!("{value} ms")
    } else if value < 60_000 {
        format!("{:.2} s", value as f64 / 1000.0)
    } else {
        format!("{} min {} s", value / 60_000, value % 60_000 / 1000)
    }
}

/// How long ago `then_ms` was at `now_ms`: `just now`, `12 s ago`, `3 min ago`, `2 h ago`.
pub fn ago(now_ms: f64, then_ms: u64) -> String {
    let seconds = ((now_ms - then_ms as f64) / 1000.0).max(0.0) as u64;
    match seconds {
        0..=1 => "just now".to_owned(),
        2..=119 => format!("{seconds} s ago"),
        120..=7199 => format!("{} min ago", seconds / 60),
        _ => format!("{} h ago", seconds / 3600),
    }
}

/// A share of a whole as a percentage for a bar, clamped to 0–100.
pub fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 && part.is_finite() {
        (part / whole * 100.0).clamp(0.0, 100.0)
    } else {
        0.0
    }
}

/// SVG `points` of a line over `values` (missing values break nothing: they are skipped), scaled to
/// `width` × `height` with `top` as the value at the top edge.
pub fn polyline(values: &[Option<f64>], width: f64, height: f64, top: f64) -> String {
    points(values, width, height, top)
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The (x, y) of each present value, placed as [`polyline`] places them.
pub fn points(values: &[Option<f64>], width: f64, height: f64, top: f64) -> Vec<(f64, f64)> {
    let count = values.len();
    if count == 0 || top <= 0.0 {
        return Vec::new();
    }
    let step = if count > 1 {
        width / (count - 1) as f64
    } else {
        0.0
    };
    values
        .iter()
        .enumerate()
        .filter_map(|(index, value)| {
            let value = (*value)?;
            Some((
                index as f64 * step,
                height - (value / top).clamp(0.0, 1.0) * height,
            ))
        })
        .collect()
}

/// A round upper bound for a chart's axis: 1, 2 or 5 times a power of ten, at least `max`.
pub fn nice_top(max: f64) -> f64 {
    if !max.is_finite() || max <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|factor| factor * magnitude)
        .find(|candidate| *candidate >= max)
        .unwrap_or(10.0 * magnitude)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_naturally() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(512 * 1024 * 1024), "512 MiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
        assert_eq!(millis(850), "850 ms");
        assert_eq!(millis(1420), "1.42 s");
        assert_eq!(millis(125_000), "2 min 5 s");
        assert_eq!(ago(10_000.0, 9_500), "just now");
        assert_eq!(ago(60_000.0, 48_000), "12 s ago");
        assert_eq!(ago(1_000_000.0, 800_000), "3 min ago");
    }

    #[test]
    fn bars_and_axes_stay_in_range() {
        assert_eq!(percent(5.0, 10.0), 50.0);
        assert_eq!(percent(20.0, 10.0), 100.0);
        assert_eq!(percent(1.0, 0.0), 0.0);
        assert_eq!(nice_top(0.0), 1.0);
        assert_eq!(nice_top(3.2), 5.0);
        assert_eq!(nice_top(120.0), 200.0);
        assert_eq!(nice_top(1000.0), 1000.0);
    }

    #[test]
    fn lines_skip_missing_points() {
        assert_eq!(
            polyline(&[Some(0.0), None, Some(10.0)], 100.0, 50.0, 10.0),
            "0.0,50.0 100.0,0.0"
        );
        assert_eq!(polyline(&[], 100.0, 50.0, 10.0), "");
    }
}
