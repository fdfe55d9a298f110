//! CenterFace through vision::cnn, against ONNX Runtime.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use cliper::vision::centerface::{to_input, CenterFace};

#[test]
#[ignore]
fn timing_report() {
    let mut net = CenterFace::embedded().unwrap();
    for (w, h) in [(640u32, 480u32), (320, 256), (1920, 1088), (160, 128)] {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 % 255) as u8,
                (y * 3 % 255) as u8,
                ((x + y) % 255) as u8,
            ])
        });
        let mut ts = Vec::new();
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let m = net.forward(to_input(&img)).unwrap();
            ts.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(m.heatmap.h, h as usize / 4);
        }
        ts.sort_by(f64::total_cmp);
        eprintln!("{w}x{h}: median {:.1} ms", ts[2]);
    }
}
