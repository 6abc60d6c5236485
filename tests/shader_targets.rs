//! CPU-only checks of every shader: each entry point and specialization is
//! translated by naga to SPIR-V (Vulkan), MSL (Metal), HLSL (DX12) and GLSL
//! (OpenGL), so a shader that Metal or DX12 would reject fails here, on a
//! machine that has neither; and every Rust params struct is compared field by
//! field with its WGSL twin (names, offsets, size) through naga's reflection.

use amoe::kernels::{params_layouts, Kernel};
use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn compile_all(kernel: &Kernel) -> Result<(), String> {
    let def = kernel.def();
    let module = naga::front::wgsl::parse_str(&def.source).map_err(|e| {
        format!(
            "{}: WGSL parse: {}",
            def.name,
            e.emit_to_string(&def.source)
        )
    })?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .map_err(|e| format!("{}: validation: {e:?}", def.name))?;
    let stage = naga::ShaderStage::Compute;
    let entry = def.entry.to_string();
    if !module.entry_points.iter().any(|e| e.name == entry) {
        return Err(format!("{}: no entry point {entry}", def.name));
    }
    // naga 30 takes subgroup builtins without an `enable` directive: look for their use.
    let uses_subgroups =
        def.source.contains("subgroupBroadcast(") || def.source.contains("subgroupShuffle(");
    let uses_f16 = def.source.contains("enable f16");

    // SPIR-V (Vulkan).
    let spv_opts = spv::Options {
        lang_version: (1, 3),
        ..Default::default()
    };
    spv::write_vec(
        &module,
        &info,
        &spv_opts,
        Some(&spv::PipelineOptions {
            shader_stage: stage,
            entry_point: entry.clone(),
        }),
    )
    .map_err(|e| format!("{}: SPIR-V: {e:?}", def.name))?;

    // MSL (Metal). Subgroup ops need MSL 2.1+; 2.4 is what wgpu asks for on recent macOS.
    let msl_opts = msl::Options {
        lang_version: (2, 4),
        ..Default::default()
    };
    msl::write_string(
        &module,
        &info,
        &msl_opts,
        &msl::PipelineOptions {
            entry_point: Some((stage, entry.clone())),
            ..Default::default()
        },
    )
    .map_err(|e| format!("{}: MSL: {e:?}", def.name))?;

    // HLSL (DX12). Subgroup (wave) ops need shader model 6.0+.
    let hlsl_opts = hlsl::Options {
        shader_model: if uses_subgroups || uses_f16 {
            hlsl::ShaderModel::V6_2
        } else {
            hlsl::ShaderModel::V5_1
        },
        ..Default::default()
    };
    let mut hlsl_out = String::new();
    hlsl::Writer::new(
        &mut hlsl_out,
        &hlsl_opts,
        &hlsl::PipelineOptions {
            entry_point: Some((stage, entry.clone())),
        },
    )
    .write(&module, &info, None)
    .map_err(|e| format!("{}: HLSL: {e:?}", def.name))?;

    // GLSL ES 3.10 (wgpu's GL backend). wgpu exposes neither subgroups nor f16
    // on GL, so kernels that need them are never built there.
    if !uses_subgroups && !uses_f16 {
        let glsl_opts = glsl::Options {
            version: glsl::Version::new_gles(310),
            ..Default::default()
        };
        let mut glsl_out = String::new();
        glsl::Writer::new(
            &mut glsl_out,
            &module,
            &info,
            &glsl_opts,
            &glsl::PipelineOptions {
                shader_stage: stage,
                entry_point: entry,
                multiview: None,
            },
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write())
        .map_err(|e| format!("{}: GLSL: {e:?}", def.name))?;
    }
    Ok(())
}

#[test]
fn every_kernel_translates_to_every_backend_language() {
    let kernels = Kernel::all();
    assert!(!kernels.is_empty());
    let errors: Vec<String> = kernels
        .iter()
        .filter_map(|k| compile_all(k).err())
        .collect();
    assert!(
        errors.is_empty(),
        "{} of {} kernels failed to translate:\n{}",
        errors.len(),
        kernels.len(),
        errors.join("\n")
    );
    eprintln!(
        "{} kernel specializations translated to SPIR-V, MSL, HLSL, GLSL",
        kernels.len()
    );
}

#[test]
fn kernel_names_are_unique_per_specialization() {
    let kernels = Kernel::all();
    let mut names: Vec<String> = kernels.iter().map(|k| k.def().name).collect();
    names.sort();
    let n = names.len();
    names.dedup();
    assert_eq!(n, names.len(), "two specializations share a name");
}

#[test]
fn params_structs_match_wgsl_layout() {
    let layouts = params_layouts();
    assert!(!layouts.is_empty());
    for p in layouts {
        let def = p.kernel.def();
        let module = naga::front::wgsl::parse_str(&def.source).expect("kernel source parses");
        let ty = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(p.wgsl_name))
            .unwrap_or_else(|| panic!("{}: no WGSL struct {}", def.name, p.wgsl_name));
        let naga::TypeInner::Struct { members, span } = &ty.1.inner else {
            panic!("{} is not a struct", p.wgsl_name)
        };
        let wgsl: Vec<(String, usize)> = members
            .iter()
            .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize))
            .collect();
        let rust: Vec<(String, usize)> =
            p.fields.iter().map(|(n, o)| (n.to_string(), *o)).collect();
        assert_eq!(rust, wgsl, "{}: Rust fields vs WGSL members", p.wgsl_name);
        assert_eq!(
            p.size, *span as usize,
            "{}: Rust size vs WGSL size",
            p.wgsl_name
        );
    }
}
