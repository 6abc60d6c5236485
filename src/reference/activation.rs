//! CPU twin of `shaders/activation.wgsl`.

/// tanh computed as the shader does, from exp of a non-positive argument.
pub fn tanh_safe(x: f32) -> f32 {
    let e = (-2.0 * x.abs()).exp();
    let t = (1.0 - e) / (1.0 + e);
    if x < 0.0 {
        -t
    } else {
        t
    }
}

/// GELU, tanh approximation (GPT-2).
pub fn act_gelu(x: f32) -> f32 {
    let c = 0.797_884_6_f32;
    0.5 * x * (1.0 + tanh_safe(c * (x + 0.044715 * x * x * x)))
}

/// SiLU, the gate of SwiGLU.
pub fn act_silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_match_closed_forms() {
        for &x in &[-30.0f32, -3.0, -0.5, 0.0, 0.5, 3.0, 30.0] {
            assert!((tanh_safe(x) - x.tanh()).abs() < 1e-6, "tanh {x}");
            let silu = x / (1.0 + (-x).exp());
            assert!((act_silu(x) - silu).abs() < 1e-6);
        }
        assert!(act_gelu(-100.0).abs() < 1e-6 && act_gelu(100.0) == 100.0);
        assert!((act_gelu(1.0) - 0.841_192).abs() < 1e-5);
    }
}
