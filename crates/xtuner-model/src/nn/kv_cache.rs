//! The key/value cache of incremental decoding. Keys and values are written into
//! buffers allocated once for the whole generation, so a decoding step copies only its
//! own new entries; attention then reads the filled prefix.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// One layer's cached keys and values.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    len: usize,
}

impl<B: Backend> LayerCache<B> {
    /// Room for `capacity` positions of `[batch, kv_heads, ·, head_dim]`.
    pub fn new(
        batch: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        device: &B::Device,
    ) -> Self {
        let shape = [batch, kv_heads, capacity, head_dim];
        Self {
            keys: Tensor::zeros(shape, device),
            values: Tensor::zeros(shape, device),
            len: 0,
        }
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first append.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold.
    pub fn capacity(&self) -> usize {
        self.keys.dims()[2]
    }

    /// Writes the new keys/values after the cached ones and returns all of them.
    /// Grows the buffers (doubling) if they are full.
    ///
    /// # Shapes
    /// `keys`, `values`: `[B, K, T, D]` → `[B, K, len + T, D]` each.
    pub fn append(
        &mut self,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, k, t, d] = keys.dims();
        let end = self.len + t;
        if end > self.capacity() {
            let extra = end.max(2 * self.capacity()) - self.capacity();
            let device = keys.device();
            let grow = |buf: Tensor<B, 4>| {
                Tensor::cat(vec![buf, Tensor::zeros([b, k, extra, d], &device)], 2)
            };
            self.keys = grow(self.keys.clone());
            self.values = grow(self.values.clone());
        }
        let slot = [0..b, 0..k, self.len..end, 0..d];
        // The buffers are moved out, not cloned, so the write happens in place: Burn
        // copies a tensor it does not hold alone before writing into it.
        let buffer = std::mem::replace(&mut self.keys, keys.clone());
        self.keys = buffer.slice_assign(slot.clone(), keys);
        let buffer = std::mem::replace(&mut self.values, values.clone());
        self.values = buffer.slice_assign(slot, values);
        self.len = end;
        let filled = [0..b, 0..k, 0..end, 0..d];
        (
            self.keys.clone().slice(filled.clone()),
            self.values.clone().slice(filled),
        )
    }
}

/// The caches of every layer, with the number of positions already processed.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// One per decoder layer.
    pub layers: Vec<LayerCache<B>>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `n_layers` layers with room for `capacity` positions.
    pub fn new(
        n_layers: usize,
        batch: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        device: &B::Device,
    ) -> Self {
        Self {
            layers: (0..n_layers)
                .map(|_| LayerCache::new(batch, kv_heads, capacity, head_dim, device))
                .collect(),
        }
    }

    /// Positions already cached (the next token's position).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;

    #[test]
    fn appends_in_place_and_grows() {
        let device = Default::default();
        let mut cache = LayerCache::<TestBackend>::new(1, 1, 2, 1, &device);
        let step = |v: f32| Tensor::<TestBackend, 4>::from_floats([[[[v]]]], &device);
        cache.append(step(1.0), step(-1.0));
        cache.append(step(2.0), step(-2.0));
        let (k, v) = cache.append(step(3.0), step(-3.0));
        assert_eq!(cache.len(), 3);
        assert!(cache.capacity() >= 3);
        assert_eq!(k.into_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(
            v.into_data().to_vec::<f32>().unwrap(),
            vec![-1.0, -2.0, -3.0]
        );
    }
}
