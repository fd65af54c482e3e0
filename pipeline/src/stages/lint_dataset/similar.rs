//! Near-duplicate detection with a difference hash (dHash).
//!
//! The image is reduced to a 9x8 grayscale thumbnail; each of the 64 bits says whether a pixel
//! is brighter than its right neighbour. Re-encodes, resizes and small edits of the same picture
//! land within a few bits of each other; different pictures differ in about half the bits.

use image::DynamicImage;

/// 64-bit difference hash of `image`.
pub fn dhash(image: &DynamicImage) -> u64 {
    let gray = image.to_luma8();
    let small = image::imageops::resize(&gray, 9, 8, image::imageops::FilterType::Triangle);
    let mut hash = 0u64;
    for y in 0..8 {
        for x in 0..8 {
            let brighter = small.get_pixel(x, y)[0] > small.get_pixel(x + 1, y)[0];
            hash = (hash << 1) | u64::from(brighter);
        }
    }
    hash
}

/// Pairs `(earlier, later, distance)` of indices into `hashes` whose hashes differ in at most
/// `max_distance` bits, each later image paired with its closest earlier one.
pub fn near_pairs(hashes: &[Option<u64>], max_distance: u32) -> Vec<(usize, usize, u32)> {
    use rayon::prelude::*;
    (0..hashes.len())
        .into_par_iter()
        .filter_map(|later| {
            let hash = hashes[later]?;
            hashes[..later]
                .iter()
                .enumerate()
                .filter_map(|(earlier, other)| {
                    let distance = (hash ^ (*other)?).count_ones();
                    (distance <= max_distance).then_some((earlier, later, distance))
                })
                .min_by_key(|&(_, _, distance)| distance)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn gradient(width: u32, height: u32, phase: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
            let v = ((x * 7 + y * 3 + phase) % 251) as u8;
            Rgb([v, v.wrapping_mul(3), 255 - v])
        }))
    }

    #[test]
    fn resized_copy_is_near_and_other_picture_is_far() {
        let original = gradient(400, 300, 0);
        let resized = original.resize_exact(200, 150, image::imageops::FilterType::Lanczos3);
        let other = gradient(400, 300, 120).rotate90();
        let hashes = [
            Some(dhash(&original)),
            Some(dhash(&resized)),
            None,
            Some(dhash(&other)),
        ];
        assert!((hashes[0].unwrap() ^ hashes[1].unwrap()).count_ones() <= 4);
        assert!((hashes[0].unwrap() ^ hashes[3].unwrap()).count_ones() > 10);
        let pairs = near_pairs(&hashes, 4);
        assert_eq!(pairs.len(), 1);
        assert_eq!((pairs[0].0, pairs[0].1), (0, 1));
    }
}
