//! NCCL: the collectives between GPUs (one process per GPU), through the library
//! [`find::library`] finds and `ffi` loads (with the `cuda` feature).
//!
//! The group meets first over TCP ([`super::tcp::Tcp`], the rendezvous at `ADDR:PORT`
//! every launch uses): rank 0 makes NCCL's unique id and hands its 128 bytes to the
//! others through that group, then every rank joins the NCCL communicator on its GPU.
//! The TCP group stays for barriers.
//!
//! The [`Collective`](super::Collective) interface works on host buckets, so each operation stages its
//! bucket in a device buffer, runs NCCL's operation on a stream of its own, waits (no
//! longer than the group's timeout: a rank that died or hangs aborts the communicator
//! and fails the operation) and copies the result back. Reduce-scatter and all-gather
//! pad the bucket to N equal shards, as NCCL needs, and keep [`super::shard_range`]'s
//! shards. Every rank gets the same bits (NCCL reduces each element once), though not
//! summed in rank order as the host implementations are.

pub mod find;

#[cfg(feature = "cuda")]
mod ffi;

#[cfg(feature = "cuda")]
pub use device::Nccl;

#[cfg(feature = "cuda")]
mod device {
    use std::ffi::{c_int, c_void};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use cudarc::driver::{result as driver, sys as driver_sys};

    use super::ffi::{self, Lib, UniqueId};
    use super::find;
    use crate::collective::{Collective, shard_range};
    use crate::{Error, Result};

    fn fail(message: String) -> Error {
        Error::Collective(message)
    }

    /// A device buffer that grows to the largest bucket staged.
    struct Scratch {
        ptr: driver_sys::CUdeviceptr,
        bytes: usize,
    }

    /// One rank of an NCCL communicator, on one GPU.
    pub struct Nccl {
        group: Box<dyn Collective>,
        lib: Lib,
        comm: ffi::Comm,
        context: driver_sys::CUcontext,
        stream: driver_sys::CUstream,
        scratch: Mutex<Scratch>,
        timeout: Duration,
        version: i32,
    }

    // SAFETY: the communicator, context and stream are used by one thread at a time
    // (the rank's), and the scratch buffer behind a lock.
    unsafe impl Send for Nccl {}

    impl Nccl {
        /// Joins the NCCL communicator of `group`'s ranks on GPU `device`, rank 0's id
        /// handed over through `group`; operations wait at most `timeout`.
        ///
        /// # Errors
        /// NCCL not found (naming where it was looked for), no such GPU, or a failed
        /// join.
        pub fn new(group: Box<dyn Collective>, device: usize, timeout: Duration) -> Result<Self> {
            let path = find::library(&|k| std::env::var(k).ok())?;
            let lib = Lib::open(&path).map_err(fail)?;
            let version = lib.version().map_err(fail)?;
            let (rank, world) = (group.rank(), group.world_size());
            // SAFETY: driver calls whose results are checked.
            let (context, stream) = unsafe {
                driver::init().map_err(|e| fail(format!("cuInit: {e:?}")))?;
                let ordinal =
                    i32::try_from(device).map_err(|_| fail(format!("GPU index {device}")))?;
                let dev = driver::device::get(ordinal)
                    .map_err(|e| fail(format!("GPU {device}: {e:?}")))?;
                let context = driver::primary_ctx::retain(dev)
                    .map_err(|e| fail(format!("GPU {device}'s context: {e:?}")))?;
                driver::ctx::set_current(context)
                    .map_err(|e| fail(format!("GPU {device}'s context: {e:?}")))?;
                let stream = driver::stream::create(driver::stream::StreamKind::NonBlocking)
                    .map_err(|e| fail(format!("a stream on GPU {device}: {e:?}")))?;
                (context, stream)
            };
            let mut id = UniqueId { internal: [0; 128] };
            if rank == 0 {
                // SAFETY: writes the 128 bytes of `id`.
                let made = unsafe { (lib.get_unique_id)(&raw mut id) };
                lib.check(made, "ncclGetUniqueId").map_err(fail)?;
            }
            // One byte per element: exact through any collective.
            let mut bytes: Vec<f32> = id.internal.iter().map(|&b| f32::from(b as u8)).collect();
            group.broadcast(&mut bytes, 0)?;
            for (byte, value) in id.internal.iter_mut().zip(&bytes) {
                *byte = *value as u8 as std::ffi::c_char;
            }
            let mut comm: ffi::Comm = std::ptr::null_mut();
            let (n, r) = (
                c_int::try_from(world).map_err(|_| fail(format!("{world} ranks")))?,
                c_int::try_from(rank).map_err(|_| fail(format!("rank {rank}")))?,
            );
            // SAFETY: `comm` receives the communicator; the id is every rank's.
            let joined = unsafe { (lib.comm_init_rank)(&raw mut comm, n, id, r) };
            lib.check(joined, "ncclCommInitRank").map_err(fail)?;
            tracing::info!(
                rank,
                world,
                device,
                nccl = version,
                library = %path.display(),
                "NCCL communicator"
            );
            Ok(Self {
                group,
                lib,
                comm,
                context,
                stream,
                scratch: Mutex::new(Scratch { ptr: 0, bytes: 0 }),
                timeout,
                version,
            })
        }

        /// NCCL's version code (e.g. 22704 for 2.27.4).
        pub fn version(&self) -> i32 {
            self.version
        }

        /// Stages `input` on the device, runs `op(send, recv)` with room for `out_len`
        /// elements at `recv`, waits for it and returns what `recv` holds.
        fn staged<T: Copy + Default>(
            &self,
            what: &str,
            input: &[T],
            out_len: usize,
            op: impl FnOnce(&Lib, *const c_void, *mut c_void, ffi::Stream) -> ffi::NcclResult,
        ) -> Result<Vec<T>> {
            let size = std::mem::size_of::<T>();
            let in_bytes = std::mem::size_of_val(input).next_multiple_of(256);
            let total = in_bytes + out_len * size;
            let mut scratch = self
                .scratch
                .lock()
                .map_err(|_| fail(format!("{what}: a previous operation panicked")))?;
            let cuda = |e: driver::DriverError| fail(format!("{what}: {e:?}"));
            let mut out = vec![T::default(); out_len];
            // SAFETY: the scratch buffer holds `total` bytes once grown; the copies stay
            // within it; NCCL reads `input.len()` and writes `out_len` elements there.
            unsafe {
                driver::ctx::set_current(self.context).map_err(cuda)?;
                if scratch.bytes < total {
                    if scratch.ptr != 0 {
                        driver::free_sync(scratch.ptr).map_err(cuda)?;
                    }
                    scratch.ptr = driver::malloc_sync(total).map_err(cuda)?;
                    scratch.bytes = total;
                }
                let send = scratch.ptr;
                let recv = scratch.ptr + in_bytes as u64;
                // Copies, operation and copy back in the order of our stream (which does
                // not wait on the legacy default stream), then one wait for all three.
                if !input.is_empty() {
                    driver::memcpy_htod_async(send, input, self.stream).map_err(cuda)?;
                }
                let queued = op(
                    &self.lib,
                    send as *const c_void,
                    recv as *mut c_void,
                    self.stream.cast(),
                );
                self.lib.check(queued, what).map_err(fail)?;
                if out_len > 0 {
                    driver::memcpy_dtoh_async(&mut out, recv, self.stream).map_err(cuda)?;
                }
                if let Err(e) = self.wait(what) {
                    // The copy back may still be queued behind the aborted operation:
                    // `out` is left to it rather than freed under it.
                    std::mem::forget(out);
                    return Err(e);
                }
            }
            Ok(out)
        }

        /// `data` summed over the ranks, in place; `dtype` is NCCL's name of `T`.
        fn all_reduce_in_place<T: Copy + Default>(
            &self,
            data: &mut [T],
            dtype: c_int,
        ) -> Result<()> {
            if data.is_empty() {
                return Ok(());
            }
            let n = data.len();
            let out = self.staged("all_reduce", data, n, |lib, send, recv, stream| {
                // SAFETY: `n` elements of `dtype` at send and recv (see `staged`).
                unsafe { (lib.all_reduce)(send, recv, n, dtype, ffi::SUM, self.comm, stream) }
            })?;
            data.copy_from_slice(&out);
            Ok(())
        }

        /// Waits for the stream; past the timeout, aborts the communicator.
        fn wait(&self, what: &str) -> Result<()> {
            let started = Instant::now();
            loop {
                // SAFETY: the stream lives as long as `self`.
                let status = unsafe { driver_sys::cuStreamQuery(self.stream) };
                match status {
                    driver_sys::CUresult::CUDA_SUCCESS => return Ok(()),
                    driver_sys::CUresult::CUDA_ERROR_NOT_READY => {}
                    other => return Err(fail(format!("{what}: {other:?}"))),
                }
                if started.elapsed() > self.timeout {
                    // SAFETY: aborting ends the communicator's queued operations and
                    // releases it (the run stops; it is not used after); the stream then
                    // drains, so the staged copies are done with the caller's buffers.
                    unsafe {
                        (self.lib.comm_abort)(self.comm);
                        let _ = driver::stream::synchronize(self.stream);
                    }
                    return Err(fail(format!(
                        "{what}: the ranks did not all take part within {:.0} s (a rank died or hangs); NCCL's communicator was aborted",
                        self.timeout.as_secs_f64()
                    )));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    impl Collective for Nccl {
        fn rank(&self) -> usize {
            self.group.rank()
        }

        fn world_size(&self) -> usize {
            self.group.world_size()
        }

        fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
            self.all_reduce_in_place(data, ffi::FLOAT32)
        }

        fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
            self.all_reduce_in_place(data, ffi::FLOAT64)
        }

        fn reduce_scatter_sum(&self, data: &[f32]) -> Result<Vec<f32>> {
            let (len, world) = (data.len(), self.world_size());
            let chunk = len.div_ceil(world);
            if chunk == 0 {
                return Ok(Vec::new());
            }
            let mut padded = data.to_vec();
            padded.resize(chunk * world, 0.0);
            let mut out = self.staged(
                "reduce_scatter",
                &padded,
                chunk,
                |lib, send, recv, stream| {
                    // SAFETY: `chunk · world` f32s at send, `chunk` at recv.
                    unsafe {
                        (lib.reduce_scatter)(
                            send,
                            recv,
                            chunk,
                            ffi::FLOAT32,
                            ffi::SUM,
                            self.comm,
                            stream,
                        )
                    }
                },
            )?;
            out.truncate(shard_range(len, world, self.rank()).len());
            Ok(out)
        }

        fn all_gather(&self, shard: &[f32], len: usize) -> Result<Vec<f32>> {
            let world = self.world_size();
            let want = shard_range(len, world, self.rank()).len();
            if shard.len() != want {
                return Err(fail(format!(
                    "all_gather: rank {} holds {} elements, its shard of {len} is {want}",
                    self.rank(),
                    shard.len()
                )));
            }
            let chunk = len.div_ceil(world);
            if chunk == 0 {
                return Ok(Vec::new());
            }
            let mut padded = shard.to_vec();
            padded.resize(chunk, 0.0);
            let mut out = self.staged(
                "all_gather",
                &padded,
                chunk * world,
                |lib, send, recv, stream| {
                    // SAFETY: `chunk` f32s at send, `chunk · world` at recv.
                    unsafe { (lib.all_gather)(send, recv, chunk, ffi::FLOAT32, self.comm, stream) }
                },
            )?;
            out.truncate(len);
            Ok(out)
        }

        fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
            if data.is_empty() {
                return Ok(());
            }
            let n = data.len();
            let root = c_int::try_from(root).map_err(|_| fail(format!("root {root}")))?;
            let out = self.staged("broadcast", data, n, |lib, send, recv, stream| {
                // SAFETY: `n` f32s at send and recv.
                unsafe { (lib.broadcast)(send, recv, n, ffi::FLOAT32, root, self.comm, stream) }
            })?;
            data.copy_from_slice(&out);
            Ok(())
        }

        fn barrier(&self) -> Result<()> {
            self.group.barrier()
        }

        fn transport(&self) -> String {
            format!("NCCL {}", self.version)
        }
    }
}
