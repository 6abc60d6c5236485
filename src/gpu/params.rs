//! Kernel params structs: `#[repr(C)]` Rust structs mirrored by a WGSL struct
//! of the same name. `gpu_params!` declares one and records its fields so a
//! CPU-only test can check them against the WGSL layout (naga reflection).

/// A params struct uploaded as a kernel's uniform.
pub trait GpuParams: bytemuck::Pod {
    /// The WGSL struct name this mirrors.
    const WGSL_NAME: &'static str;
    /// `(field name, byte offset)` in declaration order.
    fn fields() -> Vec<(&'static str, usize)>;
}

/// Declare a params struct: all fields are 4-byte scalars (u32 / f32 / i32),
/// and the struct is padded to 16 bytes as uniform layout requires.
#[macro_export]
macro_rules! gpu_params {
    ($(#[$m:meta])* pub struct $name:ident { $(pub $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        pub struct $name { $(pub $field: $ty),* }

        impl $crate::gpu::GpuParams for $name {
            const WGSL_NAME: &'static str = stringify!($name);
            fn fields() -> Vec<(&'static str, usize)> {
                vec![$((stringify!($field), ::core::mem::offset_of!($name, $field))),*]
            }
        }

        const _: () = assert!(::core::mem::size_of::<$name>() % 16 == 0,
            concat!(stringify!($name), ": pad params structs to a multiple of 16 bytes"));
    };
}
