//! What the agent reports about its device.

use mdm_proto::v1 as pb;

/// Collects the device's facts; `serial_override` replaces the hardware
/// serial (VMs and containers often have none, or share one).
pub fn collect(
    serial_override: Option<&str>,
    capabilities: Vec<pb::DeviceCapability>,
) -> pb::DeviceFacts {
    pb::DeviceFacts {
        platform: platform().into(),
        os_version: os_version(),
        model: read_trimmed("/sys/devices/virtual/dmi/id/product_name").unwrap_or_default(),
        serial_number: serial_override
            .map(str::to_owned)
            .or_else(hardware_serial)
            .unwrap_or_default(),
        hostname: gethostname::gethostname().to_string_lossy().into_owned(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        capabilities,
    }
}

fn platform() -> pb::Platform {
    if cfg!(target_os = "linux") {
        pb::Platform::Linux
    } else if cfg!(target_os = "macos") {
        pb::Platform::Macos
    } else if cfg!(target_os = "windows") {
        pb::Platform::Windows
    } else {
        pb::Platform::Unspecified
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().chars().take(256).collect::<String>())
        .filter(|s| !s.is_empty())
}

fn os_version() -> String {
    if let Some(release) = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
    {
        return release;
    }
    std::env::consts::OS.to_owned()
}

/// The DMI serial when readable, else the machine id: stable per install.
fn hardware_serial() -> Option<String> {
    read_trimmed("/sys/class/dmi/id/product_serial")
        .or_else(|| read_trimmed("/etc/machine-id").map(|id| format!("machine-id:{id}")))
}
