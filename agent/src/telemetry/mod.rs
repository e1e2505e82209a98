//! Hardware and Ollama probes: what the agent reports in every heartbeat. Probes never fail the agent.

pub mod gpu;
pub mod ollama;
pub mod procfs;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use sollol_shared::hardware::{HardwareReport, NodeReport};

use self::gpu::GpuProbe;
use self::ollama::OllamaProbe;
use self::procfs::ProcFs;

/// Takes samples of the machine: system figures from procfs, GPUs from whichever probes found hardware, Ollama over HTTP.
pub struct Sampler {
    procfs: ProcFs,
    gpus: Vec<Box<dyn GpuProbe>>,
    ollama: OllamaProbe,
    models_dir: PathBuf,
    /// The agent's stage port, reported with every sample.
    pub stage_address: Option<String>,
    /// `engine.max_memory`, reported with every sample.
    pub memory_limit: Option<u64>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("procfs", &self.procfs)
            .field(
                "gpus",
                &self
                    .gpus
                    .iter()
                    .map(|probe| probe.name())
                    .collect::<Vec<_>>(),
            )
            .field("ollama", &self.ollama)
            .field("models_dir", &self.models_dir)
            .finish()
    }
}

impl Sampler {
    /// Probes the real machine.
    pub fn detect(models_dir: PathBuf, ollama_url: Option<&str>) -> Self {
        let procfs = ProcFs::new("/");
        let gpus = gpu::detect(&procfs);
        Self {
            procfs,
            gpus,
            ollama: OllamaProbe::new(ollama_url),
            models_dir,
            stage_address: None,
            memory_limit: None,
        }
    }

    /// The hardware part of a report. Blocking file IO (and NVML calls): run it off the async workers.
    pub fn hardware(&mut self) -> HardwareReport {
        HardwareReport {
            cpu: self.procfs.cpu(),
            memory: self.procfs.memory(),
            disk: procfs::disk(&self.models_dir),
            temperatures: self.procfs.temperatures(),
            gpus: self
                .gpus
                .iter_mut()
                .flat_map(|probe| probe.sample())
                .collect(),
        }
    }

    pub fn ollama_probe(&self) -> OllamaProbe {
        self.ollama.clone()
    }
}

/// Builds a report from a hardware sample and an Ollama sample taken now.
pub fn report(
    hardware: HardwareReport,
    ollama: Option<sollol_shared::hardware::OllamaState>,
    stage_address: Option<String>,
    memory_limit_bytes: Option<u64>,
) -> NodeReport {
    NodeReport {
        sampled_at_ms: unix_ms(SystemTime::now()),
        hardware,
        ollama,
        stage_address,
        memory_limit_bytes,
    }
}

/// The node's available memory now (`MemAvailable`), 0 when unknown.
pub fn available_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .map(|text| procfs::parse_meminfo(&text).available_bytes)
        .unwrap_or(0)
}

pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RAM figures agree with the kernel's own `sysinfo(2)` within 5%.
    #[test]
    fn ram_agrees_with_sysinfo() {
        let mut sampler = Sampler::detect(std::env::temp_dir(), None);
        let hardware = sampler.hardware();
        let info = rustix::system::sysinfo();
        let unit = u64::from(info.mem_unit.max(1));
        let kernel_total = info.totalram as u64 * unit;
        let kernel_free = (info.freeram as u64 + info.bufferram as u64) * unit;
        let total = hardware.memory.total_bytes;
        let ratio = total as f64 / kernel_total as f64;
        assert!(
            (0.95..=1.05).contains(&ratio),
            "total {total} vs sysinfo {kernel_total}"
        );
        // Available memory counts reclaimable caches too, so it is at least free memory (less 5%) and at most the total.
        assert!(
            hardware.memory.available_bytes as f64
                >= kernel_free as f64 * 0.95 - 64.0 * 1024.0 * 1024.0
        );
        assert!(hardware.memory.available_bytes <= total);
        // And with /proc/meminfo read here, independently of the probe's parser.
        let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
        let kib = |name: &str| -> u64 {
            let line = meminfo
                .lines()
                .find(|line| line.starts_with(name))
                .expect("field");
            line.split_whitespace()
                .nth(1)
                .expect("value")
                .parse::<u64>()
                .expect("number")
                * 1024
        };
        let within_5_percent =
            |ours: u64, theirs: u64| (ours as f64 - theirs as f64).abs() <= theirs as f64 * 0.05;
        assert!(within_5_percent(total, kib("MemTotal:")));
        assert!(within_5_percent(
            hardware.memory.available_bytes,
            kib("MemAvailable:")
        ));
        assert!(hardware.cpu.logical_cores >= 1);
        assert_ne!(hardware.cpu.model, "");
        assert!(hardware.disk.is_some());
        // The second sample, a few clock ticks later, has a utilisation figure.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let second = sampler.hardware();
        assert!(second.cpu.utilisation_percent.is_some());
    }
}
