//! `amoe devices`: every adapter as a table or JSON.

use amoe::gpu;
use amoe::{Error, Result};
use std::process::ExitCode;

#[derive(clap::Args, Clone, Debug)]
pub struct DevicesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &DevicesArgs) -> Result<ExitCode> {
    let adapters = pollster::block_on(gpu::list_adapters());
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&adapters)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if adapters.is_empty() {
        return Err(Error::NoAdapter(
            "wgpu found none (on Linux without a GPU: apt-get install mesa-vulkan-drivers libvulkan1)".into(),
        ));
    }
    for a in &adapters {
        let l = &a.limits;
        outln!(
            "[{}] {} / {} ({})",
            a.index,
            a.backend,
            a.name,
            a.device_type
        )?;
        outln!("    driver: {} {}", a.driver, a.driver_info)?;
        let wanted: Vec<&str> = ["SHADER_F16", "SUBGROUP", "TIMESTAMP_QUERY"]
            .into_iter()
            .filter(|f| a.features.iter().any(|x| x == f))
            .collect();
        outln!(
            "    amoe features: {}",
            if wanted.is_empty() {
                "none (f32, no-subgroup paths)".to_string()
            } else {
                wanted.join(", ")
            }
        )?;
        outln!(
            "    limits: storage binding {} MiB, buffer {} MiB, {} storage buffers/stage, {} KiB workgroup memory, {} invocations/workgroup, {} workgroups/dim, subgroup {}..{}",
            l.max_storage_buffer_binding_size >> 20,
            l.max_buffer_size >> 20,
            l.max_storage_buffers_per_shader_stage,
            l.max_compute_workgroup_storage_size / 1024,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroups_per_dimension,
            l.min_subgroup_size,
            l.max_subgroup_size,
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
