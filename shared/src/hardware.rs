//! What an agent reports about its machine: CPU, memory, disk, temperatures, GPUs and the local Ollama.
//!
//! Byte counts are `u64` bytes and temperatures degrees Celsius; every field is
//! a measurement, and a figure the machine does not expose is `None` or an
//! empty list rather than a guess.

use serde::{Deserialize, Serialize};

/// One sample of a node's hardware and Ollama state, sent with every heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// When the agent took the sample, in milliseconds since the Unix epoch (agent clock).
    pub sampled_at_ms: u64,
    pub hardware: HardwareReport,
    /// `None` when no Ollama URL is configured and none answers on the default address.
    pub ollama: Option<OllamaState>,
    /// The agent's stage port for distributed inference, `HOST:PORT` as it is bound (an unspecified
    /// host means the coordinator uses the address the agent connects from).
    pub stage_address: Option<String>,
    /// The most memory the agent offers to models (`engine.max_memory`), when it is capped.
    pub memory_limit_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HardwareReport {
    pub cpu: CpuInfo,
    pub memory: MemoryInfo,
    /// Free space of the file system that holds the agent's model directory.
    pub disk: Option<DiskInfo>,
    pub temperatures: Vec<TemperatureReading>,
    pub gpus: Vec<GpuInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// The CPU model as the kernel names it (`model name`, or `Model`/`Hardware` on ARM boards).
    pub model: String,
    pub architecture: String,
    pub logical_cores: u32,
    /// Load averages over 1, 5 and 15 minutes.
    pub load_average: [f32; 3],
    /// Share of all cores busy since the previous sample, 0–100; `None` on the first sample.
    pub utilisation_percent: Option<f32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub path: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TemperatureReading {
    /// Where the reading comes from, e.g. `thermal_zone0 (x86_pkg_temp)` or `hwmon1 k10temp Tctl`.
    pub sensor: String,
    pub celsius: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuVendor {
    Nvidia,
    Amd,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub vendor: GpuVendor,
    pub index: u32,
    pub name: String,
    pub vram_total_bytes: u64,
    pub vram_used_bytes: u64,
    pub utilisation_percent: Option<f32>,
    pub temperature_celsius: Option<f32>,
}

/// The node's Ollama server as the agent last saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OllamaState {
    pub url: String,
    pub reachable: bool,
    /// Why the last probe failed, when it did.
    pub error: Option<String>,
    pub version: Option<String>,
    /// Installed models (`/api/tags`).
    pub models: Vec<OllamaModel>,
    /// Models loaded in memory (`/api/ps`).
    pub loaded: Vec<OllamaLoadedModel>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OllamaModel {
    pub name: String,
    pub size_bytes: u64,
    pub digest: String,
    pub family: Option<String>,
    pub parameter_size: Option<String>,
    pub quantization_level: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OllamaLoadedModel {
    pub name: String,
    pub size_bytes: u64,
    pub vram_bytes: u64,
    /// When Ollama will unload it, as Ollama reports it (RFC 3339).
    pub expires_at: Option<String>,
}
