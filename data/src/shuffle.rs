//! The shuffle buffer over packed lines (fms-fsdp uses 10,000 lines).
//!
//! Packing keeps consecutive documents of one logical shard together; a
//! buffer that emits a random held line for each new one breaks that up.
//! Its whole state is the held lines and one u64 of RNG, so it can be saved
//! and restored exactly, which is what avoids the loss jump fms-fsdp users
//! see when a resumed run starts with an empty buffer.

/// splitmix64: one u64 of state, serialisable as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let z = self.0;
        self.0 = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        crate::shards::mix(z)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-40
    /// for buffers this size).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

#[derive(Debug)]
pub struct ShuffleBuffer<T> {
    capacity: usize,
    items: Vec<T>,
    rng: Rng,
}

impl<T> ShuffleBuffer<T> {
    pub fn new(capacity: usize, rng: Rng, items: Vec<T>) -> Self {
        ShuffleBuffer {
            capacity,
            items,
            rng,
        }
    }

    /// Adds a line; once full, returns a random held one in exchange.
    pub fn push(&mut self, item: T) -> Option<T> {
        if self.items.len() < self.capacity {
            self.items.push(item);
            return None;
        }
        if self.items.is_empty() {
            return Some(item);
        }
        let j = self.rng.below(self.items.len());
        Some(std::mem::replace(&mut self.items[j], item))
    }

    /// Drains a random held line (when the input has ended).
    pub fn pop(&mut self) -> Option<T> {
        if self.items.is_empty() {
            return None;
        }
        let j = self.rng.below(self.items.len());
        Some(self.items.swap_remove(j))
    }

    pub fn items(&self) -> &[T] {
        &self.items
    }

    pub fn rng(&self) -> Rng {
        self.rng
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_every_item_once_in_a_new_order() {
        let mut b = ShuffleBuffer::new(16, Rng(3), Vec::new());
        let mut out: Vec<u32> = (0..100).filter_map(|i| b.push(i)).collect();
        assert_eq!(out.len(), 84);
        while let Some(x) = b.pop() {
            out.push(x);
        }
        assert_ne!(out, (0..100).collect::<Vec<_>>());
        out.sort();
        assert_eq!(out, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn zero_capacity_passes_through() {
        let mut b = ShuffleBuffer::new(0, Rng(3), Vec::new());
        assert_eq!(b.push(5), Some(5));
        assert_eq!(b.pop(), None);
    }
}
