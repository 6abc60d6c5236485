// TEMPORARY exploration harness (not committed): runs a WGSL file from disk.
use amoe::gpu::{AdapterFilter, GpuContext};
use wgpu::util::DeviceExt;

fn main() {
    let path = std::env::var("WGSL").unwrap();
    let consts = std::env::var("CONSTS").unwrap_or_default(); // "R=4,S=16"
    let (m, n, k): (u32, u32, u32) = {
        let v: Vec<u32> = std::env::var("MNK").unwrap_or("1024,1024,1024".into()).split(',').map(|s| s.parse().unwrap()).collect();
        (v[0], v[1], v[2])
    };
    let tile: Vec<u32> = std::env::var("TILE").unwrap().split(',').map(|s| s.parse().unwrap()).collect(); // rows per wg, cols per wg
    let entry = std::env::var("ENTRY").unwrap_or("main".into());
    let filter = AdapterFilter::from_args(None, None).unwrap();
    let ctxs = pollster::block_on(GpuContext::all(&filter)).unwrap();
    let body = std::fs::read_to_string(&path).unwrap();
    let mut src = String::new();
    let (en, rest): (Vec<&str>, Vec<&str>) = body.lines().partition(|l| l.trim_start().starts_with("enable "));
    for l in en { src += l; src += "\n"; }
    for kv in consts.split(',').filter(|s| !s.is_empty()) {
        let (a, b) = kv.split_once('=').unwrap();
        src += &format!("const {a}: u32 = {b}u;\n");
    }
    for l in rest { src += l; src += "\n"; }
    let a: Vec<f32> = (0..(m * k) as usize).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
    let b: Vec<f32> = (0..(k * n) as usize).map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0).collect();
    // reference for a few entries
    for ctx in &ctxs {
        if let Ok(want) = std::env::var("ONLY") { if !ctx.backend().contains(&want) { continue; } }
        let dev = &ctx.device;
        let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor { label: None, source: wgpu::ShaderSource::Wgsl(src.clone().into()) });
        let pipe = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor { label: None, layout: None, module: &module, entry_point: Some(&entry), compilation_options: Default::default(), cache: None });
        let mk = |d: &[f32]| dev.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: bytemuck::cast_slice(d), usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC });
        let ab = mk(&a); let bb = mk(&b);
        let cb = mk(&vec![0f32; (m * n) as usize]);
        let params = [m, n, k, 0u32, 1f32.to_bits(), 0f32.to_bits(), 0, 0];
        let ub = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: bytemuck::cast_slice(&params), usage: wgpu::BufferUsages::UNIFORM });
        let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipe.get_bind_group_layout(0), entries: &[
            wgpu::BindGroupEntry { binding: 0, resource: ub.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 1, resource: ab.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 2, resource: bb.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 3, resource: cb.as_entire_binding() },
        ]});
        let gx = m.div_ceil(tile[0]); let gy = n.div_ceil(tile[1]);
        let run = |reps: u32| {
            let mut enc = dev.create_command_encoder(&Default::default());
            { let mut pass = enc.begin_compute_pass(&Default::default());
              pass.set_pipeline(&pipe); pass.set_bind_group(0, &bg, &[]);
              for _ in 0..reps { pass.dispatch_workgroups(gx, gy, 1); } }
            ctx.submit_and_wait(enc).unwrap();
        };
        let t0 = std::time::Instant::now(); run(1); let first = t0.elapsed().as_secs_f64();
        let reps = 3;
        let t = std::time::Instant::now(); run(reps); let s = t.elapsed().as_secs_f64() / reps as f64;
        let got: Vec<f32> = pollster::block_on(amoe::gpu::read_buffer(ctx, &cb, (m * n) as usize)).unwrap();
        let mut maxerr = 0f64;
        for &(i, j) in &[(0u32, 0u32), (m - 1, n - 1), (m / 2, n / 3), (m - 1, 0), (0, n - 1), (m/3, n-1)] {
            let mut r = 0f64;
            for kk in 0..k { r += a[(i * k + kk) as usize] as f64 * b[(kk * n + j) as usize] as f64; }
            maxerr = maxerr.max((r - got[(i * n + j) as usize] as f64).abs());
        }
        println!("{} first {:.3}s  {:.2} ms  {:.1} GFLOP/s  maxerr {:.2e}", ctx.backend(), first, s * 1e3, 2.0 * (m as f64) * (n as f64) * (k as f64) / s / 1e9, maxerr);
    }
}
