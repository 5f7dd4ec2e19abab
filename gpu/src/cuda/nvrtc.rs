//! Compiling CUDA C++ to PTX at run time with NVRTC, without panicking when NVRTC is missing.
//!
//! NVRTC 12 (`libnvrtc.so.12`) and 13 (`libnvrtc.so.13`) both work. The library is looked for,
//! in order: the path in [`NVRTC_ENV`]; the names the dynamic loader resolves (`LD_LIBRARY_PATH`,
//! the loader cache); then the `lib64` folders of `CUDA_HOME`, `CUDA_PATH` and `/usr/local/cuda`.
//! NVRTC needs no GPU: compiling works on any machine that has the library.

use std::ffi::OsString;
use std::path::PathBuf;

use cudarc::driver::CudaContext;
use cudarc::nvrtc::{self, CompileOptions, Ptx};
use hetmem_core::{Error, Result};

use super::driver;
use crate::fork_once::ForkOnce;

/// Environment variable naming the NVRTC library to load (a path to `libnvrtc.so.12` or `.13`).
/// When set, that library is used or none is.
pub const NVRTC_ENV: &str = "HETMEM_NVRTC";

/// The sonames tried, newest first; cudarc looks the library up by these same names.
const SONAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

/// A failed compilation: the error and NVRTC's log (empty if NVRTC never ran).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    /// What went wrong.
    pub error: Error,
    /// NVRTC's log: the compiler's messages, with line numbers.
    pub log: String,
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        if !self.log.is_empty() {
            write!(f, "\n{}", self.log.trim_end())?;
        }
        Ok(())
    }
}

impl std::error::Error for CompileError {}

impl From<CompileError> for Error {
    fn from(e: CompileError) -> Error {
        e.error
    }
}

impl From<Error> for CompileError {
    fn from(error: Error) -> CompileError {
        CompileError { error, log: String::new() }
    }
}

/// Finds and loads NVRTC once per process.
///
/// A forked child uses its parent's answer (NVRTC is a compiler library: it keeps no driver or
/// device state, and the child has its copy of the loaded library). A child forked while another
/// thread of its parent was still searching, which would wait for ever on that thread's answer,
/// searches itself instead, each time it asks; if that thread was inside cudarc's own first load
/// of the library, which the child cannot finish either, the child is refused.
///
/// # Errors
/// [`Error::Unsupported`] if no NVRTC library loads (or [`NVRTC_ENV`] names one that does not, is
/// not NVRTC, or is not the one the loader would hand cudarc), or in a forked child as above.
pub fn nvrtc_available() -> Result<()> {
    static SEARCH: ForkOnce<()> = ForkOnce::new();
    SEARCH.get_or_again(find_nvrtc, find_nvrtc)
}

fn find_nvrtc() -> Result<()> {
    if let Some(path) = std::env::var_os(NVRTC_ENV) {
        driver::preload(&path)
            .ok_or(Error::Unsupported("HETMEM_NVRTC names an NVRTC library that could not be loaded"))?;
        if !cudarc_finds_nvrtc()? {
            return Err(Error::Unsupported("HETMEM_NVRTC names a library that is not NVRTC 12 or 13"));
        }
        // cudarc loads NVRTC by name, newest soname first: another NVRTC on the loader's path
        // under a name it tries before the named library's soname would be used instead.
        let lookup = "nvrtcCreateProgram";
        if driver::symbol_address(&path, lookup) != cudarc_symbol_address(lookup) {
            return Err(Error::Unsupported(
                "HETMEM_NVRTC names one NVRTC library, but the dynamic loader finds another one first (a newer \
                 soname on its path), which would be used: unset the variable or remove the other library from \
                 the loader's path",
            ));
        }
        return Ok(());
    }
    if SONAMES.iter().any(|name| driver::preload(name.as_ref()).is_some()) && cudarc_finds_nvrtc()? {
        return Ok(());
    }
    for dir in toolkit_lib_dirs() {
        for name in SONAMES {
            let path = dir.join(name);
            if path.exists() && driver::preload(path.as_os_str()).is_some() && cudarc_finds_nvrtc()? {
                return Ok(());
            }
        }
    }
    Err(Error::Unsupported(
        "NVRTC (libnvrtc.so.12 or .13) was not found: install the CUDA toolkit or the \
         nvidia-cuda-nvrtc wheel, or set HETMEM_NVRTC to the library's path",
    ))
}

/// Every NVRTC function cudarc's `compile_ptx_with_opts` calls.
const REQUIRED_SYMBOLS: &[&str] = &[
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
    "nvrtcGetPTXSize",
    "nvrtcGetPTX",
    "nvrtcDestroyProgram",
];

/// Whether cudarc's own lookup (by soname) now finds an NVRTC with every function it will call:
/// it panics where it does not, and a library that loads is not necessarily NVRTC.
///
/// # Errors
/// [`Error::Unsupported`] in a forked child whose parent had a thread in cudarc's first load of
/// the library at the fork (see [`cudarc_library`]).
fn cudarc_finds_nvrtc() -> Result<bool> {
    // SAFETY: loading a shared library runs its initialisers; these are the names cudarc loads.
    if !unsafe { nvrtc::sys::is_culib_present() } {
        return Ok(false);
    }
    let lib = cudarc_library()?;
    // SAFETY: the symbols are only looked up, never called through this type.
    Ok(REQUIRED_SYMBOLS.iter().all(|name| unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_ok()))
}

/// cudarc's NVRTC library, once `is_culib_present` has said one loads. cudarc loads it once per
/// process, under a `OnceLock`: a thread of the parent inside that first load at a fork leaves the
/// lock taken in the child for ever, so a child that would wait on it is refused instead. (A load
/// the parent finished, or none at all, is no obstacle: the child uses it, or loads its own.)
fn cudarc_library() -> Result<&'static libloading::Library> {
    static LOADED: ForkOnce<()> = ForkOnce::new();
    LOADED.get_or_again(
        || {
            // SAFETY: the caller saw `is_culib_present` say a library loads, so `culib` does not
            // panic.
            unsafe { nvrtc::sys::culib() };
            Ok(())
        },
        || {
            Err(Error::Unsupported(
                "this process was forked while another thread was loading NVRTC, which the child cannot finish: \
                 exec a new program to compile kernels",
            ))
        },
    )?;
    // SAFETY: loaded above (here or before the fork), so this only reads cudarc's `OnceLock`.
    Ok(unsafe { nvrtc::sys::culib() })
}

/// The address of function `name` in the NVRTC library cudarc loaded.
fn cudarc_symbol_address(name: &str) -> Option<usize> {
    // Only called once `cudarc_finds_nvrtc` said a library loads, which it has loaded.
    let lib = cudarc_library().ok()?;
    // SAFETY: the symbol is only looked up, never called through this type.
    let f = unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.ok()?;
    Some(*f as usize)
}

fn toolkit_lib_dirs() -> Vec<PathBuf> {
    let roots: Vec<OsString> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .chain([OsString::from("/usr/local/cuda")])
        .collect();
    roots.iter().flat_map(|root| [PathBuf::from(root).join("lib64"), PathBuf::from(root).join("lib")]).collect()
}

/// Compiles CUDA C++ `src` to PTX for the device of `ctx` (its compute capability), with `options`
/// passed to NVRTC as they are (e.g. `"-DN=4"`, `"--std=c++17"`).
///
/// # Errors
/// [`nvrtc_available`]'s; a source with a NUL byte is [`Error::InvalidName`]; a compile error is
/// [`Error::Gpu`] (`call`: "nvrtcCompileProgram") with the compiler's log in
/// [`CompileError::log`].
pub fn compile_ptx(ctx: &CudaContext, src: &str, options: &[&str]) -> Result<Ptx, CompileError> {
    let (major, minor) = driver::compute_capability(ctx)?;
    let mut all = vec![format!("--gpu-architecture=compute_{major}{minor}")];
    all.extend(options.iter().map(|o| o.to_string()));
    compile(src, all)
}

/// Compiles `src` with exactly `options` (no architecture is added: NVRTC's default applies unless
/// an option names one). Works without a GPU.
pub fn compile_ptx_with(src: &str, options: &[&str]) -> Result<Ptx, CompileError> {
    compile(src, options.iter().map(|o| o.to_string()).collect())
}

fn compile(src: &str, options: Vec<String>) -> Result<Ptx, CompileError> {
    nvrtc_available()?;
    if src.contains('\0') || options.iter().any(|o| o.contains('\0')) {
        return Err(Error::InvalidName { name: "kernel source".into(), reason: "NUL byte in source or options" }.into());
    }
    let opts = CompileOptions { options, ..Default::default() };
    nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| {
        use nvrtc::CompileError as E;
        let (call, code, log) = match e {
            E::CreationError(n) => ("nvrtcCreateProgram", n.0, String::new()),
            E::CompileError { nvrtc, log, .. } => ("nvrtcCompileProgram", nvrtc.0, log.to_string_lossy().into_owned()),
            E::GetLogError(n) => ("nvrtcGetProgramLog", n.0, String::new()),
            E::GetPtxError(n) => ("nvrtcGetPTX", n.0, String::new()),
            E::DestroyError(n) => ("nvrtcDestroyProgram", n.0, String::new()),
        };
        CompileError { error: Error::Gpu { call, code: code as i32, name: nvrtc_name(code as i32) }, log }
    })
}

/// NVRTC's name for a result code (the list is fixed in NVRTC's header).
fn nvrtc_name(code: i32) -> &'static str {
    match code {
        1 => "NVRTC_ERROR_OUT_OF_MEMORY",
        2 => "NVRTC_ERROR_PROGRAM_CREATION_FAILURE",
        3 => "NVRTC_ERROR_INVALID_INPUT",
        4 => "NVRTC_ERROR_INVALID_PROGRAM",
        5 => "NVRTC_ERROR_INVALID_OPTION",
        6 => "NVRTC_ERROR_COMPILATION",
        7 => "NVRTC_ERROR_BUILTIN_OPERATION_FAILURE",
        11 => "NVRTC_ERROR_INTERNAL_ERROR",
        _ => "NVRTC error",
    }
}
