//! The part of NCCL's C API the collectives use, loaded at run time from the file
//! [`super::find::library`] found (cudarc's NCCL bindings load by a fixed list of names
//! that misses `libnccl.so.2`). The declarations follow `nccl.h`.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::Path;

use libloading::Library;

/// `ncclUniqueId`: what rank 0 makes and every rank needs to join.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    /// `NCCL_UNIQUE_ID_BYTES` opaque bytes.
    pub internal: [c_char; 128],
}

/// `ncclComm_t`.
pub type Comm = *mut c_void;
/// `cudaStream_t` (the driver's `CUstream`).
pub type Stream = *mut c_void;
/// `ncclResult_t`; `ncclSuccess` is 0.
pub type NcclResult = c_int;
/// `ncclDataType_t`'s `ncclFloat32`.
pub const FLOAT32: c_int = 7;
/// `ncclDataType_t`'s `ncclFloat64`.
pub const FLOAT64: c_int = 8;
/// `ncclRedOp_t`'s `ncclSum`.
pub const SUM: c_int = 0;

type Reduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    Stream,
) -> NcclResult;
type Gather =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> NcclResult;
type Broadcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    Stream,
) -> NcclResult;

/// NCCL's library and the functions taken from it.
pub struct Lib {
    /// `ncclGetVersion`.
    pub get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    /// `ncclGetUniqueId`.
    pub get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    /// `ncclCommInitRank(comm*, nranks, id, rank)`.
    pub comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    /// `ncclAllReduce(send, recv, count, type, op, comm, stream)`.
    pub all_reduce: Reduce,
    /// `ncclReduceScatter(send, recv, recvcount, type, op, comm, stream)`.
    pub reduce_scatter: Reduce,
    /// `ncclAllGather(send, recv, sendcount, type, comm, stream)`.
    pub all_gather: Gather,
    /// `ncclBroadcast(send, recv, count, type, root, comm, stream)`.
    pub broadcast: Broadcast,
    /// `ncclCommAbort`.
    pub comm_abort: unsafe extern "C" fn(Comm) -> NcclResult,
    /// `ncclGetErrorString`.
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    /// Kept open while the functions above are used.
    _library: Library,
}

impl Lib {
    /// Opens the library at `path` and takes its functions.
    ///
    /// # Errors
    /// A file that is not a loadable library, or lacks one of the functions.
    pub fn open(path: &Path) -> Result<Self, String> {
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions; each
        // symbol is declared with its signature in nccl.h.
        unsafe {
            let library = Library::new(path).map_err(|e| format!("{}: {e}", path.display()))?;
            macro_rules! take {
                ($name:literal) => {
                    *library
                        .get(concat!($name, "\0").as_bytes())
                        .map_err(|e| format!("{}: {}: {e}", path.display(), $name))?
                };
            }
            Ok(Self {
                get_version: take!("ncclGetVersion"),
                get_unique_id: take!("ncclGetUniqueId"),
                comm_init_rank: take!("ncclCommInitRank"),
                all_reduce: take!("ncclAllReduce"),
                reduce_scatter: take!("ncclReduceScatter"),
                all_gather: take!("ncclAllGather"),
                broadcast: take!("ncclBroadcast"),
                comm_abort: take!("ncclCommAbort"),
                error_string: take!("ncclGetErrorString"),
                _library: library,
            })
        }
    }

    /// `Ok` for `ncclSuccess`, else NCCL's words for `result`, after `what`.
    pub fn check(&self, result: NcclResult, what: &str) -> Result<(), String> {
        if result == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let text = unsafe {
            let s = (self.error_string)(result);
            if s.is_null() {
                String::from("unknown error")
            } else {
                CStr::from_ptr(s).to_string_lossy().into_owned()
            }
        };
        Err(format!("{what}: NCCL error {result}: {text}"))
    }

    /// NCCL's version code (`major·10000 + minor·100 + patch` since 2.9).
    pub fn version(&self) -> Result<i32, String> {
        let mut version: c_int = 0;
        // SAFETY: writes one int.
        self.check(
            unsafe { (self.get_version)(&raw mut version) },
            "ncclGetVersion",
        )?;
        Ok(version)
    }
}
