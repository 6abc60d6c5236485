//! CPU twin of `shaders/add.wgsl`. Generic over the float type (the model
//! twin runs in f64 for its gradient check).

use num_traits::Float;

/// `out = a + b`, elementwise.
pub fn add_forward<F: Float>(a: &[F], b: &[F]) -> Vec<F> {
    a.iter().zip(b).map(|(&x, &y)| x + y).collect()
}
