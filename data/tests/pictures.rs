//! The picture functions write valid PNGs of the expected size.

use dcdit_data::pictures::{
    diverging_colour, save_chunking_viz, save_compression_plot, save_grid_png, ChunkFrame,
    StepStats,
};
use std::path::{Path, PathBuf};

fn out(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dcdit_pictures_{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Decodes a PNG: (width, height, RGB bytes).
fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn px(img: &(u32, u32, Vec<u8>), x: u32, y: u32) -> [u8; 3] {
    let o = ((y * img.0 + x) * 3) as usize;
    [img.2[o], img.2[o + 1], img.2[o + 2]]
}

#[test]
fn grid_grey_has_the_expected_size_and_pixels() {
    let p = out("grid.png");
    // 5 images of 3x4; image k is a constant -1 + k/2.
    let x: Vec<f32> = (0..5)
        .flat_map(|k| vec![-1.0 + k as f32 * 0.5; 12])
        .collect();
    save_grid_png(&p, &x, 5, 1, 3, 4, 2, 3).unwrap();
    let img = decode(&p);
    // 2 columns of 4*3 + 2, 3 rows of 3*3 + 2, plus the 2-pixel border.
    assert_eq!((img.0, img.1), (2 * 14 + 2, 3 * 11 + 2));
    assert_eq!(px(&img, 0, 0), [128, 128, 128]); // gap
    assert_eq!(px(&img, 2, 2), [0, 0, 0]); // image 0 = -1
    assert_eq!(px(&img, 2 + 14, 2), [64, 64, 64]); // image 1 = -0.5
    assert_eq!(px(&img, 2 + 11, 2 + 8), [0, 0, 0]); // image 0's last pixel
    assert_eq!(px(&img, 2 + 12, 2 + 8), [128, 128, 128]); // the gap after it
    let last = px(&img, 2 + 5, 2 + 2 * 11 + 4); // image 4 = +1
    assert_eq!(last, [255, 255, 255]);
    // Fewer images than columns: the grid shrinks to them.
    save_grid_png(&p, &x[..12], 1, 1, 3, 4, 8, 1).unwrap();
    let img = decode(&p);
    assert_eq!((img.0, img.1), (4 + 4, 3 + 4));
}

#[test]
fn grid_colour_uses_the_first_three_channels() {
    let p = out("grid_rgb.png");
    // One 2x2 image with 4 channels: R = 1, G = -1, B = 0, 4th ignored.
    let mut x = vec![1.0f32; 4];
    x.extend([-1.0f32; 4]);
    x.extend([0.0f32; 4]);
    x.extend([0.3f32; 4]);
    save_grid_png(&p, &x, 1, 4, 2, 2, 1, 2).unwrap();
    let img = decode(&p);
    assert_eq!((img.0, img.1), (8, 8));
    assert_eq!(px(&img, 3, 3), [255, 0, 128]);
    save_grid_png(&p, &x[..12], 1, 3, 2, 2, 1, 1).unwrap();
    assert_eq!(px(&decode(&p), 2, 2), [255, 0, 128]);
}

#[test]
fn grid_bad_input_is_an_error() {
    let p = out("bad.png");
    assert!(save_grid_png(&p, &[0.0; 10], 1, 1, 3, 3, 1, 1).is_err());
    assert!(save_grid_png(&p, &[0.0; 8], 1, 2, 2, 2, 1, 1).is_err());
    assert!(save_grid_png(&p, &[], 0, 1, 2, 2, 1, 1).is_err());
    assert!(save_grid_png(&p, &[0.0; 4], 1, 1, 2, 2, 0, 1).is_err());
    let e = save_grid_png("/nonexistent/dir/g.png", &[0.0; 4], 1, 1, 2, 2, 1, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/dir/g.png"), "{e}");
}

fn frame(t: usize, c: usize, h: usize, w: usize, grid: usize) -> ChunkFrame {
    let n = (h / grid) * (w / grid);
    ChunkFrame {
        t,
        x_t: (0..c * h * w)
            .map(|i| ((i % 7) as f32 / 3.0) - 1.0)
            .collect(),
        h,
        w,
        c,
        prob: (0..n).map(|i| i as f32 / (n - 1) as f32).collect(),
        kept_fraction: 0.234,
    }
}

#[test]
fn chunking_viz_is_a_valid_png() {
    let p = out("chunk.png");
    let frames: Vec<ChunkFrame> = (0..4).map(|k| frame(999 - 333 * k, 1, 28, 28, 1)).collect();
    save_chunking_viz(&p, &frames).unwrap();
    let img = decode(&p);
    // Four 168-pixel panels side by side, two rows of them.
    assert!(img.0 > 4 * 168 && img.0 < 4 * 168 + 400, "{}", img.0);
    assert!(img.1 > 2 * 168 && img.1 < 2 * 168 + 200, "{}", img.1);
    // Both ends of the colour map appear.
    let has = |rgb: [u8; 3]| img.2.chunks_exact(3).any(|c| c == rgb);
    assert!(has(diverging_colour(0.0)) && has(diverging_colour(1.0)));
    // Text was drawn (dark anti-aliased pixels outside the images).
    assert!(
        img.2
            .chunks_exact(3)
            .filter(|c| c[0] < 60 && c[1] < 60 && c[2] < 60)
            .count()
            > 100
    );

    // More than 8 frames are thinned to 8; latents with 4 channels and a coarser router grid.
    let frames: Vec<ChunkFrame> = (0..20).map(|k| frame(999 - 50 * k, 4, 32, 32, 2)).collect();
    save_chunking_viz(&p, &frames).unwrap();
    let img8 = decode(&p);
    assert!(
        img8.0 > 8 * 160 && img8.0 < 8 * 160 + 8 * 14 + 300,
        "{}",
        img8.0
    );
}

#[test]
fn chunking_viz_bad_input_is_an_error() {
    let p = out("chunk_bad.png");
    assert!(save_chunking_viz(&p, &[]).is_err());
    let mut f = frame(10, 1, 8, 8, 1);
    f.prob.pop();
    assert!(save_chunking_viz(&p, &[f]).is_err());
    let mut f = frame(10, 1, 8, 8, 1);
    f.x_t.pop();
    assert!(save_chunking_viz(&p, &[f]).is_err());
    let fs = [frame(10, 1, 8, 8, 1), frame(5, 1, 4, 4, 1)];
    assert!(save_chunking_viz(&p, &fs).is_err());
}

#[test]
fn diverging_colour_map_ends_and_middle() {
    assert_eq!(diverging_colour(0.5), [255, 255, 255]);
    let (lo, hi) = (diverging_colour(0.0), diverging_colour(1.0));
    assert!(lo[2] > lo[0], "0 is blue: {lo:?}");
    assert!(hi[0] > hi[2], "1 is red: {hi:?}");
    assert_eq!(diverging_colour(-3.0), lo);
    assert_eq!(diverging_colour(f32::NAN), [0, 0, 0]);
}

#[test]
fn compression_plot_is_a_valid_png() {
    let p = out("compression.png");
    let steps: Vec<StepStats> = (0..50)
        .map(|i| {
            let t = 999 - i * 999 / 49;
            StepStats {
                t,
                ratio_cond: 2.0 + t as f32 / 300.0,
                ratio_uncond: Some(3.0 + t as f32 / 200.0),
                seconds: 0.01 + i as f64 * 1e-4,
                gflops: 1.0 + i as f64 * 0.01,
            }
        })
        .collect();
    save_compression_plot(&p, &steps).unwrap();
    let img = decode(&p);
    assert_eq!((img.0, img.1), (1000, 1050));
    // The series colours are there.
    let has = |rgb: [u8; 3]| img.2.chunks_exact(3).any(|c| c == rgb);
    assert!(has([33, 102, 172]) && has([230, 120, 20]));

    // One step, no uncond path, a NaN: still a picture.
    let one = [StepStats {
        t: 500,
        ratio_cond: f32::NAN,
        ratio_uncond: None,
        seconds: 0.5,
        gflops: 2.0,
    }];
    save_compression_plot(&p, &one).unwrap();
    assert_eq!(decode(&p).0, 1000);
    assert!(save_compression_plot(&p, &[]).is_err());
}
