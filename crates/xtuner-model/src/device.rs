//! What a run can learn about the device it trains on.

use burn::tensor::backend::Backend;

/// Memory the backend's allocator holds on the device, in MiB: the pool's reservation,
/// which grows to the run's peak and is what the card shows as used (less the CUDA
/// context). `None` on the CPU, which reports its memory elsewhere.
pub fn memory_reserved_mib<B: Backend>(device: &B::Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    {
        let device =
            (device as &dyn std::any::Any).downcast_ref::<burn::backend::cuda::CudaDevice>()?;
        let client = <cubecl::cuda::CudaRuntime as cubecl::Runtime>::client(device);
        let usage = client.memory_usage().ok()?;
        #[allow(clippy::cast_precision_loss)]
        return Some(usage.bytes_reserved as f64 / (1024.0 * 1024.0));
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cpu_reports_no_device_memory() {
        assert_eq!(
            super::memory_reserved_mib::<crate::TestBackend>(&Default::default()),
            None
        );
    }
}
