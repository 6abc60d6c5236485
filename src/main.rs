use amoe::gpu;

fn main() {
    let adapters = pollster::block_on(gpu::list_adapters());
    for a in adapters {
        println!("{} {} {} {:?}", a.index, a.backend, a.name, a.features);
    }
}
