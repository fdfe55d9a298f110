//! Runs only CenterFace on one frame in a loop, for profilers (`perf
//! record`): `cliper bench` times every stage, which would dilute a profile.
//!
//! ```text
//! cargo build --release --example detect_loop
//! perf record -e cpu-clock target/release/examples/detect_loop 640 480 0.5 300 2
//! ```
//!
//! Arguments: frame width and height (the built-in demo portrait, scaled),
//! the detector's resize factor (0.5: live settings on 640x480), iterations,
//! threads.

use std::time::Instant;

// As the cliper binary: timings and memory as it has them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let (w, h): (u32, u32) = (get(0, "640").parse()?, get(1, "480").parse()?);
    let scale: f32 = get(2, "0.5").parse()?;
    let iters: usize = get(3, "100").parse::<usize>()?.max(1);
    let threads: usize = get(4, "2").parse()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let demo = cliper::vision::source::demo::DemoSource::new().render(0.0);
    let frame = image::imageops::resize(&demo, w, h, image::imageops::FilterType::Triangle);
    let mut net = cliper::vision::centerface::CenterFace::embedded()?;
    let mut times = Vec::with_capacity(iters);
    let mut faces = 0;
    pool.install(|| {
        for _ in 0..iters {
            let t = Instant::now();
            faces = net.detect(&frame, scale, 0.5).len();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    });
    times.sort_by(f64::total_cmp);
    println!(
        "{faces} face(s); ms per frame: fastest {:.2}, median {:.2}",
        times[0],
        times[times.len() / 2]
    );
    Ok(())
}
