//! Linux system probes read from `/proc` and `/sys` under a configurable root, so tests can point them at a fake tree.
//!
//! Parsing is done by pure functions over file contents; a missing or
//! unreadable file gives an empty or zero figure, never an error.

use std::fs;
use std::path::{Path, PathBuf};

use sollol_shared::hardware::{CpuInfo, DiskInfo, MemoryInfo, TemperatureReading};

/// Readings above this are sensor glitches, not temperatures.
const MAX_PLAUSIBLE_CELSIUS: f32 = 200.0;
const MIN_PLAUSIBLE_CELSIUS: f32 = -50.0;

/// Cumulative CPU time counters from the first line of `/proc/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// Reads system figures from a root that is `/` on a real machine.
#[derive(Debug)]
pub struct ProcFs {
    root: PathBuf,
    previous_cpu_times: Option<CpuTimes>,
}

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            previous_cpu_times: None,
        }
    }

    /// CPU model, core count, load and utilisation since the previous call.
    pub fn cpu(&mut self) -> CpuInfo {
        let cpuinfo = self.read("proc/cpuinfo");
        let (model, processors) = parse_cpuinfo(&cpuinfo);
        let logical_cores = if processors > 0 {
            processors
        } else {
            std::thread::available_parallelism()
                .map(|cores| u32::try_from(cores.get()).unwrap_or(u32::MAX))
                .unwrap_or(1)
        };
        let times = parse_stat(&self.read("proc/stat"));
        let utilisation_percent = match (self.previous_cpu_times, times) {
            (Some(previous), Some(current)) => utilisation(previous, current),
            _ => None,
        };
        self.previous_cpu_times = times;
        CpuInfo {
            model,
            architecture: std::env::consts::ARCH.to_owned(),
            logical_cores,
            load_average: parse_loadavg(&self.read("proc/loadavg")),
            utilisation_percent,
        }
    }

    pub fn memory(&self) -> MemoryInfo {
        parse_meminfo(&self.read("proc/meminfo"))
    }

    /// Thermal zones and hwmon temperature inputs.
    pub fn temperatures(&self) -> Vec<TemperatureReading> {
        let mut readings = Vec::new();
        for zone in self.entries("sys/class/thermal", "thermal_zone") {
            let kind = read_trimmed(&zone.join("type"));
            let name = file_name(&zone);
            let sensor = if kind.is_empty() {
                name
            } else {
                format!("{name} ({kind})")
            };
            if let Some(celsius) = parse_millidegrees(&read_trimmed(&zone.join("temp"))) {
                readings.push(TemperatureReading { sensor, celsius });
            }
        }
        for hwmon in self.entries("sys/class/hwmon", "hwmon") {
            let chip = read_trimmed(&hwmon.join("name"));
            let mut inputs: Vec<PathBuf> = list_dir(&hwmon)
                .into_iter()
                .filter(|path| {
                    let name = file_name(path);
                    name.starts_with("temp") && name.ends_with("_input")
                })
                .collect();
            inputs.sort();
            for input in inputs {
                let Some(celsius) = parse_millidegrees(&read_trimmed(&input)) else {
                    continue;
                };
                let input_name = file_name(&input);
                let label_path = hwmon.join(input_name.replace("_input", "_label"));
                let label = read_trimmed(&label_path);
                let label = if label.is_empty() {
                    input_name.trim_end_matches("_input").to_owned()
                } else {
                    label
                };
                readings.push(TemperatureReading {
                    sensor: format!("{} {chip} {label}", file_name(&hwmon)),
                    celsius,
                });
            }
        }
        readings
    }

    /// Directories under `dir` (relative to the root) whose names start with `prefix`, sorted.
    pub fn entries(&self, dir: &str, prefix: &str) -> Vec<PathBuf> {
        let mut entries: Vec<PathBuf> = list_dir(&self.root.join(dir))
            .into_iter()
            .filter(|path| file_name(path).starts_with(prefix))
            .collect();
        entries.sort();
        entries
    }

    fn read(&self, relative: &str) -> String {
        fs::read_to_string(self.root.join(relative)).unwrap_or_default()
    }
}

/// Free space of the file system holding `path` (or its nearest existing ancestor).
pub fn disk(path: &Path) -> Option<DiskInfo> {
    let existing = path.ancestors().find(|ancestor| ancestor.exists())?;
    let stats = rustix::fs::statvfs(existing).ok()?;
    let fragment = stats.f_frsize.max(1);
    Some(DiskInfo {
        path: path.display().to_string(),
        total_bytes: stats.f_blocks.saturating_mul(fragment),
        available_bytes: stats.f_bavail.saturating_mul(fragment),
    })
}

pub fn parse_meminfo(text: &str) -> MemoryInfo {
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let mut parts = rest.split_whitespace();
            let value: u64 = parts.next()?.parse().ok()?;
            let multiplier = match parts.next() {
                Some("kB") => 1024,
                _ => 1,
            };
            Some(value.saturating_mul(multiplier))
        })
    };
    let available = field("MemAvailable").unwrap_or_else(|| {
        // Kernels before 3.14 have no MemAvailable; this is the usual approximation.
        field("MemFree").unwrap_or(0) + field("Buffers").unwrap_or(0) + field("Cached").unwrap_or(0)
    });
    MemoryInfo {
        total_bytes: field("MemTotal").unwrap_or(0),
        available_bytes: available,
        swap_total_bytes: field("SwapTotal").unwrap_or(0),
        swap_free_bytes: field("SwapFree").unwrap_or(0),
    }
}

/// The CPU model name and the number of `processor` entries.
pub fn parse_cpuinfo(text: &str) -> (String, u32) {
    let mut model = None;
    let mut processors = 0u32;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim();
        let value = value.trim();
        if key == "processor" {
            processors += 1;
        }
        // x86 names the model per processor; ARM boards name it once as Model or Hardware.
        let is_model_key = matches!(
            key,
            "model name" | "Model" | "Hardware" | "cpu model" | "cpu"
        );
        if is_model_key && !value.is_empty() && model.is_none() {
            model = Some(value.to_owned());
        }
    }
    (model.unwrap_or_else(|| "unknown".to_owned()), processors)
}

pub fn parse_loadavg(text: &str) -> [f32; 3] {
    let mut values = text
        .split_whitespace()
        .map(|part| part.parse::<f32>().unwrap_or(0.0));
    [
        values.next().unwrap_or(0.0),
        values.next().unwrap_or(0.0),
        values.next().unwrap_or(0.0),
    ]
}

pub fn parse_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|line| line.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|part| part.parse().ok())
        .collect();
    if values.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal; guest time is already inside user.
    let total: u64 = values.iter().take(8).sum();
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

pub fn utilisation(previous: CpuTimes, current: CpuTimes) -> Option<f32> {
    let total = current.total.checked_sub(previous.total)?;
    let busy = current.busy.checked_sub(previous.busy)?;
    if total == 0 {
        return None;
    }
    Some((busy as f64 / total as f64 * 100.0).clamp(0.0, 100.0) as f32)
}

/// Sysfs temperatures are millidegrees Celsius.
pub fn parse_millidegrees(text: &str) -> Option<f32> {
    let value: i64 = text.trim().parse().ok()?;
    let celsius = value as f32 / 1000.0;
    (MIN_PLAUSIBLE_CELSIUS..=MAX_PLAUSIBLE_CELSIUS)
        .contains(&celsius)
        .then_some(celsius)
}

pub fn read_trimmed(path: &Path) -> String {
    fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}

pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn list_dir(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let text = "MemTotal:        8000000 kB\nMemFree:  100 kB\nMemAvailable:    6000000 kB\nSwapTotal: 2048 kB\nSwapFree: 1024 kB\n";
        let memory = parse_meminfo(text);
        assert_eq!(memory.total_bytes, 8_000_000 * 1024);
        assert_eq!(memory.available_bytes, 6_000_000 * 1024);
        assert_eq!(memory.swap_total_bytes, 2048 * 1024);
        assert_eq!(memory.swap_free_bytes, 1024 * 1024);
        let old_kernel =
            parse_meminfo("MemTotal: 10 kB\nMemFree: 1 kB\nBuffers: 2 kB\nCached: 3 kB\n");
        assert_eq!(old_kernel.available_bytes, 6 * 1024);
        assert_eq!(parse_meminfo(""), MemoryInfo::default());
    }

    #[test]
    fn cpuinfo_models() {
        fn check(text: &str, model: &str, processors: u32) {
            assert_eq!(parse_cpuinfo(text), (model.to_owned(), processors));
        }
        check(
            "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R)\n",
            "Intel(R) Xeon(R)",
            2,
        );
        check(
            "processor\t: 0\nBogoMIPS\t: 108.00\nprocessor\t: 1\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n",
            "BCM2835",
            2,
        );
        check("", "unknown", 0);
    }

    #[test]
    fn stat_and_utilisation() {
        let first = parse_stat("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n").expect("stat");
        assert_eq!(
            first,
            CpuTimes {
                busy: 200,
                total: 1000
            }
        );
        let second = parse_stat("cpu  150 0 150 900 0 0 0 0 0 0\n").expect("stat");
        assert_eq!(utilisation(first, second), Some(50.0));
        assert_eq!(utilisation(second, first), None);
        assert_eq!(utilisation(first, first), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn loadavg_and_temperatures() {
        assert_eq!(
            parse_loadavg("0.52 0.58 0.59 1/467 12345\n"),
            [0.52, 0.58, 0.59]
        );
        assert_eq!(parse_loadavg(""), [0.0; 3]);
        assert_eq!(parse_millidegrees("48500\n"), Some(48.5));
        assert_eq!(parse_millidegrees("-273000"), None);
        assert_eq!(parse_millidegrees("999999"), None);
        assert_eq!(parse_millidegrees("n/a"), None);
    }

    /// A fake board: one thermal zone, one hwmon chip with a label and one without, and a bogus sensor.
    #[test]
    fn sensors_from_a_fake_tree() {
        let root = tempfile::tempdir().expect("tempdir");
        let write = |relative: &str, text: &str| {
            let path = root.path().join(relative);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(path, text).expect("write");
        };
        write("sys/class/thermal/thermal_zone0/type", "cpu-thermal\n");
        write("sys/class/thermal/thermal_zone0/temp", "51234\n");
        write("sys/class/thermal/thermal_zone1/temp", "garbage\n");
        write("sys/class/hwmon/hwmon0/name", "k10temp\n");
        write("sys/class/hwmon/hwmon0/temp1_input", "45000\n");
        write("sys/class/hwmon/hwmon0/temp1_label", "Tctl\n");
        write("sys/class/hwmon/hwmon0/temp2_input", "40000\n");
        write("proc/meminfo", "MemTotal: 4 kB\nMemAvailable: 2 kB\n");
        write("proc/cpuinfo", "processor : 0\nModel : Raspberry Pi 4\n");
        write("proc/loadavg", "1.00 2.00 3.00 1/1 1\n");
        let mut probe = ProcFs::new(root.path());
        let readings = probe.temperatures();
        let summary: Vec<(String, f32)> = readings
            .into_iter()
            .map(|reading| (reading.sensor, reading.celsius))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("thermal_zone0 (cpu-thermal)".to_owned(), 51.234),
                ("hwmon0 k10temp Tctl".to_owned(), 45.0),
                ("hwmon0 k10temp temp2".to_owned(), 40.0),
            ]
        );
        assert_eq!(probe.memory().total_bytes, 4096);
        let cpu = probe.cpu();
        assert_eq!(cpu.model, "Raspberry Pi 4");
        assert_eq!(cpu.logical_cores, 1);
        assert_eq!(cpu.load_average, [1.0, 2.0, 3.0]);
        assert_eq!(cpu.utilisation_percent, None);
    }

    #[test]
    fn disk_of_a_missing_path_uses_its_ancestor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = disk(&dir.path().join("not/yet/created")).expect("statvfs");
        assert!(disk.total_bytes > 0);
        assert!(disk.available_bytes <= disk.total_bytes);
    }
}
