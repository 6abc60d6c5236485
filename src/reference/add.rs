//! CPU twin of `shaders/add.wgsl`. Generic over the float type (the model
//! twin runs in f64 for its gradient check).

use num_traits::Float;

/// `out = a + b`, elementwise.
pub fn add_forward<F: Float>(a: &[F], b: &[F]) -> Vec<F> {
    a.iter().zip(b).map(|(&x, &y)| x + y).collect()
}

/// `out = a + scale * b`, elementwise (two roundings; the GPU may fuse them).
pub fn add_scaled(a: &[f32], b: &[f32], scale: f32) -> Vec<f32> {
    a.iter().zip(b).map(|(&x, &y)| x + scale * y).collect()
}
