// Block-quantized weights (q8, q4): codes and f16 scales packed into u32
// words, two blocks of 32 values (a pair, 64 values) at a time: the pair's
// codes, then one word with both scales (the first block's in the low half).
//   q8: 16 words of codes (value i of the pair in byte i % 4 of word i / 4,
//       two's complement), then the scales: 17 words a pair.
//   q4: 8 words of codes (value i in nibble i % 8 of word i / 8, stored
//       as code + 8), then the scales: 9 words a pair.
// value = code * scale. These functions take the words already loaded (a
// storage array cannot be passed to a function), with the index helpers
// saying which words to load. Twin: src/quant.rs (`value`, `dequantize`).
// Needs shaders/f16.wgsl before it (unpack_f16x2 for the scales).

// Words to load for value group r (values 4r .. 4r + 3, all in one
// block): x = the codes' word, y = the scales' word.
fn q8_group_at(r: u32) -> vec2<u32> {
    let base = (r >> 4u) * 17u;
    return vec2<u32>(base + (r & 15u), base + 16u);
}

fn q4_group_at(r: u32) -> vec2<u32> {
    let base = (r >> 4u) * 9u;
    return vec2<u32>(base + ((r & 15u) >> 1u), base + 8u);
}

// The scale of the block holding value group r (or value 4r).
fn q_scale(scales: u32, r: u32) -> f32 {
    return unpack_f16x2(scales)[(r >> 3u) & 1u];
}

// Value group r from its words (q8_group_at / q4_group_at).
fn q8_group(codes: u32, scales: u32, r: u32) -> vec4<f32> {
    let q = vec4<i32>(
        bitcast<i32>(codes << 24u) >> 24u,
        bitcast<i32>(codes << 16u) >> 24u,
        bitcast<i32>(codes << 8u) >> 24u,
        bitcast<i32>(codes) >> 24u,
    );
    return vec4<f32>(q) * q_scale(scales, r);
}

fn q4_group(codes: u32, scales: u32, r: u32) -> vec4<f32> {
    let n = codes >> ((r & 1u) * 16u);
    let q = vec4<u32>(n & 15u, (n >> 4u) & 15u, (n >> 8u) & 15u, (n >> 12u) & 15u);
    return (vec4<f32>(q) - vec4<f32>(8.0)) * q_scale(scales, r);
}

// Words for the single value i: x = codes, y = scales.
fn q8_value_at(i: u32) -> vec2<u32> {
    return q8_group_at(i >> 2u);
}

fn q4_value_at(i: u32) -> vec2<u32> {
    return q4_group_at(i >> 2u);
}

// Value i from its words (q8_value_at / q4_value_at).
fn q8_value(codes: u32, scales: u32, i: u32) -> f32 {
    let q = bitcast<i32>(codes << (24u - 8u * (i & 3u))) >> 24u;
    return f32(q) * q_scale(scales, i >> 2u);
}

fn q4_value(codes: u32, scales: u32, i: u32) -> f32 {
    let q = (codes >> (4u * (i & 7u))) & 15u;
    return (f32(q) - 8.0) * q_scale(scales, i >> 2u);
}
