//! Byte planes for `Compression::ZstdByteSplit`: elements split into planes (all byte 0s, then
//! all byte 1s, …) before zstd and joined back after it. Activations' high bytes are highly
//! redundant and the low bytes are noise, so planes compress better than interleaved bytes.

/// Splits `width`-byte elements into `width` planes (all byte 0s, then all byte 1s, …) into
/// `out` (cleared first). Callers pass whole elements; anything else is copied as it is.
pub(super) fn split_planes(data: &[u8], width: usize, out: &mut Vec<u8>) {
    out.clear();
    let n = data.len() / width.max(1);
    if width <= 1 || n == 0 || n * width != data.len() {
        out.extend_from_slice(data);
        return;
    }
    out.resize(data.len(), 0);
    match width {
        2 => {
            let (p0, p1) = out.split_at_mut(n);
            for ((el, a), b) in data.chunks_exact(2).zip(p0).zip(p1) {
                *a = el[0];
                *b = el[1];
            }
        }
        4 => {
            let (p01, p23) = out.split_at_mut(2 * n);
            let (p0, p1) = p01.split_at_mut(n);
            let (p2, p3) = p23.split_at_mut(n);
            for ((((el, a), b), c), d) in data.chunks_exact(4).zip(p0).zip(p1).zip(p2).zip(p3) {
                *a = el[0];
                *b = el[1];
                *c = el[2];
                *d = el[3];
            }
        }
        _ => {
            for (b, plane) in out.chunks_exact_mut(n).enumerate() {
                for (dst, el) in plane.iter_mut().zip(data.chunks_exact(width)) {
                    if let Some(&byte) = el.get(b) {
                        *dst = byte;
                    }
                }
            }
        }
    }
}

/// Inverse of `split_planes`.
pub(super) fn join_planes(planes: &[u8], width: usize) -> Vec<u8> {
    let n = planes.len() / width.max(1);
    if width <= 1 || n == 0 || n * width != planes.len() {
        return planes.to_vec();
    }
    let mut out = vec![0u8; planes.len()];
    match width {
        2 => {
            let (p0, p1) = planes.split_at(n);
            for ((el, a), b) in out.chunks_exact_mut(2).zip(p0).zip(p1) {
                el[0] = *a;
                el[1] = *b;
            }
        }
        4 => {
            let (p01, p23) = planes.split_at(2 * n);
            let (p0, p1) = p01.split_at(n);
            let (p2, p3) = p23.split_at(n);
            for ((((el, a), b), c), d) in out.chunks_exact_mut(4).zip(p0).zip(p1).zip(p2).zip(p3) {
                el[0] = *a;
                el[1] = *b;
                el[2] = *c;
                el[3] = *d;
            }
        }
        _ => {
            for (b, plane) in planes.chunks_exact(n).enumerate() {
                for (el, &byte) in out.chunks_exact_mut(width).zip(plane) {
                    if let Some(dst) = el.get_mut(b) {
                        *dst = byte;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_round_trip() {
        let data: Vec<u8> = (0..=255u8).cycle().take(12 * 37).collect();
        for width in [1, 2, 3, 4] {
            let mut split = Vec::new();
            split_planes(&data, width, &mut split);
            assert_eq!(join_planes(&split, width), data);
            for b in 0..width {
                let n = data.len() / width;
                assert!((0..n).all(|i| split[b * n + i] == data[i * width + b]));
            }
        }
        let mut split = Vec::new();
        split_planes(&[1, 2, 3], 2, &mut split);
        assert_eq!(split, vec![1, 2, 3], "not whole elements: copied as is");
        let mut split = Vec::new();
        split_planes(&[1, 2, 3, 4], 2, &mut split);
        assert_eq!(split, vec![1, 3, 2, 4]);
        split_planes(&[], 4, &mut split);
        assert!(split.is_empty());
    }
}
