//! Scratch buffers the CPU forward reuses from one call to the next.
//!
//! A fresh `vec![0; n]` per product zeroes its buffer (the allocator hands
//! out cleared memory, and a large block given back to the kernel is
//! faulted in again, page by page): the 8-bit products' codes and integer
//! sums and the attention's bf16 operands were 3.8% of a q8 forward on
//! oneDNN's int8 products at batch 1, all of it `memset` (2-core EPYC,
//! `perf` of `examples/encode_loop onednn-q8 1 150 2`). The buffers here are
//! written whole before they are read, so a buffer from an earlier call
//! serves as it is.

use std::sync::Mutex;

/// Free buffers of one element type; hands out the smallest that fits.
pub(crate) struct Pool<T> {
    free: Mutex<Vec<Vec<T>>>,
}

/// How many free buffers a pool keeps: the forward holds at most a few of
/// one kind at once per thread.
const KEEP: usize = 8;

impl<T: Copy + Default> Pool<T> {
    pub(crate) const fn new() -> Self {
        Self {
            free: Mutex::new(Vec::new()),
        }
    }

    /// `len` elements of stale contents, given back to the pool on drop.
    /// The caller writes every element before it reads one.
    pub(crate) fn take(&self, len: usize) -> Scratch<'_, T> {
        let reused = self.free.lock().ok().and_then(|mut free| {
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, v)| v.len() >= len)
                .min_by_key(|(_, v)| v.len())
                .or_else(|| free.iter().enumerate().max_by_key(|(_, v)| v.len()))
                .map(|(i, _)| i)?;
            Some(free.swap_remove(best))
        });
        let mut buf = reused.unwrap_or_default();
        if buf.len() < len {
            // Only the new part is cleared; a buffer keeps its length from
            // then on, so a pool settles at the sizes the forward asks for.
            buf.resize(len, T::default());
        }
        Scratch {
            pool: self,
            buf,
            len,
        }
    }

    fn give(&self, buf: Vec<T>) {
        if let Ok(mut free) = self.free.lock() {
            free.push(buf);
            if free.len() > KEEP {
                // Drop the smallest: the large ones are the expensive ones.
                if let Some(i) = free
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, v)| v.len())
                    .map(|(i, _)| i)
                {
                    free.swap_remove(i);
                }
            }
        }
    }
}

/// A buffer taken from a [`Pool`]: `len` elements, back to the pool on drop.
pub(crate) struct Scratch<'a, T: Copy + Default> {
    pool: &'a Pool<T>,
    buf: Vec<T>,
    len: usize,
}

impl<T: Copy + Default> std::ops::Deref for Scratch<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[..self.len]
    }
}

impl<T: Copy + Default> std::ops::DerefMut for Scratch<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[..self.len]
    }
}

impl<T: Copy + Default> Drop for Scratch<'_, T> {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_handed_out_again_without_clearing() {
        let pool = Pool::<u32>::new();
        let first_ptr = {
            let mut a = pool.take(1000);
            assert_eq!(a.len(), 1000);
            a.fill(7);
            a.as_ptr()
        };
        // A smaller request reuses the same memory, contents untouched.
        let b = pool.take(10);
        assert_eq!(b.len(), 10);
        assert_eq!(b.as_ptr(), first_ptr);
        assert!(b.iter().all(|&x| x == 7));
        // Taken while `b` is out: a new buffer, zeroed.
        let c = pool.take(500);
        assert!(c.iter().all(|&x| x == 0));
        assert_ne!(c.as_ptr(), first_ptr);
        drop((b, c));
        // The fitting one of the two is chosen; a larger request grows the
        // largest, keeping what it held.
        assert_eq!(pool.take(800).as_ptr(), first_ptr);
        let mut big = pool.take(2000);
        assert_eq!(big.len(), 2000);
        assert!(big[..1000].iter().all(|&x| x == 7) && big[1000..].iter().all(|&x| x == 0));
        big.fill(1);
    }

    #[test]
    fn a_pool_keeps_only_a_few_buffers() {
        let pool = Pool::<u8>::new();
        let held: Vec<_> = (1..=20).map(|n| pool.take(n * 100)).collect();
        drop(held);
        let free = pool.free.lock().unwrap();
        assert_eq!(free.len(), KEEP);
        // The largest were kept.
        assert!(free.iter().all(|v| v.len() > 1200));
    }
}
