//! NVRTC: CUDA C source to PTX at run time, for the reduction kernels of the collectives.
//!
//! cudarc panics when it cannot load libnvrtc, so the library is looked for here first with
//! `dlopen` (RTLD_GLOBAL, so cudarc's own load by soname finds the same library): the path in
//! `PARALLEL_NVRTC_LIB`, then a path registered by the bindings (the NVIDIA wheels next to torch),
//! then the loader's search path. Compiling needs no GPU.

use crate::config::config;
use crate::error::{Error, ErrorKind, Result};
use std::ffi::CString;
use std::sync::{Mutex, OnceLock};

static HINTS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static LOADED: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// Adds a candidate path of libnvrtc (used before the loader's search path).
pub fn add_hint(path: &str) {
    HINTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path.to_string());
}

fn try_dlopen(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: a NUL-terminated name; the handle is kept for the life of the process.
    !unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null()
}

/// Finds and loads libnvrtc once; returns which file was loaded.
pub fn load() -> Result<&'static str> {
    let r = LOADED.get_or_init(|| {
        let mut tried = Vec::new();
        let mut candidates: Vec<String> = Vec::new();
        if !config().nvrtc_lib.is_empty() {
            candidates.push(config().nvrtc_lib.clone());
        }
        candidates.extend(HINTS.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        candidates.extend(
            ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
                .iter()
                .map(|s| s.to_string()),
        );
        for c in candidates {
            if try_dlopen(&c) {
                // SAFETY: the probe only loads libraries by name; it cannot panic.
                if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                    return Ok(c);
                }
                tried.push(format!("{c} (loaded, but not under a name cudarc looks for)"));
            } else {
                tried.push(c);
            }
        }
        Err(format!(
            "libnvrtc was not found (tried {}): install the CUDA runtime compiler (pip install nvidia-cuda-nvrtc-cu12, or torch's CUDA wheels) or set PARALLEL_NVRTC_LIB to its path",
            tried.join(", ")
        ))
    });
    r.as_deref()
        .map_err(|e| Error::new(ErrorKind::Unsupported, "nvrtc", e.clone()))
}

/// Compiles CUDA C `src` to PTX (NUL-terminated, ready for `cuModuleLoadData`).
pub fn compile(src: &str, name: &str, options: Vec<String>) -> Result<Vec<u8>> {
    load()?;
    let opts = cudarc::nvrtc::CompileOptions {
        options,
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| {
        Error::new(
            ErrorKind::Resource,
            "nvrtc",
            format!("compiling kernel {name} failed: {e:?}"),
        )
    })?;
    let mut bytes = ptx
        .as_bytes()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| Error::new(ErrorKind::Resource, "nvrtc", "NVRTC returned no PTX"))?;
    if bytes.last() != Some(&0) {
        bytes.push(0);
    }
    Ok(bytes)
}
