//! The GPU context's own guarantees: limits are the adapter's, bad requests
//! become typed errors, wgpu validation errors never abort the process.

mod common;

use amoe::gpu::{BackendChoice, Tensor};
use amoe::Error;

#[test]
fn backend_names_parse_and_unknown_ones_are_typed_errors() {
    assert_eq!(
        BackendChoice::parse("Vulkan").unwrap(),
        BackendChoice::Vulkan
    );
    assert_eq!(BackendChoice::parse("gles").unwrap(), BackendChoice::Gl);
    assert!(matches!(
        BackendChoice::parse("cuda"),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn device_gets_the_adapters_real_limits_and_optional_features() {
    common::for_each_adapter(|ctx| {
        let defaults = wgpu::Limits::default();
        assert!(
            ctx.limits.max_storage_buffer_binding_size >= defaults.max_storage_buffer_binding_size
        );
        assert!(ctx.limits.max_storage_buffers_per_shader_stage >= 8);
        assert!(amoe::gpu::optional_features().contains(ctx.features));
    });
}

#[test]
fn upload_with_wrong_length_is_a_shape_error() {
    common::for_each_adapter(|ctx| {
        let r = Tensor::<f32>::from_slice(ctx, "x", &[2, 3], &[0.0; 5]);
        assert!(matches!(r, Err(Error::Shape { op: "upload", .. })), "{r:?}");
    });
}

#[test]
fn oversized_buffer_is_a_limit_error() {
    common::for_each_adapter(|ctx| {
        let n = (ctx.limits.max_buffer_size / 4 + 1) as usize;
        let r = Tensor::<f32>::zeros(ctx, "huge", &[n]);
        assert!(matches!(r, Err(Error::Limit { .. })), "{r:?}");
        assert!(ctx
            .check_binding("w", ctx.limits.max_storage_buffer_binding_size + 4)
            .is_err());
    });
}

#[test]
fn readback_round_trips() {
    common::for_each_adapter(|ctx| {
        let data: Vec<u32> = (0..1000).collect();
        let t = Tensor::from_slice(ctx, "ids", &[10, 100], &data).unwrap();
        assert_eq!(pollster::block_on(t.read(ctx)).unwrap(), data);
    });
}

#[test]
fn wgpu_validation_errors_become_typed_errors() {
    common::for_each_adapter(|ctx| {
        // Copy past the end of a buffer: a validation error in wgpu, which by
        // default would panic; here it must come back as Error::Gpu.
        let a = Tensor::<f32>::zeros(ctx, "a", &[4]).unwrap();
        let b = Tensor::<f32>::zeros(ctx, "b", &[4]).unwrap();
        ctx.capture_errors();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&a.buffer, 0, &b.buffer, 0, 1 << 20);
        let r = ctx.submit_and_wait(enc);
        assert!(matches!(r, Err(Error::Gpu { .. })), "{r:?}");
        // The context stays usable.
        let t = Tensor::from_slice(ctx, "after", &[3], &[1.0f32, 2.0, 3.0]).unwrap();
        assert_eq!(
            pollster::block_on(t.read(ctx)).unwrap(),
            vec![1.0, 2.0, 3.0]
        );
    });
}
