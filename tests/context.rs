//! The GPU context's own guarantees: limits are the adapter's, bad requests
//! become typed errors, wgpu validation errors never abort the process.

mod common;

use amoe::gpu::{BackendChoice, Tensor};
use amoe::kernels::add::Add;
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

/// The page holds a generator and a trainer on one device. Each object has
/// its own handle (`GpuContext::handle`) and runs its GPU work in error
/// scopes: an error in one object's work is reported by that object, named
/// by its operation, and neither lost nor taken by the other's work in
/// between (one device-wide error list that every pipeline build cleared
/// did both).
#[test]
fn an_error_in_one_object_is_reported_by_that_object() {
    common::for_each_adapter(|ctx| {
        let generator = ctx.handle();
        let trainer = ctx.handle();
        // The trainer records a bad copy (reported when its encoder is
        // finished, at submit)...
        let a = Tensor::<f32>::zeros(&trainer, "a", &[4]).unwrap();
        let b = Tensor::<f32>::zeros(&trainer, "b", &[4]).unwrap();
        let mut enc = trainer.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&a.buffer, 0, &b.buffer, 0, 1 << 20);
        // ...the generator builds a kernel and runs it meanwhile...
        let x = Tensor::from_slice(&generator, "x", &[3], &[1.0f32, 2.0, 3.0]).unwrap();
        let out = Tensor::<f32>::zeros(&generator, "out", &[3]).unwrap();
        let add = Add::new(&generator, &x, &x, &out).unwrap();
        let mut genc = generator.device.create_command_encoder(&Default::default());
        {
            let mut pass = genc.begin_compute_pass(&Default::default());
            add.record(&mut pass);
        }
        generator.submit_and_wait(genc).unwrap();
        // ...then submits: the error is the trainer's, named by its operation.
        let r = trainer.submit("training step", enc);
        match r {
            Err(Error::Gpu { op, msg }) => {
                assert_eq!(op, "training step");
                assert!(!msg.is_empty());
            }
            other => panic!("the trainer's error was not reported to it: {other:?}"),
        }
        // The generator saw none of it, and its results are right.
        generator.check_errors("generate").unwrap();
        assert_eq!(
            pollster::block_on(out.read(&generator)).unwrap(),
            vec![2.0, 4.0, 6.0]
        );
        // Reported once: both objects go on cleanly.
        trainer.check_errors("next step").unwrap();
        trainer.flush_uploads().unwrap();
        // An error outside every scope (no object's operation) still comes
        // out, once, at the next check of any handle.
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&a.buffer, 0, &b.buffer, 0, 1 << 20);
        ctx.queue.submit(Some(enc.finish()));
        assert!(matches!(
            generator.check_errors("generate"),
            Err(Error::Gpu { .. })
        ));
        trainer.check_errors("next step").unwrap();
    });
}

#[test]
fn tensor_bytes_count_the_tensors_alive() {
    common::on_first_adapter(|ctx| {
        let before = ctx.tensor_bytes();
        let a = Tensor::<f32>::zeros(ctx, "a", &[1000]).unwrap();
        let b = Tensor::from_slice(ctx, "b", &[4], &[1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let a2 = a.clone();
        assert_eq!(ctx.tensor_bytes(), before + 4000 + 16);
        // A tensor counts until its last handle drops.
        drop(a);
        assert_eq!(ctx.tensor_bytes(), before + 4000 + 16);
        drop(a2);
        assert_eq!(ctx.tensor_bytes(), before + 16);
        drop(b);
        assert_eq!(ctx.tensor_bytes(), before);
    });
}
