//! GPU probes behind one trait: NVIDIA through NVML loaded at run time, AMD through sysfs, and none.
//!
//! A machine without a GPU, driver or library gets no probe and an empty
//! list; a probe that fails during a sample reports what it could and logs at
//! debug level. Nothing here is compiled conditionally.

use std::path::{Path, PathBuf};

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use sollol_shared::hardware::{GpuInfo, GpuVendor};

use super::procfs::{ProcFs, file_name, parse_millidegrees, read_trimmed};

/// One source of GPU figures.
pub trait GpuProbe: Send {
    fn name(&self) -> &'static str;
    fn sample(&mut self) -> Vec<GpuInfo>;
}

/// Every probe that finds hardware on this machine; empty on a machine without GPUs.
pub fn detect(procfs: &ProcFs) -> Vec<Box<dyn GpuProbe>> {
    let mut probes: Vec<Box<dyn GpuProbe>> = Vec::new();
    match NvmlProbe::load() {
        Ok(probe) => probes.push(Box::new(probe)),
        Err(reason) => tracing::debug!(%reason, "no NVIDIA GPU probe"),
    }
    let amd = AmdSysfsProbe::new(procfs);
    if amd.has_devices() {
        probes.push(Box::new(amd));
    }
    probes
}

/// NVIDIA GPUs through `libnvidia-ml.so`, loaded at run time.
pub struct NvmlProbe {
    nvml: Nvml,
}

impl std::fmt::Debug for NvmlProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NvmlProbe")
    }
}

impl NvmlProbe {
    /// Loads NVML; fails when the library or driver is missing, or no GPU is present.
    pub fn load() -> Result<Self, String> {
        let nvml = Nvml::init().map_err(|error| format!("NVML unavailable: {error}"))?;
        let count = nvml
            .device_count()
            .map_err(|error| format!("NVML device count failed: {error}"))?;
        if count == 0 {
            return Err("NVML loaded but reports no GPU".to_owned());
        }
        Ok(Self { nvml })
    }
}

impl GpuProbe for NvmlProbe {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn sample(&mut self) -> Vec<GpuInfo> {
        let count = self.nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let device = self
                    .nvml
                    .device_by_index(index)
                    .map_err(|error| tracing::debug!(index, %error, "NVML device unavailable"))
                    .ok()?;
                let memory = device.memory_info().ok();
                Some(GpuInfo {
                    vendor: GpuVendor::Nvidia,
                    index,
                    name: device
                        .name()
                        .unwrap_or_else(|_| format!("NVIDIA GPU {index}")),
                    vram_total_bytes: memory.as_ref().map_or(0, |memory| memory.total),
                    vram_used_bytes: memory.as_ref().map_or(0, |memory| memory.used),
                    utilisation_percent: device
                        .utilization_rates()
                        .ok()
                        .map(|rates| rates.gpu as f32),
                    temperature_celsius: device
                        .temperature(TemperatureSensor::Gpu)
                        .ok()
                        .map(|celsius| celsius as f32),
                })
            })
            .collect()
    }
}

/// AMD GPUs through the amdgpu driver's sysfs files (`/sys/class/drm/card*/device/mem_info_vram_*`).
#[derive(Debug)]
pub struct AmdSysfsProbe {
    cards: Vec<PathBuf>,
}

impl AmdSysfsProbe {
    pub fn new(procfs: &ProcFs) -> Self {
        let cards = procfs
            .entries("sys/class/drm", "card")
            .into_iter()
            .filter(|card| {
                // card0-DP-1 and friends are connectors, not devices.
                !file_name(card).contains('-') && card.join("device/mem_info_vram_total").exists()
            })
            .collect();
        Self { cards }
    }

    pub fn has_devices(&self) -> bool {
        !self.cards.is_empty()
    }
}

impl GpuProbe for AmdSysfsProbe {
    fn name(&self) -> &'static str {
        "amd-sysfs"
    }

    fn sample(&mut self) -> Vec<GpuInfo> {
        self.cards
            .iter()
            .enumerate()
            .map(|(index, card)| amd_card(index, card))
            .collect()
    }
}

fn amd_card(index: usize, card: &Path) -> GpuInfo {
    let device = card.join("device");
    let number = |name: &str| read_trimmed(&device.join(name)).parse::<u64>().ok();
    let product = read_trimmed(&device.join("product_name"));
    let temperature_celsius = std::fs::read_dir(device.join("hwmon"))
        .ok()
        .and_then(|mut entries| entries.next())
        .and_then(|entry| entry.ok())
        .and_then(|entry| parse_millidegrees(&read_trimmed(&entry.path().join("temp1_input"))));
    GpuInfo {
        vendor: GpuVendor::Amd,
        index: u32::try_from(index).unwrap_or(u32::MAX),
        name: if product.is_empty() {
            format!("AMD GPU ({})", file_name(card))
        } else {
            product
        },
        vram_total_bytes: number("mem_info_vram_total").unwrap_or(0),
        vram_used_bytes: number("mem_info_vram_used").unwrap_or(0),
        utilisation_percent: number("gpu_busy_percent").map(|percent| percent as f32),
        temperature_celsius,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amd_cards_from_a_fake_sysfs() {
        let root = tempfile::tempdir().expect("tempdir");
        let write = |relative: &str, text: &str| {
            let path = root.path().join(relative);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        };
        write(
            "sys/class/drm/card1/device/mem_info_vram_total",
            "17163091968\n",
        );
        write(
            "sys/class/drm/card1/device/mem_info_vram_used",
            "1073741824\n",
        );
        write("sys/class/drm/card1/device/gpu_busy_percent", "7\n");
        write(
            "sys/class/drm/card1/device/hwmon/hwmon3/temp1_input",
            "52000\n",
        );
        write("sys/class/drm/card1-DP-1/status", "connected\n");
        write("sys/class/drm/card0/device/vendor", "0x8086\n");
        let procfs = ProcFs::new(root.path());
        let mut probe = AmdSysfsProbe::new(&procfs);
        assert!(probe.has_devices());
        let gpus = probe.sample();
        assert_eq!(
            gpus,
            vec![GpuInfo {
                vendor: GpuVendor::Amd,
                index: 0,
                name: "AMD GPU (card1)".into(),
                vram_total_bytes: 17_163_091_968,
                vram_used_bytes: 1_073_741_824,
                utilisation_percent: Some(7.0),
                temperature_celsius: Some(52.0),
            }]
        );
        assert!(!AmdSysfsProbe::new(&ProcFs::new("/nonexistent")).has_devices());
    }

    /// On a machine without an NVIDIA driver (this CI), NVML gives no probe, and detection gives an empty list.
    #[test]
    fn nvml_without_a_gpu_gives_an_empty_list() {
        let has_nvidia_device = Path::new("/dev/nvidia0").exists();
        let probes = detect(&ProcFs::new("/"));
        let gpus: Vec<GpuInfo> = probes
            .into_iter()
            .flat_map(|mut probe| probe.sample())
            .collect();
        if has_nvidia_device {
            assert!(
                gpus.iter().any(|gpu| gpu.vendor == GpuVendor::Nvidia),
                "{gpus:?}"
            );
        } else {
            assert!(NvmlProbe::load().is_err());
            assert!(
                gpus.iter().all(|gpu| gpu.vendor != GpuVendor::Nvidia),
                "{gpus:?}"
            );
        }
    }
}
