// f16 weights, two to a u32 word (element 2i in the low half of word i),
// widened to f32 with integer operations only. WGSL's unpack2x16float
// needs a capability that some adapters lack (lavapipe without
// SHADER_F16), and it may flush subnormals; this is exact for every
// finite f16 (weights are checked finite on the host), so a kernel reading
// f16 weights computes exactly its f32 twin on the rounded weights.
// Twin: `gpu::round_f16` (the rounding on upload); widening is exact.
fn unpack_f16x2(w: u32) -> vec2<f32> {
    let h = vec2<u32>(w & 0xffffu, w >> 16u);
    let mag = h & vec2<u32>(0x7fffu);
    let sign = (h & vec2<u32>(0x8000u)) << vec2<u32>(16u);
    // Normal: rebias the exponent (127 - 15 = 112) and widen the mantissa.
    let normal = bitcast<vec2<f32>>(sign | ((mag << vec2<u32>(13u)) + vec2<u32>(0x38000000u)));
    // Zero and subnormal: mag * 2^-24, exact in f32.
    let sub = bitcast<vec2<f32>>(sign | bitcast<vec2<u32>>(vec2<f32>(mag) * 5.9604645e-8));
    return select(normal, sub, mag < vec2<u32>(0x400u));
}
