/// Wall-clock seconds, natively and in the browser.
pub struct Stopwatch(web_time::Instant);

impl Stopwatch {
    pub fn start() -> Self {
        Stopwatch(web_time::Instant::now())
    }
    pub fn seconds(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}
