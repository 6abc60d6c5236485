//! CPU twin of `shaders/add.wgsl`.

/// `out = a + b`, elementwise.
pub fn add_forward(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}
