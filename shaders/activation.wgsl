// Activations shared by the expert FFN kernels (prepended to their files).
// Twin: src/reference/activation.rs. Written to stay finite for any finite input:
// tanh is computed from exp of a non-positive argument.

fn tanh_safe(x: f32) -> f32 {
    let e = exp(-2.0 * abs(x));
    let t = (1.0 - e) / (1.0 + e);
    return select(t, -t, x < 0.0);
}

// GELU, tanh approximation (GPT-2).
fn act_gelu(x: f32) -> f32 {
    let c = 0.7978845608028654; // sqrt(2 / pi)
    return 0.5 * x * (1.0 + tanh_safe(c * (x + 0.044715 * x * x * x)));
}

// SiLU for SwiGLU: silu(g) * u.
fn act_silu(x: f32) -> f32 {
    return x / (1.0 + exp(-x));
}

// d silu(x) / dx = s (1 + x (1 - s)), s = sigmoid(x) (SwiGLU backward).
fn act_silu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-x));
    return s * (1.0 + x * (1.0 - s));
}

// d gelu(x) / dx for the tanh approximation (training backward).
fn act_gelu_grad(x: f32) -> f32 {
    let c = 0.7978845608028654;
    let a = 0.044715;
    let th = tanh_safe(c * (x + a * x * x * x));
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3.0 * a * x * x);
}
